"""The ends of a decode step: the token embeddings' gather, the rotary tables and the
greedy argmax.

At decode sizes torch launches each as kernels built for big tensors (the embedding's
index_select and the argmax's reduction each take about what a whole layer's attention
takes; the rotary tables are six small launches). Here each is one launch of programs that
issue all their loads at once:

- embed_rows: weight[ids], a program per (token, 1024-wide slice of the row); an id out of
  the table's range gives a row of NaN (torch's CUDA embedding stops the process with a
  device assert; reading past the table would return another tensor's bytes).
- rope_tables: the rotary embedding's cos and sin tables of the step's positions, as the
  decoder's torch composition (fp32 position times fp32 inverse frequency, libdevice's
  cosf / sinf, as torch's CUDA cos and sin, rounded to the dtype): one launch instead of
  six (the product, the concatenation, two functions, two casts).
- argmax_rows: x.argmax(-1), a program per row over the whole vocabulary in one tile (up
  to 32768 wide, else a loop of such tiles), the first index of the maximum as torch's.
  A row holding NaN is not torch's answer (torch picks the NaN): logits never hold one.

Each runs on CUDA tensors in eager mode, on CPU ones too with `interpret` (Triton's
interpreter: tests); elsewhere, and while tracing, torch's ops run.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .launch import launcher as _launcher
from .fused import _LIBDEVICE

_ROW_BLOCK = 1024  # embed_rows: columns a program
_VOCAB_BLOCK = 32768  # argmax_rows: the widest tile a program takes at once


def _usable(x: torch.Tensor, interpret: bool) -> bool:
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False
    return x.is_cuda or interpret


@triton.jit
def _embed_kernel(ids_ptr, w_ptr, out_ptr, V, D, stride_w, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tok = tl.load(ids_ptr + row).to(tl.int64)
    ok = (tok >= 0) & (tok < V)
    vals = tl.load(w_ptr + tl.where(ok, tok, 0) * stride_w + cols, mask=cols < D, other=0.0)
    vals = tl.where(ok, vals, float("nan"))
    tl.store(out_ptr + row.to(tl.int64) * stride_o + cols, vals, mask=cols < D)


@triton.jit
def _rope_tables_kernel(pos_ptr, inv_ptr, cos_ptr, sin_ptr, half, BLOCK_HALF: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    ok = j < half
    freqs = tl.load(pos_ptr + tok).to(tl.float32) * tl.load(inv_ptr + j, mask=ok, other=0.0)
    if _LIBDEVICE:
        c, s = libdevice.cos(freqs), libdevice.sin(freqs)
    else:
        c, s = tl.cos(freqs), tl.sin(freqs)
    row = tok * 2 * half
    for off in tl.static_range(2):  # [freqs, freqs]: each half of the row alike
        tl.store(cos_ptr + row + off * half + j, c.to(cos_ptr.dtype.element_ty), mask=ok)
        tl.store(sin_ptr + row + off * half + j, s.to(sin_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, V, stride_r, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_r
    offs = tl.arange(0, BLOCK)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    for k in range(0, V, BLOCK):
        v = tl.load(base + k + offs, mask=k + offs < V, other=float("-inf")).to(tl.float32)
        m, i = tl.max(v, 0, return_indices=True, return_indices_tie_break_left=True)
        take = m > best  # a tie keeps the earlier tile's index
        best_i = tl.where(take, k + i, best_i)
        best = tl.where(take, m, best)
    tl.store(out_ptr + row, best_i.to(tl.int64))


def embed_rows(ids: torch.Tensor, weight: torch.Tensor, *, interpret: bool = False) -> torch.Tensor:
    """weight[ids] (ids of any shape, weight (V, D) with contiguous rows) in one launch where
    the kernels run (a CUDA tensor, eager; a CPU one with `interpret`); torch's embedding
    elsewhere."""
    # (the check on ids: a weight is an nn.Parameter, which the tracer test would refuse)
    if not (_usable(ids, interpret) and weight.device == ids.device and weight.dim() == 2 and weight.stride(1) == 1
            and ids.numel()):
        return torch.nn.functional.embedding(ids, weight)
    V, D = weight.shape
    flat = ids.reshape(-1).contiguous()  # a column of a wider tensor stays strided in reshape
    out = torch.empty(flat.numel(), D, dtype=weight.dtype, device=weight.device)
    grid = (flat.numel(), triton.cdiv(D, _ROW_BLOCK))
    _launcher(_embed_kernel, weight)[grid](flat, weight, out, V, D, weight.stride(0), out.stride(0),
                                          BLOCK=_ROW_BLOCK, num_warps=4)
    return out.view(*ids.shape, D)


def argmax_rows(x: torch.Tensor, *, enabled: bool = True, interpret: bool = False) -> torch.Tensor:
    """x.argmax(dim=-1) (int64, x's leading shape) in one launch where the kernels run and
    `enabled` (a CUDA tensor, eager, a contiguous last dim; a CPU one with `interpret`);
    torch's argmax elsewhere."""
    if not (enabled and _usable(x, interpret) and x.dim() >= 1 and x.shape[-1] and x.stride(-1) == 1 and x.numel()
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return x.argmax(dim=-1)
    V = x.shape[-1]
    x2 = x.reshape(-1, V)
    out = torch.empty(x2.shape[0], dtype=torch.int64, device=x.device)
    block = min(triton.next_power_of_2(V), _VOCAB_BLOCK)
    _launcher(_argmax_kernel, x)[(x2.shape[0],)](x2, out, V, x2.stride(0), BLOCK=block,
                                                  num_warps=16 if block >= 8192 else 4)
    return out.view(x.shape[:-1])


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, *,
                interpret: bool = False):
    """(cos, sin), each (B, T, 1, 2 · len(inv_freq)) in dtype, of positions (B, T): one
    launch where the kernels run (eager, CUDA; the CPU with `interpret`), else
    rope_tables_ref (the decoder's ops)."""
    if not (_usable(positions, interpret) and inv_freq.device == positions.device and inv_freq.dtype == torch.float32
            and positions.dim() == 2 and positions.numel()):
        return rope_tables_ref(positions, inv_freq, dtype)
    B, T = positions.shape
    half = inv_freq.numel()
    cos = torch.empty(B, T, 1, 2 * half, dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    _launcher(_rope_tables_kernel, positions)[(B * T,)](positions.contiguous(), inv_freq.contiguous(), cos, sin,
                                                        half, BLOCK_HALF=triton.next_power_of_2(half), num_warps=1)
    return cos, sin


def rope_tables_ref(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def embed_rows_ref(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding(ids, weight)


def argmax_rows_ref(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1)
