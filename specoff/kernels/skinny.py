"""A product with few rows: y = x · Wᵀ (+ b) for x (M, K) with M ≤ 16, W (N, K), in one launch.

A decode step of the draft multiplies 1–16 rows by each weight matrix once, so the step is
bound by reading the weights. Here each program streams a (BLOCK_N, K / SPLIT_K) slab of W:
the weight tile is the product's wide left operand (64 or 128 rows, what Hopper's wgmma
wants), the activations' transposed tile its narrow right one (16 columns). Where the column
tiles alone would leave SMs idle, K is split SPLIT_K ways; each slice stores its fp32 partial
sums and the last slice of a tile to arrive (an atomic count per tile) adds them in slice
order and rounds once, in the same launch. The counts live in a buffer per weight matrix,
reset by that last slice, so a launch leaves them zero for the next one (CUDA graphs replay
them as captured).

A SwiGLU's gate-up projection can end in its activation (`swiglu`: a program's gate and up
rows as one tile and one product, silu(gate) · up in the epilogue, as fused.silu_mul forms
it) and the down projection can add the block's skip (`residual`: after the product's
rounding, as torch's add): a dense layer's feed-forward in two launches instead of four. The
activation stays in the gate-up launch's epilogue: formed in the down projection's K loop
instead, that loop no longer pipelined its weight loads. With an RMSNorm's weight folded into
W's columns (models.decoder's fold_norms), `rms_eps` normalises x's rows inside the launch
(the rows' scale from the x tiles the product loads, applied to the fp32 sums): the norm's
launch before the product goes too. The rows' sums of squares can come from the launch
before: a product ending in the block's skip add (`squares`) also stores, a column tile each,
its output rows' partial sums of squares, and the normalising product after it sums those
few floats instead of squaring its x tiles in its K loop.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Sequence, Tuple

import torch

import triton
import triton.language as tl

from .launch import launcher as _launcher
from .launch import num_sms, pdl_launch, pdl_release, pdl_start
from .fused import _exp
from .moe import max_shared_memory  # the device's probe, cached there

MAX_ROWS = 16  # the rows a launch takes: its BLOCK_M, the narrow side of the product
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _store(y_ptrs, acc, mask, r_ptrs, sq_ptrs, HAS_RESIDUAL: tl.constexpr, SQ_OUT: tl.constexpr):
    """acc rounded to y's dtype; with a residual, r + that, rounded again (as torch's add).
    SQ_OUT: the tile's sums of squares of each row's stored values (as an RMSNorm of y reads
    them: fp32 of the rounded values), one fp32 a row at sq_ptrs."""
    y = acc.to(y_ptrs.dtype.element_ty)
    if HAS_RESIDUAL:
        r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + r).to(y_ptrs.dtype.element_ty)
    tl.store(y_ptrs, y, mask=mask)
    if SQ_OUT:
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        tl.store(sq_ptrs, tl.sum(yf * yf, axis=0))


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a · b; IEEE (fp32): no TF32 rounding of the inputs."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, r_ptr, sq_out_ptr, sq_in_ptr, M, N, K,
                   k_per_split, rms_eps, sq_in_tiles, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_rm, stride_rn,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr,
                   SWIGLU: tl.constexpr = False, HAS_RESIDUAL: tl.constexpr = False,
                   RMS: tl.constexpr = False,
                   SQ_OUT: tl.constexpr = False, SQ_IN: tl.constexpr = 0,
                   USE_PDL: tl.constexpr = False):
    """Program (n, k): rows n·BLOCK_N.. of W over the k-th K slice, every row of x (M ≤ BLOCK_M).
    SWIGLU (K whole): W is [gate; up] (2N, K) and y = silu(x·gateᵀ) · (x·upᵀ), each product
    rounded to the dtype first, then as fused.silu_mul rounds: the program streams the gate's
    rows n·BLOCK_N.. over the up's as one tile of 2·BLOCK_N rows, one product split after the
    loop (half the MMA instructions of a product each for the gate and the up).
    HAS_RESIDUAL: y = r + (the product rounded to the dtype), rounded again: torch's separate
    residual add, in this launch. RMS: each row of x normalised first, y = rsqrt(mean(x²) +
    rms_eps) · (x · Wᵀ) (+ b): an RMSNorm whose weight was folded into W's columns. With K
    whole (SPLIT_K 1) the squares come from the x tiles the product loads anyway, added up
    element-wise in a register tile and summed over K once, after the loop (a sum across the
    threads every K step stalls the loop); K slices read their rows of x whole in a loop of
    their own after the product's (x is 16 rows at most: from L2). SQ_OUT: each column tile
    also stores its rows' sums of squares of y (BLOCK_M fp32 at sq_out_ptr + tile · BLOCK_M):
    the partial sums an RMSNorm of y needs. SQ_IN (with RMS; a power of two ≥ sq_in_tiles):
    x's squares not taken here but summed from the sq_in_tiles partial rows a product's SQ_OUT
    left at sq_in_ptr (read as the program starts, in one load). USE_PDL: see
    kernels.launch.pdl_launch."""
    pdl_start(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    if RMS and SQ_IN > 0:  # the rows' squares from the partials the product before left
        tt = tl.arange(0, SQ_IN)
        row_sq = tl.sum(tl.load(sq_in_ptr + tt[:, None] * BLOCK_M + rm[None, :],
                                mask=tt[:, None] < sq_in_tiles, other=0.0), axis=0)
    rk = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    x_ptrs = x_ptr + rm[None, :] * stride_xm + (k_lo + rk)[:, None] * stride_xk  # (BLOCK_K, BLOCK_M)
    squares = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)  # RMS: x², summed over K after the loop
    if SWIGLU:
        # one 2·BLOCK_N-row tile a step: the gate's rows n·BLOCK_N.. over the up's, one product
        half = tl.arange(0, 2 * BLOCK_N)
        col = pid_n * BLOCK_N + half % BLOCK_N  # the output column of each weight row
        rows = col.to(tl.int64) + (half // BLOCK_N).to(tl.int64) * N
        both_ptrs = w_ptr + rows[:, None] * stride_wn + (k_lo + rk)[None, :] * stride_wk
        both = tl.zeros((2 * BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            kk = k + rk
            w = tl.load(both_ptrs, mask=(col[:, None] < N) & (kk[None, :] < k_hi), other=0.0)
            xt = tl.load(x_ptrs, mask=(kk[:, None] < k_hi) & (rm[None, :] < M), other=0.0)
            both = _dot(w, xt, both, IEEE)
            if RMS and SPLIT_K == 1 and SQ_IN == 0:
                squares += xt.to(tl.float32) * xt.to(tl.float32)
            both_ptrs += BLOCK_K * stride_wk
            x_ptrs += BLOCK_K * stride_xk
        acc, acc_up = tl.split(tl.permute(tl.reshape(both, (2, BLOCK_N, BLOCK_M)), (1, 2, 0)))
    else:
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (k_lo + rk)[None, :] * stride_wk  # (BLOCK_N, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            kk = k + rk
            w = tl.load(w_ptrs, mask=(rn[:, None] < N) & (kk[None, :] < k_hi), other=0.0)
            xt = tl.load(x_ptrs, mask=(kk[:, None] < k_hi) & (rm[None, :] < M), other=0.0)
            acc = _dot(w, xt, acc, IEEE)
            if RMS and SPLIT_K == 1 and SQ_IN == 0:
                squares += xt.to(tl.float32) * xt.to(tl.float32)
            w_ptrs += BLOCK_K * stride_wk
            x_ptrs += BLOCK_K * stride_xk
    pdl_release(USE_PDL)
    if RMS:  # the rows' RMSNorm scale, applied to the fp32 sums (bias after: it is not normalised)
        if SQ_IN == 0:
            if SPLIT_K > 1:  # a slice saw part of each row: read the rows whole
                for k in range(0, K, BLOCK_K):
                    kk = k + rk
                    xs = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None] * stride_xk,
                                 mask=(kk[:, None] < K) & (rm[None, :] < M), other=0.0).to(tl.float32)
                    squares += xs * xs
            row_sq = tl.sum(squares, axis=0)
        scale = 1.0 / tl.sqrt_rn(row_sq / K + rms_eps)
        acc = acc * scale[None, :]
        if SWIGLU:
            acc_up = acc_up * scale[None, :]
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None] * stride_yn
    y_mask = (rn[:, None] < N) & (rm[None, :] < M)
    r_ptrs = r_ptr + rm[None, :] * stride_rm + rn[:, None] * stride_rn
    sq_ptrs = sq_out_ptr + pid_n * BLOCK_M + rm
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        if SWIGLU:  # as nn.Linear's [gate | up] rounded, then fused._silu_mul_kernel
            if HAS_BIAS:
                acc_up += tl.load(b_ptr + N + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
            dtype = y_ptrs.dtype.element_ty
            gate = acc.to(dtype).to(tl.float32)
            silu = tl.math.div_rn(gate, 1.0 + _exp(-gate)).to(dtype).to(tl.float32)
            acc = silu * acc_up.to(dtype).to(tl.float32)
        _store(y_ptrs, acc, y_mask, r_ptrs, sq_ptrs, HAS_RESIDUAL, SQ_OUT)
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
            _store(y_ptrs, total, y_mask, r_ptrs, sq_ptrs, HAS_RESIDUAL, SQ_OUT)
            tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next launch


def config(M: int, N: int, K: int, sms: int, element_size: int = 2, shared: int = 227 * 1024) -> dict:
    """BLOCK_M 16 (the rows), 64 weight rows a tile with 4 warps (one wgmma group), 4 stages.
    K in two slices only where the column tiles cover under a quarter of the SMs and K is
    short (a small draft's narrow products: a 7B draft's wo ran faster whole inside its step);
    256-wide K steps where the tiles are under one wave (more bytes in flight a program),
    128 else; a fifth stage where K is long (a 7B draft's w2), where it fits without a
    narrower K step. The K step and then the stages shrink until the stages' tiles of W and x
    (`element_size` bytes each) fit in `shared` bytes (fp32's 256-wide steps would need 320 KB)."""
    tiles = triton.cdiv(N, 64)
    split = 2 if 4 * tiles < sms and K <= 8192 else 1
    block_k = 256 if tiles < sms else 128
    cfg = _fit(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=4),
               64, element_size, shared)
    deeper = dict(cfg, num_stages=5)
    if K > 8192 and cfg["num_stages"] == 4 and _fit(dict(deeper), 64, element_size, shared) == deeper:
        return deeper  # a fifth stage only where it fits as it is
    return cfg


def _fit(cfg: dict, w_rows: int, element_size: int, shared: int) -> dict:
    """cfg with BLOCK_K (to 64), then num_stages (to 2), lowered until each stage's tiles of
    `w_rows` weight rows and of x fit in `shared` bytes with 8 KB to spare."""
    def need(c):
        return c["num_stages"] * (w_rows + c["BLOCK_M"]) * c["BLOCK_K"] * element_size + 8 * 1024

    while need(cfg) > shared and cfg["BLOCK_K"] > 64:
        cfg["BLOCK_K"] //= 2
    while need(cfg) > shared and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    return cfg


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


# (device, producing weight's address) -> its launches' partial sums of squares, (tiles, 16)
# fp32: a product with squares=True leaves its output rows' squares a column tile there,
# and a folded norm's product after it (rms_eps, x that very output) sums them instead of
# squaring x itself. One buffer a weight, as the counts; never freed (graphs keep it).
_SQUARES: Dict[Tuple[str, int], torch.Tensor] = {}
# (a weakref to the output whose squares it holds, tiles, the output's version then)
_SQUARES_OF: Dict[Tuple[str, int], tuple] = {}


def _version(x: torch.Tensor) -> Optional[int]:
    """x's in-place change count; None for inference tensors (they keep none)."""
    try:
        return x._version
    except RuntimeError:
        return None


def _squares_out(w: torch.Tensor, tiles: int) -> Tuple[Tuple[str, int], torch.Tensor]:
    key = (str(w.device), w.data_ptr())
    buf = _SQUARES.get(key)
    if buf is None or buf.shape[0] < tiles:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(tiles, 16, dtype=torch.float32, device=w.device)
        _SQUARES[key] = buf
    return key, buf


def row_squares(x: torch.Tensor) -> Optional[torch.Tensor]:
    """The partial sums of squares of x's rows (tiles, 16) that the product writing x left
    (skinny_linear's squares=True), where no product with that weight has run since and x
    has not changed in place since (where torch counts that: not for inference tensors);
    else None."""
    key = getattr(x, "_skinny_squares", None)
    owner, tiles, version = _SQUARES_OF.get(key, (None, 0, None)) if key is not None else (None, 0, None)
    if owner is None or owner() is not x or version != _version(x):
        return None
    return _SQUARES[key][:tiles]


def _config(M: int, N: int, K: int, swiglu: bool, device, element_size: int,
            tiles: Sequence[tuple] = ()) -> dict:
    """config() for a launch of N output columns (a SwiGLU's: its programs' 32 gate and 32 up
    rows, one 64-row tile) on this device (its shared memory); `tiles`: (N, K) → entries
    replacing what it picks, as KernelOptions.skinny_tiles holds them (N: a SwiGLU's gate and
    up together)."""
    device = torch.device(device)
    shared = max_shared_memory(device)
    columns = 2 * N if swiglu else N
    cfg = config(M, columns, K, num_sms(device), element_size, shared)
    if swiglu:
        cfg["BLOCK_N"] = 32
    cfg.update(dict(dict(tiles).get((columns, K), ())))
    return _fit(cfg, 2 * cfg["BLOCK_N"] if swiglu else cfg["BLOCK_N"], element_size, shared)


def _skinny_into(x2: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
                 cfg: Optional[dict] = None, swiglu: bool = False,
                 residual: Optional[torch.Tensor] = None, rms_eps: Optional[float] = None,
                 sq_out: Optional[torch.Tensor] = None, sq_in: Optional[torch.Tensor] = None,
                 pdl: bool = True) -> torch.Tensor:
    M, K = x2.shape
    N = w.shape[0] // 2 if swiglu else w.shape[0]
    assert w.shape[1] == K and out.shape == (M, N)
    if M == 0:
        return out
    assert M <= 16, "skinny products take at most 16 rows"
    cfg = dict(_config(M, N, K, swiglu, x2.device, x2.element_size()) if cfg is None else cfg)
    split = cfg.pop("SPLIT_K", 1)
    if swiglu:  # its epilogue needs both products whole
        split = 1
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
    if sq_out is not None:
        assert cfg["BLOCK_M"] == 16 and sq_out.shape == (tiles, 16) and sq_out.is_contiguous()
    if sq_in is not None:  # one power-of-two load of the partial rows
        assert rms_eps is not None and cfg["BLOCK_M"] == 16 and sq_in.shape[1:] == (16,) and sq_in.is_contiguous()
    _launcher(_skinny_kernel, x2)[(tiles, split)](
        x2, w, bias if bias is not None else out, out, part, counts, r,
        out if sq_out is None else sq_out, out if sq_in is None else sq_in, M, N, K, k_per_split,
        0.0 if rms_eps is None else float(rms_eps), 0 if sq_in is None else sq_in.shape[0],
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1), r.stride(0), r.stride(1),
        HAS_BIAS=bias is not None, SPLIT_K=split, IEEE=x2.dtype == torch.float32, SWIGLU=swiglu,
        HAS_RESIDUAL=residual is not None, RMS=rms_eps is not None, SQ_OUT=sq_out is not None,
        SQ_IN=0 if sq_in is None else triton.next_power_of_2(sq_in.shape[0]), **cfg, **pdl_launch(x2, pdl))
    return out


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  cfg: Optional[dict] = None, swiglu: bool = False,
                  residual: Optional[torch.Tensor] = None, rms_eps: Optional[float] = None,
                  squares: bool = False, *, tiles: Sequence[tuple] = (), pdl: bool = True) -> torch.Tensor:
    """x (..., K) · Wᵀ (+ bias) → (..., N) in x's dtype, at most 16 rows in all; fp32
    accumulation, one rounding. `swiglu`: W (and bias) is [gate; up] (2N rows) and the result
    silu(gate) · up of the rounded products (fused.silu_mul's values): a SwiGLU's gate-up
    projection and activation in one launch. `residual` (..., N): returns residual + the
    product, as torch's add after it would. `rms_eps`: x's rows RMS-normalised (no weight:
    one folded into W) before the product, the scale applied to the fp32 sums; their sums of
    squares from the partials the product writing x left (`squares`; row_squares) where it
    did, else from x's tiles here. `squares`: the launch also leaves the output rows' partial
    sums of squares for such a product after it (a folded block's skip adds, whose sums feed
    the next norm). `cfg`: config()'s dict with entries replaced (tests, timing); `tiles`:
    replacements by the product's (N, K) (_config); `pdl`: a programmatic dependent launch
    where the device has them (kernels.launch.pdl_launch)."""
    assert x.dtype in _DTYPES and w.dtype == x.dtype, f"x {x.dtype} and W {w.dtype}: one float dtype"
    assert w.dim() == 2 and x.shape[-1] == w.shape[1], f"x has {x.shape[-1]} features, W is {tuple(w.shape)}"
    assert not swiglu or w.shape[0] % 2 == 0, f"swiglu: W {tuple(w.shape)} is not [gate; up]"
    N = w.shape[0] // 2 if swiglu else w.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    r2 = None
    if residual is not None:
        assert residual.shape == (*x.shape[:-1], N) and residual.dtype == x.dtype, "residual: the output's shape"
        r2 = residual.reshape(-1, N)
    sq_in = row_squares(x) if rms_eps is not None else None
    if cfg is None and x2.shape[0]:
        cfg = _config(x2.shape[0], N, x2.shape[1], swiglu, x.device, x.element_size(), tiles)
    key = sq_out = None
    if squares and x2.shape[0]:
        n_tiles = triton.cdiv(N, cfg["BLOCK_N"])
        key, sq_out = _squares_out(w, n_tiles)
        sq_out = sq_out[:n_tiles]
    y = _skinny_into(x2, w, bias, out, cfg, swiglu, r2, rms_eps, sq_out, sq_in, pdl).reshape(*x.shape[:-1], N)
    if key is not None:
        y._skinny_squares = key
        _SQUARES_OF[key] = (weakref.ref(y), n_tiles, _version(y))
    return y


def skinny_linear_ref(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      swiglu: bool = False, residual: Optional[torch.Tensor] = None,
                      rms_eps: Optional[float] = None) -> torch.Tensor:
    """The same in plain torch, fp32, rounded once (with swiglu, then fused.silu_mul_ref's
    activation), then the residual added."""
    y = x.float() @ w.float().t()
    if rms_eps is not None:
        y = y * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + rms_eps)
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y if residual is None else residual + y


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the kernel takes this product: ≤ MAX_ROWS rows, one float dtype, x and W on one
    device, eager (tracing keeps torch's product). Which devices run it is the caller's choice
    (KernelOptions.runs: CUDA tensors, or the interpreter's)."""
    if x.dtype != w.dtype or x.dtype not in _DTYPES or w.dim() != 2 or x.device != w.device:
        return False
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False
    return 0 < x.numel() and x.numel() // x.shape[-1] <= MAX_ROWS
