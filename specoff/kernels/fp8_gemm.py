"""A product with a weight stored in float8: y = x · (W8 · s)ᵀ, W8 (N, K) e4m3 with a scale
per output row s (N,), x (..., K) in fp32 / fp16 / bf16 (specoff.quant.Fp8Linear).

Dequantizing the weight to the activations' dtype and calling a dense product (the plain
path) moves each weight element three more times: read as float8 (1 byte), written and read
again in bf16 (2 + 2), on top of the product's own read. A draft's decode step is bound by
those reads, so the plain float8 step costs more than the bf16 one it replaced. Here each
tile of W8 is loaded as float8 and converted in registers, so a step reads 1 byte a weight;
the activations stay in their dtype (quantizing them too costs the draft acceptance), the
fp32 accumulator is scaled per column before the one rounding.

Tiles: a grouped ordering of (BLOCK_M, BLOCK_N) output tiles over K in BLOCK_K steps, as
Triton's matmul tutorial; few rows (decode) take narrow column tiles so that a 4096-wide
output still spreads over every SM. Defaults, not tuned.
"""
from __future__ import annotations

import os

import torch

import triton
import triton.language as tl

from .launch import launcher as _launcher

FP8 = torch.float8_e4m3fn
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def launch_config(M: int, N: int) -> dict:
    """Block sizes by the rows: decode steps (≤ 16 rows) in 16-row tiles with 32-column
    ones (N = 4096: 128 programs, about one an SM of a Hopper GPU), up to 64 rows in 64 ×
    64 tiles, more in 128 × 128 (a tree's growth pass, a prompt's prefill)."""
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _fp8_linear_into(x2: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    M, K = x2.shape
    N = w8.shape[0]
    if M == 0:
        return out
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
