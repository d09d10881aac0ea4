"""Fused element-wise decoder ops: RMSNorm, rotary embedding and the SwiGLU activation.

A Mistral-7B-shaped decode step at batch <= 16 is bound by its weight reads, yet the
plain-torch composition of these three ops launches ~28 small kernels a layer (each of the
two RMSNorms: cast, pow, mean, add, rsqrt, mul, cast, mul), a few microseconds each even
replayed in a CUDA graph. Here each op is one launch that rounds as its torch composition
does, op by op:

- rms_norm (Zhang and Sennrich 2019, arXiv 1910.07467, eq. 4, as Hugging Face's LlamaRMSNorm):
  x * rsqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, times the weight, rounded to
  the promoted dtype. Only the fp32 sum of squares runs in another order than torch's
  reduction, so an output can differ in its last bit or two where the normalised fp32 value
  lies within a few fp32 ulps of a rounding boundary of the dtype.
- add_rms_norm: h = x + residual (rounded to the dtype as torch's add: bit-exact), then
  rms_norm(h), in one launch that reads x and residual once and writes h and the norm; the
  residual add before a pre-norm block's second norm (h + attention, then ffn_norm).
- rope (Su et al. 2021, RoFormer, arXiv 2104.09864, section 3.4.2, in the rotate-half layout
  of Hugging Face checkpoints): x * cos, rotate_half(x) * sin and their sum each rounded to
  x's dtype, as torch's three kernels: bit-exact.
- silu_mul (Shazeer 2020, arXiv 2002.05202, eq. 6): silu(gate) = gate / (1 + expf(-gate)) in
  fp32 with libdevice's expf and an IEEE division, as torch's CUDA silu, rounded, then times
  up, rounded: bit-exact on a GPU where nvcc fused torch's expf and 1 + as Triton does (see
  _silu_mul_kernel); the interpreter's numpy exp may differ from torch's in a last fp32 bit.

Where torch rounds a product and the sum after it in separate kernels, libdevice's add.rn
keeps Triton from fusing the two into one FMA; it flushes subnormal operands to zero, so
fp32 and bf16 values below 2**-126 (1.2e-38) are the one exception to the above.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .launch import launcher as _launcher
from .launch import pdl_launch, pdl_start

# libdevice on a GPU; the interpreter has none (and computes in numpy, which never contracts).
_LIBDEVICE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _add_rn(a, b):
    """a + b rounded on its own: Triton would fuse a product feeding it into one FMA, where
    torch rounds the two in separate kernels. (libdevice's add.rn flushes subnormals to zero.)"""
    if _LIBDEVICE:
        return libdevice.add_rn(a, b)
    return a + b


@triton.jit
def _exp(x):
    """fp32 exp as CUDA's expf, which torch's silu calls (tl.exp is a coarser ex2.approx)."""
    if _LIBDEVICE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _normalise(x, w_ptr, cols, col_valid, D, eps, dtype: tl.constexpr):
    """w * (x * rsqrt(mean(x^2) + eps)).to(dtype) over the rows of the fp32 tile x (zeros
    past D), left in fp32: the caller rounds it once, as torch's mul in the promoted dtype."""
    # torch's CUDA mean: the sum times the fp32 reciprocal of D; eps rounded to fp32 as torch does.
    inv_d = tl.math.div_rn(1.0, tl.cast(D, tl.float32))
    mean = tl.sum(x * x, 1) * inv_d
    rstd = tl.math.rsqrt(_add_rn(mean, tl.cast(eps, tl.float32)))  # Inductor may pass eps as fp64
    x_normed = (x * rstd[:, None]).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
    return w[None, :] * x_normed


@triton.jit
def _rms_norm_kernel(
    # pointers
    x_ptr, w_ptr, out_ptr,
    # sizes
    rows, inner_rows, D, eps,
    # strides
    stride_x_outer, stride_x_inner,
    # meta-parameters
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """ROWS rows of out = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype); row r of x sits at
    (r // inner_rows) * stride_x_outer + (r % inner_rows) * stride_x_inner."""
    pdl_start(USE_PDL)
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_valid = row < rows
    row = row.to(tl.int64)  # rows * D can pass 2**31 in a long prefill
    x_row = (row // inner_rows) * stride_x_outer + (row % inner_rows) * stride_x_inner
    cols = tl.arange(0, BLOCK_D)
    col_valid = cols < D
    mask = row_valid[:, None] & col_valid[None, :]
    x = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = _normalise(x, w_ptr, cols, col_valid, D, eps, x_ptr.dtype.element_ty)
    tl.store(out_ptr + row[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(
    # pointers
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    # sizes
    rows, D, eps,
    # strides
    stride_x, stride_res,
    # meta-parameters
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """ROWS rows of h = x + residual (res_out) and out = rms_norm(h), as _rms_norm_kernel."""
    pdl_start(USE_PDL)
    dtype = res_out_ptr.dtype.element_ty
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_valid = row < rows
    row = row.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_valid = cols < D
    mask = row_valid[:, None] & col_valid[None, :]
    x = tl.load(x_ptr + row[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + row[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = _add_rn(x, res).to(dtype)  # torch's add: the fp32 sum rounded to the dtype
    out_rows = row[:, None] * D + cols[None, :]
    tl.store(res_out_ptr + out_rows, h, mask=mask)
    out = _normalise(h.to(tl.float32), w_ptr, cols, col_valid, D, eps, dtype)
    tl.store(out_ptr + out_rows, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(x1, x2, cos1, sin1, cos2, sin2, dtype: tl.constexpr):
    """x * cos + rotate_half(x) * sin of x's two halves (fp32), the two halves out in fp32.
    rotate_half(x) = cat(-x2, x1). Each product and the sum rounded to dtype, as torch's three
    kernels. add.rn in every dtype: LLVM narrows the casts around a plain add to a bf16 add,
    then fuses it with the product before it into a bf16 FMA."""
    a1 = (x1 * cos1).to(dtype).to(tl.float32)
    b1 = ((-x2) * sin1).to(dtype).to(tl.float32)
    a2 = (x2 * cos2).to(dtype).to(tl.float32)
    b2 = (x1 * sin2).to(dtype).to(tl.float32)
    return _add_rn(a1, b1), _add_rn(a2, b2)


@triton.jit
def _rope_heads(x_ptr, out_ptr, x_row, out_row, heads, stride_xh, half, cos1, sin1, cos2, sin2,
                BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, stride_oh=None):
    """x * cos + rotate_half(x) * sin over the heads of one token, rounded as torch's three kernels."""
    dtype = out_ptr.dtype.element_ty
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < heads)[:, None] & (offs_d < half)[None, :]
    x_ptrs = x_ptr + x_row + offs_h[:, None] * stride_xh + offs_d[None, :]  # (H, hd/2): first halves
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    out1, out2 = _rotate(x1, x2, cos1, sin1, cos2, sin2, dtype)
    if stride_oh is None:  # contiguous heads
        stride_oh = 2 * half
    out_ptrs = out_ptr + out_row + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out1.to(dtype), mask=mask)
    tl.store(out_ptrs + half, out2.to(dtype), mask=mask)


@triton.jit
def _rope_tables(cos_row, sin_row, half, BLOCK_HALF: tl.constexpr):
    """One token's cos and sin, each as its two halves (1, hd/2) in fp32."""
    offs_d = tl.arange(0, BLOCK_HALF)
    d_valid = offs_d < half
    cos1 = tl.load(cos_row + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_row + half + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_row + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_row + half + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, :]
    return cos1, sin1, cos2, sin2


@triton.jit
def _rope_kernel(
    # pointers
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    # sizes
    T, q_heads, k_heads, half,
    # strides
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_cb, stride_ct, stride_sb, stride_st,
    # meta-parameters
    HAS_K: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Every q head (and k head) of token (b, t) = program_id; cos and sin are read once for all."""
    token = tl.program_id(0).to(tl.int64)
    b = token // T
    t = token % T
    cos1, sin1, cos2, sin2 = _rope_tables(cos_ptr + b * stride_cb + t * stride_ct,
                                          sin_ptr + b * stride_sb + t * stride_st, half, BLOCK_HALF)
    _rope_heads(q_ptr, q_out_ptr, b * stride_qb + t * stride_qt, token * q_heads * 2 * half, q_heads, stride_qh,
                half, cos1, sin1, cos2, sin2, BLOCK_QH, BLOCK_HALF)
    if HAS_K:
        _rope_heads(k_ptr, k_out_ptr, b * stride_kb + t * stride_kt, token * k_heads * 2 * half, k_heads,
                    stride_kh, half, cos1, sin1, cos2, sin2, BLOCK_KH, BLOCK_HALF)


@triton.jit
def _rope_write_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    # sizes
    T, q_heads, k_heads, half, max_len,
    # strides
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_sb, stride_st, stride_pb, stride_pt,
    stride_cache_b, stride_cache_h, stride_cache_s,
    # meta-parameters
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """_rope_kernel's q and k of token (b, t), with the rotated k and the token's v stored
    straight into the layer's cache (B, KV, S, hd) at slot min(positions[b, t], S - 1), as
    KVCache.write stores them: the write's index clamp and two scatters in this launch."""
    pdl_start(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    b = token // T
    t = token % T
    cos1, sin1, cos2, sin2 = _rope_tables(cos_ptr + b * stride_cb + t * stride_ct,
                                          sin_ptr + b * stride_sb + t * stride_st, half, BLOCK_HALF)
    _rope_heads(q_ptr, q_out_ptr, b * stride_qb + t * stride_qt, token * q_heads * 2 * half, q_heads, stride_qh,
                half, cos1, sin1, cos2, sin2, BLOCK_QH, BLOCK_HALF)
    slot = tl.minimum(tl.load(pos_ptr + b * stride_pb + t * stride_pt).to(tl.int64), max_len - 1)
    cache_row = b * stride_cache_b + slot * stride_cache_s
    _rope_heads(k_ptr, k_cache_ptr, b * stride_kb + t * stride_kt, cache_row, k_heads, stride_kh,
                half, cos1, sin1, cos2, sin2, BLOCK_KH, BLOCK_HALF, stride_cache_h)
    offs_h = tl.arange(0, BLOCK_KH)
    offs_hd = tl.arange(0, 2 * BLOCK_HALF)
    v_mask = (offs_h < k_heads)[:, None] & (offs_hd < 2 * half)[None, :]
    v = tl.load(v_ptr + b * stride_vb + t * stride_vt + offs_h[:, None] * stride_vh + offs_hd[None, :],
                mask=v_mask, other=0.0)
    tl.store(v_cache_ptr + cache_row + offs_h[:, None] * stride_cache_h + offs_hd[None, :], v, mask=v_mask)


@triton.jit
def _silu_mul_kernel(
    # pointers
    gate_up_ptr, out_ptr,
    # sizes
    I,
    # strides
    stride_in, stride_out,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    """Columns [pid1 * BLOCK, +BLOCK) of out[row] = silu(gate) * up, gate_up[row] = [gate | up]."""
    dtype = out_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + I + cols, mask=mask, other=0.0).to(tl.float32)
    # torch's CUDA silu, gate / (1 + expf(-gate)): nvcc (--fmad=true by default) fuses expf's last
    # multiply with the 1 + into one FMA, and so does Triton's default fp fusion (on in 3.9;
    # TRITON_DEFAULT_FP_FUSION=0 or Triton 3.10's new default would round the two apart).
    silu = tl.math.div_rn(gate, 1.0 + _exp(-gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(dtype), mask=mask)


# ---------------------------------------------------------------------------------------
# Wrappers

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tracing(x: torch.Tensor) -> bool:
    """torch.compile or make_fx is tracing: go through the registered op, not a bare launch."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def _rms_norm_empty(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)


def _add_empty(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _rms_norm_into(x, weight, eps: float, out, pdl: bool = True):
    D = x.shape[-1]
    # Rows as (outer, inner): q or k split from the fused QKV projection, (B, T, H, hd), is a
    # view with B and T mergeable but not H; reshape copies only what no two strides describe.
    x3 = x.reshape(-1, x.shape[-2] if x.dim() >= 3 else 1, D)
    if x3.stride(2) != 1:
        x3 = x3.contiguous()
    rows = x3.shape[0] * x3.shape[1]
    if rows == 0:
        return out
    block_d = triton.next_power_of_2(D)
    rows_per_program, num_warps = _rms_norm_launch(block_d)
    _launcher(_rms_norm_kernel, x)[(triton.cdiv(rows, rows_per_program),)](
        x3, weight, out,
        rows, x3.shape[1], D, eps,
        x3.stride(0), x3.stride(1),
        ROWS=rows_per_program, BLOCK_D=block_d, num_warps=num_warps, **pdl_launch(x, pdl),
    )
    return out


def _rms_norm_launch(block_d: int):
    """(rows a program, num_warps) for rows of block_d columns: tiles of about 2048 elements."""
    rows_per_program = max(1, min(16, 2048 // block_d))
    tile = rows_per_program * block_d
    return rows_per_program, 4 if tile <= 2048 else 8 if tile <= 8192 else 16


def _add_rms_norm_into(x, residual, weight, eps: float, out, residual_out, pdl: bool = True):
    D = x.shape[-1]
    x2, res2 = x.reshape(-1, D), residual.reshape(-1, D)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    res2 = res2 if res2.stride(1) == 1 else res2.contiguous()
    rows = x2.shape[0]
    if rows == 0:
        return out, residual_out
    block_d = triton.next_power_of_2(D)
    rows_per_program, num_warps = _rms_norm_launch(block_d)
    _launcher(_add_rms_norm_kernel, x)[(triton.cdiv(rows, rows_per_program),)](
        x2, res2, weight, out, residual_out,
        rows, D, eps,
        x2.stride(0), res2.stride(0),
        ROWS=rows_per_program, BLOCK_D=block_d, num_warps=num_warps, **pdl_launch(x, pdl),
    )
    return out, residual_out


def _rope_empty(q: torch.Tensor, k: Optional[torch.Tensor]) -> List[torch.Tensor]:
    return [torch.empty(q.shape, dtype=q.dtype, device=q.device)] + (
        [] if k is None else [torch.empty(k.shape, dtype=k.dtype, device=k.device)])


def _token_tables(t: torch.Tensor, B: int, T: int, hd: int) -> torch.Tensor:
    """cos or sin as (B, T, 1, hd) with head_dim contiguous (a broadcast view where it can be)."""
    t = t.expand(B, T, 1, hd)
    return t if t.stride(3) == 1 else t.contiguous()


def _rope_into(q, k, cos, sin, q_out, k_out):
    B, T, H, hd = q.shape
    if q.stride(3) != 1:
        q = q.contiguous()
    if k is not None and k.stride(3) != 1:
        k = k.contiguous()
    cos, sin = _token_tables(cos, B, T, hd), _token_tables(sin, B, T, hd)
    if B * T == 0:
        return q_out, k_out
    KV = k.shape[2] if k is not None else 1
    k_strides = k.stride()[:3] if k is not None else (0, 0, 0)
    block_qh, block_kh, block_half = triton.next_power_of_2(H), triton.next_power_of_2(KV), triton.next_power_of_2(hd // 2)
    _launcher(_rope_kernel, q)[(B * T,)](
        q, k if k is not None else q, cos, sin, q_out, k_out if k_out is not None else q_out,
        T, H, KV, hd // 2,
        q.stride(0), q.stride(1), q.stride(2),
        *k_strides,
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        HAS_K=k is not None, BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_HALF=block_half,
        num_warps=4 if block_qh * block_half <= 1024 else 8,
    )
    return q_out, k_out


def _silu_mul_empty(gate_up: torch.Tensor) -> torch.Tensor:
    return torch.empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), dtype=gate_up.dtype, device=gate_up.device)


def _silu_mul_into(gate_up, out):
    I = gate_up.shape[-1] // 2
    x2 = gate_up.reshape(-1, 2 * I)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if rows == 0 or I == 0:
        return out
    block = min(1024, triton.next_power_of_2(I))
    _launcher(_silu_mul_kernel, gate_up)[(rows, triton.cdiv(I, block))](
        x2, out,
        I,
        x2.stride(0), I,
        BLOCK=block, num_warps=4,
    )
    return out


def _register(name: str, impl, fake):
    """specoff::<name> as a torch op that torch.compile(fullgraph=True) traces: a triton_op,
    whose kernel Inductor sees, or under TRITON_INTERPRET (wrap_triton returns the bare
    kernel, invisible to tracing) an opaque custom_op with a fake."""
    if hasattr(torch.library, "triton_op") and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.library.triton_op(f"specoff::{name}", impl, mutates_args=())
    op = torch.library.custom_op(f"specoff::{name}", impl, mutates_args=())
    op.register_fake(fake)
    return op


def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm_into(x, weight, eps, _rms_norm_empty(x, weight))


def _add_rms_norm_impl(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _add_rms_norm_into(x, residual, weight, eps, _rms_norm_empty(x, weight), _add_empty(x))


def _rope_impl(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> List[torch.Tensor]:
    outs = _rope_empty(q, k)
    _rope_into(q, k, cos, sin, outs[0], outs[1] if k is not None else None)
    return outs


def _silu_mul_impl(gate_up: torch.Tensor) -> torch.Tensor:
    return _silu_mul_into(gate_up, _silu_mul_empty(gate_up))


_rms_norm_op = _register("rms_norm", _rms_norm_impl, lambda x, weight, eps: _rms_norm_empty(x, weight))
_add_rms_norm_op = _register("add_rms_norm", _add_rms_norm_impl,
                             lambda x, residual, weight, eps: (_rms_norm_empty(x, weight), _add_empty(x)))
_rope_op = _register("rope", _rope_impl, lambda q, k, cos, sin: _rope_empty(q, k))
_silu_mul_op = _register("silu_mul", _silu_mul_impl, _silu_mul_empty)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             out: Optional[torch.Tensor] = None, pdl: bool = True) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype) over the last dim, x (..., D).

    The result has the dtype weight * x promotes to. Eagerly (or with `out`, a preallocated
    buffer) the kernel launches directly: the dispatcher's host time would outweigh the kernel.
    While torch.compile traces, the registered op `torch.ops.specoff.rms_norm` runs.
    `pdl`: a programmatic dependent launch where the device has them (kernels.launch.pdl_launch).
    """
    assert x.dtype in _DTYPES and weight.dtype in _DTYPES, f"unsupported dtypes {x.dtype}, {weight.dtype}"
    assert weight.shape == (x.shape[-1],) and weight.stride(0) == 1, "weight is a contiguous (D,) vector"
    assert triton.next_power_of_2(x.shape[-1]) <= 65536, "one row is one tile: D <= 65536"
    if out is None and _tracing(x):
        return _rms_norm_op(x, weight, float(eps))
    if out is None:
        out = _rms_norm_empty(x, weight)
    assert out.shape == x.shape and out.is_contiguous()
    assert out.dtype == torch.promote_types(x.dtype, weight.dtype)
    return _rms_norm_into(x, weight, float(eps), out, pdl)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 out: Optional[torch.Tensor] = None, residual_out: Optional[torch.Tensor] = None,
                 pdl: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h, weight, eps), h) for h = x + residual, x and residual (..., D) of one dtype.

    h is rounded as torch's `x + residual` (bit-exact) and normalised as rms_norm rounds, in
    one launch. `out` and `residual_out` (preallocated, both or neither) may alias neither
    input. Eagerly (or with them) the kernel launches directly; while torch.compile traces,
    the registered op `torch.ops.specoff.add_rms_norm` runs. `pdl`: as rms_norm's.
    """
    assert x.dtype in _DTYPES and weight.dtype in _DTYPES, f"unsupported dtypes {x.dtype}, {weight.dtype}"
    assert residual.shape == x.shape and residual.dtype == x.dtype, "x and residual share a shape and dtype"
    assert weight.shape == (x.shape[-1],) and weight.stride(0) == 1, "weight is a contiguous (D,) vector"
    assert triton.next_power_of_2(x.shape[-1]) <= 65536, "one row is one tile: D <= 65536"
    assert (out is None) == (residual_out is None), "out and residual_out come together"
    if out is None and _tracing(x):
        normed, h = _add_rms_norm_op(x, residual, weight, float(eps))
        return normed, h
    if out is None:
        out, residual_out = _rms_norm_empty(x, weight), _add_empty(x)
    assert out.shape == x.shape and out.is_contiguous()
    assert out.dtype == torch.promote_types(x.dtype, weight.dtype)
    assert residual_out.shape == x.shape and residual_out.dtype == x.dtype and residual_out.is_contiguous()
    return _add_rms_norm_into(x, residual, weight, float(eps), out, residual_out, pdl)


def rope(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, *,
         out: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(q * cos + rotate_half(q) * sin, the same for k) in one launch; k may be None.

    q (B, T, H, hd), k (B, T, KV, hd), cos and sin (B, T, 1, hd) or broadcastable to it, all
    one dtype; each token's heads may sit at any strides (a view of the QKV projection).
    Returns contiguous tensors (or writes `out`, a pair of preallocated ones); eagerly the
    kernel launches directly, while torch.compile traces the op `torch.ops.specoff.rope` runs.
    """
    B, T, H, hd = q.shape
    assert q.dtype in _DTYPES and cos.dtype == sin.dtype == q.dtype, "q, cos and sin share a dtype"
    assert hd % 2 == 0 and cos.shape[-1] == hd and sin.shape[-1] == hd
    if k is not None:
        assert k.dim() == 4 and k.shape[:2] == (B, T) and k.shape[3] == hd and k.dtype == q.dtype
    if out is None and _tracing(q):
        outs = _rope_op(q, k, cos, sin)
        return outs[0], (outs[1] if k is not None else None)
    if out is None:
        outs = _rope_empty(q, k)
        out = (outs[0], outs[1] if k is not None else None)
    q_out, k_out = out
    assert q_out.shape == q.shape and q_out.dtype == q.dtype and q_out.is_contiguous()
    if k is not None:
        assert k_out.shape == k.shape and k_out.dtype == k.dtype and k_out.is_contiguous()
    return _rope_into(q, k, cos, sin, q_out, k_out)


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor, *,
               pdl: bool = True) -> torch.Tensor:
    """rope(q, k, cos, sin), then KVCache.write of k and v, in one launch: returns the
    rotated q (B, T, H, hd), contiguous; the rotated k and v (B, T, KV, hd) land in one
    layer's cache k_cache / v_cache (B, KV, S, hd), in q's dtype, at slots positions (B, T)
    clamped to S - 1. Eager launches only (the decoder takes it outside tracing); `pdl`: as
    rms_norm's."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    assert q.dtype in _DTYPES and k.dtype == v.dtype == cos.dtype == sin.dtype == q.dtype, "one dtype"
    assert k_cache.dtype == v_cache.dtype == q.dtype, "a cache in the activations' dtype"
    assert k.shape == v.shape == (B, T, KV, hd) and hd % 2 == 0
    assert k_cache.shape == v_cache.shape and k_cache.shape[:2] == (B, KV) and k_cache.shape[3] == hd
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert positions.shape == (B, T)
    q = q if q.stride(3) == 1 else q.contiguous()
    k = k if k.stride(3) == 1 else k.contiguous()
    v = v if v.stride(3) == 1 else v.contiguous()
    cos, sin = _token_tables(cos, B, T, hd), _token_tables(sin, B, T, hd)
    q_out = torch.empty(B, T, H, hd, dtype=q.dtype, device=q.device)
    if B * T == 0:
        return q_out
    block_qh, block_kh, block_half = triton.next_power_of_2(H), triton.next_power_of_2(KV), triton.next_power_of_2(hd // 2)
    _launcher(_rope_write_kernel, q)[(B * T,)](
        q, k, v, cos, sin, positions, q_out, k_cache, v_cache,
        T, H, KV, hd // 2, k_cache.shape[2],
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), positions.stride(0), positions.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_HALF=block_half,
        num_warps=4 if block_qh * block_half <= 1024 else 8, **pdl_launch(q, pdl),
    )
    return q_out


def silu_mul(gate_up: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(gate) * up for gate_up (..., 2I) laid out [gate | up] -> (..., I).

    Eagerly (or with `out`, a preallocated buffer) the kernel launches directly; while
    torch.compile traces, the registered op `torch.ops.specoff.silu_mul` runs.
    """
    assert gate_up.dtype in _DTYPES and gate_up.shape[-1] % 2 == 0
    if out is None and _tracing(gate_up):
        return _silu_mul_op(gate_up)
    if out is None:
        out = _silu_mul_empty(gate_up)
    assert out.shape == (*gate_up.shape[:-1], gate_up.shape[-1] // 2) and out.dtype == gate_up.dtype
    assert out.is_contiguous()
    return _silu_mul_into(gate_up, out)


# ---------------------------------------------------------------------------------------
# References: the plain-torch compositions the decoder runs on the CPU


def rms_norm_ref(x, weight, eps):
    """Normalise in fp32, scale in the input dtype: Hugging Face's rounding."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x, residual, weight, eps):
    """(rms_norm_ref(h), h) for h = x + residual, as the decoder's `h = h + attention(...)`
    before its ffn_norm."""
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def rotate_half_ref(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(q, k, cos, sin):
    """x * cos + rotate_half(x) * sin for q and k (k may be None), each op rounded to the dtype."""
    q_out = q * cos + rotate_half_ref(q) * sin
    return q_out, (None if k is None else k * cos + rotate_half_ref(k) * sin)


def silu_mul_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
