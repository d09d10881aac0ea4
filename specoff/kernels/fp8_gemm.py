"""A product with a weight stored in float8: y = x · (W8 · s)ᵀ, W8 (N, K) e4m3 with a scale
per output row s (N,), x (..., K) in fp32 / fp16 / bf16 (specoff.quant.Fp8Linear).

Dequantizing the weight to the activations' dtype and calling a dense product (the plain
path) moves each weight element three more times: read as float8 (1 byte), written and read
again in bf16 (2 + 2), on top of the product's own read. A draft's decode step is bound by
those reads (a Mistral-7B-shaped step at ≤ 16 rows reads its 7 GB of weights once), so the
plain float8 step costs more than the bf16 one it replaced: on the H200 a tree round's
growth took 0.586 s with a dequantizing float8 draft (session 13). Here each tile of W8 is
loaded as float8 and converted in registers, so a step reads 1 byte a weight; the
activations stay in their dtype (quantizing them too, torch._scaled_mm, cost acceptance:
quant.FP8_GEMM), the fp32 accumulator is scaled per column before the one rounding.

Tiles: a grouped ordering of (BLOCK_M, BLOCK_N) output tiles over K in BLOCK_K steps, as
Triton's matmul tutorial; few rows (decode) take narrow column tiles so that a 4096-wide
output still spreads over every SM. Defaults only, not tuned on a GPU yet.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

import triton
import triton.language as tl

from . import launcher as _launcher
from . import num_sms

FP8 = torch.float8_e4m3fn
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The product as yᵀ = W8 · xᵀ with K split at decode (_fp8_gemm_swap_kernel), or as x · W8ᵀ
# (_fp8_gemm_kernel). Session 20 timed the latter on the H200 at 0.25-1.38 TB/s at decode
# (128 programs for a 4096-wide output, each walking all of K) and half of bf16's rate at
# 512 rows (the conversion on the right operand, which wgmma wants in shared memory). The
# swapped form is built for both and correct on the CPU; not yet timed: False.
SWAP = False


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles sweep the columns together, so a column tile of W8 is read while the
    # others still sit in L2.
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < left), other=0.0)
        b = tl.load(w_ptrs, mask=(rn[None, :] < N) & (rk[:, None] < left), other=0.0)
        if IEEE:  # fp32 activations: no TF32 rounding of the product's inputs
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = acc * scale[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _fp8_gemm_swap_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, M, N, K, k_per_split,
                          stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          SPLIT_K: tl.constexpr, IEEE: tl.constexpr):
    """yᵀ = W8 · xᵀ: the weight's (BLOCK_N, BLOCK_K) tile is the product's left operand,
    converted in registers (where Hopper's wgmma takes a left operand), the activations'
    transposed tile the right one from shared memory; the rows of x are the product's narrow
    side (16 at decode). Program (n, m, k): the k-th of SPLIT_K slices of K, whose fp32
    partial sums go to part_ptr for _fp8_splitk_reduce when SPLIT_K > 1 (a 4096-wide output
    then spreads over SPLIT_K × its column tiles' programs)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None] * stride_wn + (k_lo + rk)[None, :] * stride_wk  # (BLOCK_N, BLOCK_K)
    x_ptrs = x_ptr + rm[None, :] * stride_xm + (k_lo + rk)[:, None] * stride_xk  # (BLOCK_K, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        kk = k + rk
        w = tl.load(w_ptrs, mask=(rn[:, None] < N) & (kk[None, :] < k_hi), other=0.0)
        xt = tl.load(x_ptrs, mask=(kk[:, None] < k_hi) & (rm[None, :] < M), other=0.0)
        if IEEE:
            acc = tl.dot(w.to(xt.dtype), xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    if SPLIT_K == 1:
        scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        y = acc * scale[:, None]
        tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None] * stride_yn,
                 y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + pid_k * M * N + rm[None, :] * N + rn[:, None], acc, mask=mask)


@triton.jit
def _fp8_splitk_reduce(part_ptr, s_ptr, y_ptr, M, N, stride_ym, stride_yn,
                       SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """y = (Σ_k partial_k) · scale, rounded once: the split-K slices' sums."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + k * M * N + offs, mask=mask, other=0.0)
    m, n = offs // N, offs % N
    scale = tl.load(s_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n * stride_yn, (acc * scale).to(y_ptr.dtype.element_ty),
             mask=mask)


def swap_config(M: int, N: int, K: int, sms: int) -> dict:
    """Tiles for _fp8_gemm_swap_kernel: BLOCK_M rows of x (16 at decode, up to 128), 64 or
    128 weight rows, and K split until the programs fill about two waves of the SMs (at most
    8 slices of at least 512), so a 4096-wide decode product runs 256 programs, not 64."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    block_n = 64 if M <= 64 else 128
    block_k = 256 if M <= 16 else 128 if M <= 64 else 64
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    split = 1
    while split < 8 and tiles * split * 2 <= 2 * sms and K // (split * 2) >= 512:
        split *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                num_warps=4 if M <= 64 else 8, num_stages=4 if M <= 64 else 3)


def _fp8_swap_into(x2, w8, scale, out, cfg: dict):
    M, K = x2.shape
    N = w8.shape[0]
    cfg = dict(cfg)
    split = cfg.pop("SPLIT_K")
    k_per_split = triton.cdiv(triton.cdiv(K, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(K, k_per_split)
    part = (torch.empty(split, M, N, dtype=torch.float32, device=x2.device) if split > 1
            else out)  # unused with one slice
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]), split)
    _launcher(_fp8_gemm_swap_kernel, x2)[grid](
        x2, w8, scale, out, part, M, N, K, k_per_split,
        x2.stride(0), x2.stride(1), w8.stride(0), w8.stride(1), out.stride(0), out.stride(1),
        SPLIT_K=split, IEEE=x2.dtype == torch.float32, **cfg)
    if split > 1:
        block = 1024
        _launcher(_fp8_splitk_reduce, x2)[(triton.cdiv(M * N, block),)](
            part, scale, out, M, N, out.stride(0), out.stride(1), SPLIT_K=split, BLOCK=block)
    return out


def launch_config(M: int, N: int) -> dict:
    """Block sizes by the rows: decode steps (≤ 16 rows) in 16-row tiles with 32-column
    ones (N = 4096: 128 programs, about one an SM of an H100 / H200), up to 64 rows in 64 ×
    64 tiles, more in 128 × 128 (a tree's growth pass, a prompt's prefill)."""
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _fp8_linear_into(x2: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                     out: torch.Tensor, swap: Optional[bool] = None,
                     config: Optional[dict] = None) -> torch.Tensor:
    """`swap`: the weight as the left operand, K split at decode (_fp8_gemm_swap_kernel);
    None: SWAP says. `config`: swap_config's dict with entries replaced (tests, tuning)."""
    M, K = x2.shape
    N = w8.shape[0]
    if M == 0:
        return out
    if SWAP if swap is None else swap:
        cfg = dict(swap_config(M, N, K, num_sms(x2.device)), **(config or {}))
        return _fp8_swap_into(x2, w8, scale, out, cfg)
    cfg = launch_config(M, N)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _launcher(_fp8_gemm_kernel, x2)[grid](
        x2, w8, scale, out, M, N, K,
        x2.stride(0), x2.stride(1), w8.stride(0), w8.stride(1), out.stride(0), out.stride(1),
        IEEE=x2.dtype == torch.float32, **cfg)
    return out


def _fp8_linear_impl(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], w8.shape[0], dtype=x.dtype, device=x.device)
    return _fp8_linear_into(x2, w8, scale, out).reshape(*x.shape[:-1], w8.shape[0])


def _fp8_linear_fake(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty(*x.shape[:-1], w8.shape[0], dtype=x.dtype, device=x.device)


if hasattr(torch.library, "triton_op") and os.environ.get("TRITON_INTERPRET") != "1":
    _fp8_linear_op = torch.library.triton_op("specoff::fp8_linear", _fp8_linear_impl,
                                             mutates_args=())
else:  # the interpreter's bare kernel is invisible to tracing: an opaque op with a fake
    _fp8_linear_op = torch.library.custom_op("specoff::fp8_linear", _fp8_linear_impl,
                                             mutates_args=())
    _fp8_linear_op.register_fake(_fp8_linear_fake)


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) · (W8 · scale)ᵀ → (..., N) in x's dtype: W8 (N, K) float8 e4m3, scale (N,)
    one a row (any float dtype), accumulated in fp32 and scaled before the one rounding.
    Eagerly the kernel launches directly; while torch.compile traces, the registered op
    `torch.ops.specoff.fp8_linear` runs."""
    assert x.dtype in _DTYPES, f"unsupported activation dtype {x.dtype}"
    assert w8.dtype == FP8 and w8.dim() == 2, "W8 is an (N, K) float8 e4m3 matrix"
    assert x.shape[-1] == w8.shape[1], f"x has {x.shape[-1]} features, W8 takes {w8.shape[1]}"
    assert scale.shape == (w8.shape[0],), "one scale a row of W8"
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return _fp8_linear_op(x, w8, scale)
    return _fp8_linear_impl(x, w8, scale)


def fp8_linear_ref(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same in plain torch, in fp32 then rounded once to x's dtype."""
    y = x.float() @ w8.float().t() * scale.float()
    return y.to(x.dtype)
