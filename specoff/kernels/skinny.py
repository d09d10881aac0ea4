"""A product with few rows: y = x · Wᵀ (+ b) for x (M, K) with M ≤ 16, W (N, K), in one launch.

A decode step of the draft multiplies 1–16 rows by each weight matrix once, so the step is
bound by reading the weights (a Mistral-7B-shaped step reads 14.2 GB: 3.17 ms at the 4.49
TB/s a plain striped read reaches on the H200; the step as one graph took 4.72 ms in session
22, torch's products alone reading at 3.2–4.2 TB/s). Here each program streams a (BLOCK_N,
K / SPLIT_K) slab of W: the weight tile is the product's wide left operand (64 or 128 rows,
what Hopper's wgmma wants), the activations' transposed tile its narrow right one (16
columns). Where the column tiles alone would leave SMs idle (a 4096-wide output is 64 tiles
of 64), K is split SPLIT_K ways; each slice stores its fp32 partial sums and the last slice
of a tile to arrive (an atomic count per tile) adds them in slice order and rounds once, in
the same launch. The counts live in a buffer per weight matrix, reset by that last slice, so
a launch leaves them zero for the next one (CUDA graphs replay them as captured).

A SwiGLU's down projection can hand it [gate | up] (`gated`: silu(gate) · up formed per tile
as fused.silu_mul forms it) and the block's skip (`residual`: added after the product's
rounding, as torch's add): a dense layer's feed-forward in two launches instead of four.

Session 22 on the H200 (`python tools/bench_kernels.py --only skinny --skinny-sweep`,
bench/runs/h200-session22/skinny/): correct (GPU tests: bf16, K slices racing, CUDA graphs),
and at the best of a small grid of tiles 1.0-1.4x torch's product on the draft's five
matrices in isolation (3.7-4.4 TB/s); the draft step as one graph with the first config rule
took 5.13 ms against 4.72 ms with torch's products. config() now follows the grid's winners;
`gated` and `residual` came after that run. Not yet timed in the step: `LINEAR` is off.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

import triton
import triton.language as tl

from . import launcher as _launcher
from . import num_sms
from .fused import _exp

# "auto": products of ≤ MAX_ROWS rows with a plain bf16 / fp16 weight on a CUDA device go
# through this kernel (models.decoder's projections); "on" also under TRITON_INTERPRET
# (tests); "off": torch's dense product everywhere.
LINEAR = "off"
MAX_ROWS = 16
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _store(y_ptrs, acc, mask, r_ptrs, HAS_RESIDUAL: tl.constexpr):
    """acc rounded to y's dtype; with a residual, r + that, rounded again (as torch's add)."""
    y = acc.to(y_ptrs.dtype.element_ty)
    if HAS_RESIDUAL:
        r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + r).to(y_ptrs.dtype.element_ty)
    tl.store(y_ptrs, y, mask=mask)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, r_ptr, M, N, K, k_per_split,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_rm, stride_rn,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr,
                   GATED: tl.constexpr = False, HAS_RESIDUAL: tl.constexpr = False):
    """Program (n, k): rows n·BLOCK_N.. of W over the k-th K slice, every row of x (M ≤ BLOCK_M).
    GATED: x is [gate | up] (M, 2K) and the product's input silu(gate) · up, rounded as
    fused.silu_mul rounds it (a SwiGLU's down projection without its own launch).
    HAS_RESIDUAL: y = r + (the product rounded to the dtype), rounded again: torch's separate
    residual add, in this launch."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (k_lo + rk)[None, :] * stride_wk  # (BLOCK_N, BLOCK_K)
    x_ptrs = x_ptr + rm[None, :] * stride_xm + (k_lo + rk)[:, None] * stride_xk  # (BLOCK_K, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        kk = k + rk
        w = tl.load(w_ptrs, mask=(rn[:, None] < N) & (kk[None, :] < k_hi), other=0.0)
        x_mask = (kk[:, None] < k_hi) & (rm[None, :] < M)
        xt = tl.load(x_ptrs, mask=x_mask, other=0.0)
        if GATED:  # as fused._silu_mul_kernel: silu rounded to the dtype, then the product
            gate = xt.to(tl.float32)
            up = tl.load(x_ptrs + K * stride_xk, mask=x_mask, other=0.0).to(tl.float32)
            silu = tl.math.div_rn(gate, 1.0 + _exp(-gate)).to(xt.dtype).to(tl.float32)
            xt = (silu * up).to(xt.dtype)
        if IEEE:  # fp32: no TF32 rounding of the inputs
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None] * stride_yn
    y_mask = (rn[:, None] < N) & (rm[None, :] < M)
    r_ptrs = r_ptr + rm[None, :] * stride_rm + rn[:, None] * stride_rn
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        _store(y_ptrs, acc, y_mask, r_ptrs, HAS_RESIDUAL)
    else:
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        slab = part_ptr + pid_n.to(tl.int64) * (SPLIT_K * BLOCK_N * BLOCK_M)
        tl.store(slab + pid_k * (BLOCK_N * BLOCK_M) + tile, acc)
        tl.debug_barrier()  # every thread's partial is written before the count says so
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the tile's last slice: sum the slices in order, round once
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(slab + s * (BLOCK_N * BLOCK_M) + tile, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
            _store(y_ptrs, total, y_mask, r_ptrs, HAS_RESIDUAL)
            tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next launch


def config(M: int, N: int, K: int, sms: int) -> dict:
    """BLOCK_M 16 (the rows), 64 weight rows a tile with 4 warps (one wgmma group), 128-wide
    K steps in 4 stages; K in two slices only where the column tiles cover under half the SMs
    and K is short (Mistral-7B's wo: 64 tiles of 4096). From session 22's grid on the H200
    (tiles 64/128 x K steps 128/256 x 1/2/4/8 slices, graph replays at 1 and 16 rows): whole
    K was fastest or within 3% for wqkv, w13, w2 and the head, two slices for wo (0.0076 ms
    against torch's 0.0105); the first rule, slices until two waves, lost 0.4 ms a draft step."""
    tiles = triton.cdiv(N, 64)
    split = 2 if 2 * tiles < sms and K <= 8192 else 1
    return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split, num_warps=4, num_stages=4)


# (device, weight's address) -> int32 counts, zero between launches. One buffer a weight
# matrix: products that may run at once on two streams (the draft's step beside the target's
# pass, each perhaps a CUDA graph's replay) multiply different weights, and one weight's
# products run one after another. Never freed: a captured graph keeps the address.
_COUNTS: Dict[Tuple[str, int], torch.Tensor] = {}
_RETIRED = []  # outgrown buffers, still an address some graph may hold


def _counts(w: torch.Tensor, tiles: int) -> torch.Tensor:
    key = (str(w.device), w.data_ptr())
    counts = _COUNTS.get(key)
    if counts is None or counts.numel() < tiles:
        if counts is not None:
            _RETIRED.append(counts)
        counts = torch.zeros(tiles, dtype=torch.int32, device=w.device)
        _COUNTS[key] = counts
    return counts


def _skinny_into(x2: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
                 cfg: Optional[dict] = None, gated: bool = False,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    M, K = x2.shape[0], w.shape[1]
    N = w.shape[0]
    assert x2.shape[1] == (2 * K if gated else K)
    if M == 0:
        return out
    assert M <= 16, "skinny products take at most 16 rows"
    cfg = dict(cfg or config(M, N, K, num_sms(x2.device)))
    split = cfg.pop("SPLIT_K")
    k_per_split = triton.cdiv(triton.cdiv(K, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(K, k_per_split)  # no empty slices
    tiles = triton.cdiv(N, cfg["BLOCK_N"])
    if split > 1:
        part = torch.empty(tiles * split * cfg["BLOCK_N"] * cfg["BLOCK_M"], dtype=torch.float32, device=x2.device)
        counts = _counts(w, tiles)
    else:
        part = counts = out  # unused
    r = out if residual is None else residual
    assert r.shape == out.shape and r.dtype == out.dtype
    _launcher(_skinny_kernel, x2)[(tiles, split)](
        x2, w, bias if bias is not None else out, out, part, counts, r, M, N, K, k_per_split,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1), r.stride(0), r.stride(1),
        HAS_BIAS=bias is not None, SPLIT_K=split, IEEE=x2.dtype == torch.float32, GATED=gated,
        HAS_RESIDUAL=residual is not None, **cfg)
    return out


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  cfg: Optional[dict] = None, gated: bool = False,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., K) · Wᵀ (+ bias) → (..., N) in x's dtype, at most 16 rows in all; fp32
    accumulation, one rounding. `gated`: x is (..., 2K) laid out [gate | up] and the product
    takes silu(gate) · up (fused.silu_mul's values) as its input. `residual` (..., N): returns
    residual + the product, as torch's add after it would. `cfg`: config()'s dict with
    entries replaced (tests, timing)."""
    assert x.dtype in _DTYPES and w.dtype == x.dtype, f"x {x.dtype} and W {w.dtype}: one float dtype"
    K = w.shape[1] * (2 if gated else 1)
    assert w.dim() == 2 and x.shape[-1] == K, f"x has {x.shape[-1]} features, W is {tuple(w.shape)}"
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    r2 = None
    if residual is not None:
        assert residual.shape == (*x.shape[:-1], w.shape[0]) and residual.dtype == x.dtype, "residual: the output's shape"
        r2 = residual.reshape(-1, w.shape[0])
    return _skinny_into(x2, w, bias, out, cfg, gated, r2).reshape(*x.shape[:-1], w.shape[0])


def skinny_linear_ref(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      gated: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same in plain torch, fp32, rounded once (the gated input as fused.silu_mul_ref),
    then the residual added."""
    if gated:
        gate, up = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * up
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return y if residual is None else residual + y


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether LINEAR sends this product to the kernel: ≤ MAX_ROWS rows, one float dtype, a
    CUDA device in eager mode (the interpreter with "on"); tracing keeps torch's product."""
    if LINEAR not in ("auto", "on", "off"):
        raise ValueError(f"kernels.skinny.LINEAR is {LINEAR!r}: set it to 'auto', 'on' or 'off'")
    if LINEAR == "off" or x.dtype != w.dtype or x.dtype not in _DTYPES or w.dim() != 2:
        return False
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False
    if x.numel() // x.shape[-1] > min(MAX_ROWS, 16) or x.numel() == 0:
        return False
    if x.is_cuda:
        return w.is_cuda
    return LINEAR == "on" and os.environ.get("TRITON_INTERPRET") == "1"
