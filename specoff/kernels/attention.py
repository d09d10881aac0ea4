"""Verification attention: T new query tokens per row against a preallocated KV cache.

The target model scores all draft tokens in one pass: a chain of gamma+1 tokens
(SpecOffload, arXiv 2505.10259, section 4) or a tree of candidate continuations (SpecExec,
arXiv 2406.02532, section 3) where each token sees the whole prefix and its tree ancestors.
Per-row cache lengths stay ragged (rows accept different counts); the new tokens' K/V are
already written at positions lengths[b] + t. A tree pass may also see N >= T new keys (a
draft expanding T nodes of an N-node tree whose other nodes are already cached), each
query's visible ones given by a [B, T, N] ancestor mask, in any order. A chain may also be
segmented: prompts packed one after another in one row (a prefill of prompts of different
lengths with no padding), each query seeing only the keys of its own prompt up to itself.

One program takes the G = H / KV query heads of one KV head times a block of queries, so
each K/V tile is read once for all of them (GQA). Long prefixes are split over several
programs (flash-decoding, Dao et al. 2023) whose partial results a second kernel combines
by log-sum-exp. Online softmax as in FlashAttention-2 (arXiv 2307.08691, algorithm 1).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

import triton
import triton.language as tl

from .launch import launcher as _launcher
from .launch import num_sms, pdl_launch, pdl_start
from . import moe as _moe  # max_shared_memory: the device's probe, cached there
from .fused import _rope_heads, _rope_tables, _rotate, _token_tables, rope_write

# Keys a program attends to at least before launch_config splits a prefix over several
# (each split's partial results then merged by _combine_splits_kernel, a second launch).
MIN_KEYS_PER_SPLIT = 512
# rope_verify_attention's default: from this many query rows a launch (B x T) each program
# rotates its query rows in registers straight into the tile it attends with; fewer rows keep
# the scratch round trip (a store, a barrier, a load back), which was no slower for them.
Q_REGISTERS_MIN_ROWS = 16


def _q_in_registers(rows: int, hd: int, q_in_registers: Optional[bool] = None) -> bool:
    """Whether rope_verify_attention rotates the queries in registers: where half the head is
    a power of two, as `q_in_registers` says (None: from Q_REGISTERS_MIN_ROWS rows)."""
    if hd // 2 != triton.next_power_of_2(max(hd // 2, 1)):
        return False
    return rows >= Q_REGISTERS_MIN_ROWS if q_in_registers is None else q_in_registers


@triton.jit
def _load_tile(ptrs, mask, EVEN: tl.constexpr):
    """A K or V tile; the mask only where a tile can run past the head dim or the keys."""
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _attend_masked_tile(q, k_base, v_base, stride_ks, stride_vs, offs_s, s_valid, offs_d, d_valid, L, t,
                        tree_allowed, acc, l_i, m_i, qk_scale, HAS_TREE: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step over key tile offs_s where each row sees only its allowed keys:
    tree_allowed, or (chain) keys up to its own position L + t."""
    # Pointers and the chain mask are made where they are used: made early, they stay live
    # across the dot and cost registers (30 more a thread, one program fewer per SM).
    k = tl.load(k_base + offs_s[None, :] * stride_ks + offs_d[:, None],
                mask=s_valid[None, :] & d_valid[:, None], other=0.0).to(q.dtype)  # (D, N)
    if IEEE:
        scores = tl.dot(q, k, input_precision="ieee")
    else:
        scores = tl.dot(q, k)
    if HAS_TREE:
        allowed = tree_allowed
    else:
        allowed = (offs_s[None, :] <= L + t[:, None]) & s_valid[None, :]
    scores = tl.where(allowed, scores * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row with nothing allowed yet keeps m = -inf; subtract 0 to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :],
                mask=s_valid[:, None] & d_valid[None, :], other=0.0).to(q.dtype)  # (N, D)
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _verify_attention_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, lengths_ptr, tree_ptr, seg_ptr, row_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr,
    # sizes
    T, N, kv_heads, num_splits, keys_per_split, qk_scale, S, half,
    # strides
    stride_xb, stride_xt, stride_cb, stride_ct, stride_pb, stride_pt,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mt, stride_mj,
    stride_sb, stride_st,
    stride_ob, stride_ot, stride_oh,
    # meta-parameters
    G: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_TREE: tl.constexpr, SEGMENTED: tl.constexpr,
    SPLIT: tl.constexpr, ROW_START: tl.constexpr,
    WHOLE_TILES: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROPE_WRITE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr = False, Q_REGS: tl.constexpr = False,
):
    """Rows r = t * G + g of (batch b, kv head) against keys [split start, split end).

    With WHOLE_TILES (large query blocks: tensor-core bound) the whole tiles of the prefix,
    which every row sees, run first in a loop with no masks at all; then the tiles holding
    the prefix's end and the new keys run masked per row, a tree tile that no row of the
    block may see skipped. Small blocks (bandwidth bound) run every tile masked: one loop
    needs fewer registers, so more programs share an SM.
    SEGMENTED (chain only, no whole tiles): row t sees keys seg[b, t] <= s <= L + t; the
    block starts at its rows' first segment start, and a tile no row sees is skipped.
    ROW_START: batch b's keys start row_start[b] slots into its cache (rows of a shared pool,
    kvcache.SegmentKVCache) rather than at b * stride_kb. USE_PDL: see kernels.launch.pdl_launch.
    ROPE_WRITE (a chain, one query block; rope_verify_attention): the new tokens' q, k and v
    come unrotated from the QKV projection's output (qkv: [q heads | k heads | v heads] a
    token); the program rotates its G query heads into q (scratch it reads back), and the
    program whose key range holds a new token's slot (positions, clamped to S - 1) rotates
    its k and stores it and its v in the cache, as fused.rope_write, before attending.
    Q_REGS (with ROPE_WRITE; BLOCK_HALF the half head exactly): the query rows rotated in
    registers into the tile the program attends with (_rope_rows), no scratch.
    """
    pdl_start(USE_PDL)
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor may pass a Python float as fp64
    b = (pid_bh // kv_heads).to(tl.int64)  # b * stride_kb can pass 2**31 in a big cache
    kvh = pid_bh % kv_heads
    L = tl.load(lengths_ptr + b).to(tl.int32)
    if ROPE_WRITE:
        hd = 2 * half
        heads = kv_heads * G
        for tt in range(0, T):
            tok = b * stride_xb + tt * stride_xt
            cos1, sin1, cos2, sin2 = _rope_tables(cos_ptr + b * stride_cb + tt * stride_ct,
                                                  sin_ptr + b * stride_cb + tt * stride_ct, half, BLOCK_HALF)
            if not Q_REGS:
                _rope_heads(qkv_ptr, q_ptr, tok + kvh * G * hd, b * stride_qb + tt * stride_qt + kvh * G * stride_qh,
                            G, hd, half, cos1, sin1, cos2, sin2, BLOCK_G, BLOCK_HALF, stride_qh)
            slot = tl.minimum(tl.load(pos_ptr + b * stride_pb + tt * stride_pt).to(tl.int64), S - 1)
            if (slot >= pid_s * keys_per_split) & (slot < (pid_s + 1) * keys_per_split):
                _rope_heads(qkv_ptr, k_ptr, tok + (heads + kvh) * hd,
                            b * stride_kb + kvh * stride_kh + slot * stride_ks, 1, hd, half,
                            cos1, sin1, cos2, sin2, 1, BLOCK_HALF)
                offs_v = tl.arange(0, 2 * BLOCK_HALF)
                v_new = tl.load(qkv_ptr + tok + (heads + kv_heads + kvh) * hd + offs_v, mask=offs_v < hd)
                tl.store(v_ptr + b * stride_vb + kvh * stride_vh + slot * stride_vs + offs_v, v_new,
                         mask=offs_v < hd)
        tl.debug_barrier()  # the rotated q and the new keys written before any thread reads them

    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_valid = rows < T * G
    t = rows // G
    h = kvh * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    if ROPE_WRITE and Q_REGS:
        q = _rope_rows(qkv_ptr + b * stride_xb, cos_ptr + b * stride_cb, sin_ptr + b * stride_cb, t, h, row_valid,
                       stride_xt, stride_ct, half, q_ptr.dtype.element_ty, BLOCK_Q, BLOCK_HALF)
    else:
        q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                    mask=row_valid[:, None] & d_valid[None, :], other=0.0)

    start = pid_s * keys_per_split
    if HAS_TREE:  # ancestors may sit in any of the N new slots
        end = tl.minimum(start + keys_per_split, L + N)
    else:  # the last key these rows may see is L + t_max
        t_max = tl.minimum((pid_q * BLOCK_Q + BLOCK_Q - 1) // G, T - 1)
        end = tl.minimum(start + keys_per_split, L + t_max + 1)
    if SEGMENTED:  # keys before every row's segment: none of the block's business
        seg_lo = tl.load(seg_ptr + b * stride_sb + t * stride_st, mask=row_valid, other=0).to(tl.int32)
        block_lo = tl.min(tl.where(row_valid, seg_lo, 2147483647), 0)
        start = tl.maximum(start, block_lo // BLOCK_N * BLOCK_N)

    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    if ROW_START:
        first = tl.load(row_ptr + b).to(tl.int64)
        k_base += first * stride_ks
        v_base += first * stride_vs
    tree_base = tree_ptr + b * stride_mb
    m_i = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)

    full_end = start
    if WHOLE_TILES and not SEGMENTED:
        full_end = start + tl.maximum(tl.minimum(end, L) - start, 0) // BLOCK_N * BLOCK_N
        # Tile pointers from the scalar key offset: no pointer tensors carried through the loop.
        k_offs = offs_n[None, :] * stride_ks + offs_d[:, None]  # (D, N)
        v_offs = offs_n[:, None] * stride_vs + offs_d[None, :]  # (N, D)
        # Every row sees every key here: scores stay finite, so no -inf guards either.
        for s0 in range(start, full_end, BLOCK_N):
            k = _load_tile(k_base + s0 * stride_ks + k_offs, d_valid[:, None], HEAD_DIM == BLOCK_D).to(q.dtype)  # (D, N)
            if IEEE:
                scores = tl.dot(q, k, input_precision="ieee")
            else:
                scores = tl.dot(q, k)
            m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
            p = tl.exp2(scores * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_tile(v_base + s0 * stride_vs + v_offs, d_valid[None, :], HEAD_DIM == BLOCK_D).to(q.dtype)  # (N, D)
            if IEEE:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

    for s0 in range(full_end, end, BLOCK_N):
        offs_s = s0 + offs_n
        s_valid = offs_s < end
        if HAS_TREE:
            j = offs_s - L
            key_new = ((j >= 0) & s_valid)[None, :]
            if (BLOCK_Q % G == 0) and ((G & (G - 1)) == 0):  # load each token's mask row once, not G times
                tq = pid_q * (BLOCK_Q // G) + tl.arange(0, BLOCK_Q // G)
                ancestor = tl.load(tree_base + (tq[:, None] * stride_mt + j[None, :] * stride_mj),
                                   mask=(tq < T)[:, None] & key_new, other=0)  # (BLOCK_Q // G, BLOCK_N)
                ancestor = tl.reshape(tl.broadcast_to(ancestor[:, None, :], (BLOCK_Q // G, G, BLOCK_N)),
                                      (BLOCK_Q, BLOCK_N))
            else:
                ancestor = tl.load(tree_base + (t[:, None] * stride_mt + j[None, :] * stride_mj),
                                   mask=row_valid[:, None] & key_new, other=0)
            allowed = ((offs_s < L)[None, :] | (ancestor != 0)) & s_valid[None, :]
            if tl.max(tl.max(allowed.to(tl.int32), 1), 0) > 0:  # no row of the block sees this tile: skip it
                acc, l_i, m_i = _attend_masked_tile(q, k_base, v_base, stride_ks, stride_vs, offs_s, s_valid,
                                                    offs_d, d_valid, L, t, allowed, acc, l_i, m_i, qk_scale,
                                                    HAS_TREE, IEEE)
        elif SEGMENTED:
            allowed = ((offs_s[None, :] <= L + t[:, None]) & (offs_s[None, :] >= seg_lo[:, None])
                       & s_valid[None, :])
            if tl.max(tl.max(allowed.to(tl.int32), 1), 0) > 0:
                acc, l_i, m_i = _attend_masked_tile(q, k_base, v_base, stride_ks, stride_vs, offs_s, s_valid,
                                                    offs_d, d_valid, L, t, allowed, acc, l_i, m_i, qk_scale,
                                                    True, IEEE)
        else:
            acc, l_i, m_i = _attend_masked_tile(q, k_base, v_base, stride_ks, stride_vs, offs_s, s_valid,
                                                offs_d, d_valid, L, t, 0, acc, l_i, m_i, qk_scale, HAS_TREE, IEEE)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if SPLIT:
        part = (pid_bh * num_splits + pid_s) * (T * G) + rows
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=row_valid[:, None] & d_valid[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(part_lse_ptr + part, lse, mask=row_valid)
    else:
        tl.store(out_ptr + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _rope_rows(qkv_row, cos_row, sin_row, t, h, row_valid, stride_xt, stride_ct, half, dtype: tl.constexpr,
               BLOCK_Q: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Query rows (token t, head h) of one batch row's QKV output rotated, (BLOCK_Q, 2 ·
    BLOCK_HALF) in dtype (BLOCK_HALF == half): fused._rotate's values, as _rope_heads
    stores them, the two halves joined side by side in registers."""
    offs = tl.arange(0, BLOCK_HALF)
    x_ptrs = qkv_row + t[:, None] * stride_xt + h[:, None] * (2 * half) + offs[None, :]
    c_ptrs = cos_row + t[:, None] * stride_ct + offs[None, :]
    s_ptrs = sin_row + t[:, None] * stride_ct + offs[None, :]
    m = row_valid[:, None]
    x1 = tl.load(x_ptrs, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + half, mask=m, other=0.0).to(tl.float32)
    cos1 = tl.load(c_ptrs, mask=m, other=0.0).to(tl.float32)
    cos2 = tl.load(c_ptrs + half, mask=m, other=0.0).to(tl.float32)
    sin1 = tl.load(s_ptrs, mask=m, other=0.0).to(tl.float32)
    sin2 = tl.load(s_ptrs + half, mask=m, other=0.0).to(tl.float32)
    out1, out2 = _rotate(x1, x2, cos1, sin1, cos2, sin2, dtype)
    return tl.reshape(tl.permute(tl.join(out1.to(dtype), out2.to(dtype)), (0, 2, 1)), (BLOCK_Q, 2 * BLOCK_HALF))


@triton.jit
def _combine_splits_kernel(
    # pointers
    part_o_ptr, part_lse_ptr, out_ptr,
    # sizes
    T, kv_heads, num_splits,
    # strides
    stride_ob, stride_ot, stride_oh,
    # meta-parameters
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[row] = sum_s exp2(lse_s - lse) * o_s over the splits of one (b, kv head, row)."""
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)
    b = (pid_bh // kv_heads).to(tl.int64)
    t = row // G
    h = (pid_bh % kv_heads) * G + row % G
    splits = tl.arange(0, BLOCK_SPLITS)
    part = (pid_bh * num_splits + splits) * (T * G) + row
    lse = tl.load(part_lse_ptr + part, mask=splits < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    offs_d = tl.arange(0, BLOCK_D)
    o = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                mask=(splits[:, None] < num_splits) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    o = tl.sum(o * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + b * stride_ob + t * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# ---------------------------------------------------------------------------------------
# Wrapper


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:  # a name of its own: tests and the tuner stand in a GPU's
    return num_sms(device)


def launch_config(B: int, KV: int, T: int, G: int, head_dim: int, max_keys: int, device: torch.device,
                  num_splits: Optional[int] = None, elem_size: int = 2) -> dict:
    """Query block, key block and prefix splits for T * G query rows per (row, kv head).

    Few rows (decode, short chains) are bound by the K/V bytes: small query blocks, mma.sync,
    and about two programs per SM so that enough loads are in flight. Many rows (trees, long
    chains) are bound by the tensor cores: 64-row blocks of 4 warps (one warpgroup, wgmma,
    two CTAs per SM), with the prefix split so that the programs come close to a whole
    number of waves. fp32 (exact dots on CUDA cores, for tests) takes half-size key tiles.
    """
    rows = T * G
    sms = _num_sms(device)
    block_n = 64 if head_dim <= 128 else 32

    def stages(block_q, n):  # n pipeline stages of K/V tiles where shared memory holds them
        tile = (block_q + 2 * n * block_n) * head_dim * elem_size
        return n if tile <= _moe.max_shared_memory(device) else 2

    if rows >= 128 and elem_size == 4:
        cfg = dict(BLOCK_Q=128, BLOCK_N=32, num_warps=8, num_stages=2, WHOLE_TILES=True)
        slots = sms
    elif rows >= 64:
        # 64-row blocks of 4 warps, 3 stages, two programs an SM: faster on trees than 128-row
        # blocks of 8 warps (tools/tune_kernels.py --attention).
        cfg = dict(BLOCK_Q=64, BLOCK_N=block_n, num_warps=4, num_stages=stages(64, 3), WHOLE_TILES=True)
        slots = 2 * sms
    else:
        block_q = max(16, triton.next_power_of_2(rows))
        # A third stage keeps more K/V loads in flight for 32-row blocks (chain verification);
        # 64-row ones were fastest with two.
        cfg = dict(BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=4,
                   num_stages=stages(block_q, 3) if block_q <= 32 else 2, WHOLE_TILES=False)
        slots = None
    block_n = cfg["BLOCK_N"]  # fp32: 32
    q_blocks = triton.cdiv(rows, cfg["BLOCK_Q"])
    base = B * KV * q_blocks
    max_splits = max(1, min(triton.cdiv(max_keys, MIN_KEYS_PER_SPLIT), triton.cdiv(max_keys, block_n)))
    if num_splits is None and slots is None:
        # About two programs an SM, rounded down (a grid just under two waves ran faster
        # unsplit than split in two).
        num_splits = max(1, min((2 * sms) // base, max_splits))
    elif num_splits is None:
        # Waves of equal programs: time ~ ceil(programs / slots) / splits; fewest splits on a tie.
        def waves_per_split(s):
            return triton.cdiv(base * s, slots) / s
        best = min(waves_per_split(s) for s in range(1, max_splits + 1))
        num_splits = next(s for s in range(1, max_splits + 1) if waves_per_split(s) <= 1.05 * best)
    num_splits = max(1, min(num_splits, triton.cdiv(max_keys, block_n)))
    keys_per_split = triton.cdiv(triton.cdiv(max_keys, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_keys, keys_per_split)
    return dict(cfg, q_blocks=q_blocks, num_splits=num_splits, keys_per_split=keys_per_split)


def _check(q, k_cache, v_cache, lengths, tree_mask):
    B, T, H, hd = q.shape
    assert k_cache.dim() == 4 and k_cache.shape[0] == B and k_cache.shape[3] == hd, "k_cache is [B, KV, S, hd]"
    assert v_cache.shape == k_cache.shape and H % k_cache.shape[1] == 0
    assert k_cache.dtype == v_cache.dtype == q.dtype, "keys and values in q's dtype"
    assert q.stride(3) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    assert lengths.shape == (B,)
    if tree_mask is not None:
        assert tree_mask.dim() == 3 and tree_mask.shape[:2] == (B, T) and tree_mask.shape[2] >= T
        assert tree_mask.dtype == torch.bool


def _verify_attention_into(q, k_cache, v_cache, lengths, tree_mask, scale: float, kv_len: int, out,
                           num_splits: Optional[int] = None, config: Optional[dict] = None,
                           seg_start: Optional[torch.Tensor] = None,
                           row_start: Optional[torch.Tensor] = None, rope: Optional[tuple] = None,
                           q_in_registers: Optional[bool] = None, pdl: bool = True):
    """config: launch_config's dict with some entries replaced (tools/tune_kernels.py --attention).
    rope: (qkv, cos, sin, positions) for ROPE_WRITE (rope_verify_attention): q is then the
    scratch the rotated queries go to (unless they rotate in registers: _q_in_registers).
    pdl: a programmatic dependent launch where the device has them (kernels.launch.pdl_launch)."""
    B, T, H, hd = q.shape
    KV = k_cache.shape[1]
    G = H // KV
    # Packed prompts: a query sees its own prompt, not the whole prefix, so splitting the
    # keys would mostly make programs with nothing to do.
    cfg = launch_config(B, KV, T, G, hd, kv_len, q.device,
                        1 if seg_start is not None and num_splits is None else num_splits, q.element_size())
    if config:
        cfg = dict(cfg, **config)
        cfg["q_blocks"] = triton.cdiv(T * G, cfg["BLOCK_Q"])
        cfg["keys_per_split"] = triton.cdiv(triton.cdiv(kv_len, cfg["num_splits"]), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
        cfg["num_splits"] = triton.cdiv(kv_len, cfg["keys_per_split"])
    split = cfg["num_splits"] > 1
    if split:
        part_o = torch.empty((B * KV * cfg["num_splits"] * T * G, hd), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B * KV * cfg["num_splits"] * T * G,), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    # The bool mask itself (Triton loads *i1 as bytes): no uint8 copy, no extra launch per call.
    tree = tree_mask if tree_mask is not None else lengths  # lengths: unused pointer
    tree_strides = tree.stride() if tree_mask is not None else (0, 0, 0)
    N = tree_mask.shape[2] if tree_mask is not None else T
    seg = seg_start if seg_start is not None else lengths  # lengths: unused pointer
    seg_strides = seg_start.stride() if seg_start is not None else (0, 0)
    first = row_start if row_start is not None else lengths  # lengths: unused pointer
    if rope is not None:
        assert cfg["q_blocks"] == 1, "rope_verify_attention: one query block a row and kv head"
        qkv, cos, sin, positions = rope
        rope_strides = (qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(1),
                        positions.stride(0), positions.stride(1))
    else:
        qkv = cos = sin = positions = lengths  # unused pointers
        rope_strides = (0,) * 6
    grid = (B * KV, cfg["q_blocks"], cfg["num_splits"])
    _launcher(_verify_attention_kernel, q)[grid](
        q, k_cache, v_cache, lengths, tree, seg, first, out, part_o, part_lse, qkv, cos, sin, positions,
        T, N, KV, cfg["num_splits"], cfg["keys_per_split"], scale * 1.4426950408889634,  # log2(e): exp2 below
        k_cache.shape[2], hd // 2, *rope_strides,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        tree_strides[0], tree_strides[1], tree_strides[2],
        seg_strides[0], seg_strides[1],
        out.stride(0), out.stride(1), out.stride(2),
        G=G, HEAD_DIM=hd, HAS_TREE=tree_mask is not None, SEGMENTED=seg_start is not None, SPLIT=split,
        ROW_START=row_start is not None,
        WHOLE_TILES=cfg["WHOLE_TILES"],
        IEEE=q.dtype == torch.float32, BLOCK_Q=cfg["BLOCK_Q"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=triton.next_power_of_2(hd),
        ROPE_WRITE=rope is not None, BLOCK_G=triton.next_power_of_2(G), BLOCK_HALF=triton.next_power_of_2(max(hd // 2, 1)),
        Q_REGS=rope is not None and _q_in_registers(B * T, hd, q_in_registers),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(q, pdl),
    )
    if split:
        _launcher(_combine_splits_kernel, q)[(B * KV, T * G)](
            part_o, part_lse, out,
            T, KV, cfg["num_splits"],
            out.stride(0), out.stride(1), out.stride(2),
            G=G, HEAD_DIM=hd, BLOCK_SPLITS=triton.next_power_of_2(cfg["num_splits"]),
            BLOCK_D=triton.next_power_of_2(hd), num_warps=4,
        )
    return out


def _register_op():
    """specoff::verify_attention as a torch op: traceable by torch.compile(fullgraph=True)."""
    # Under TRITON_INTERPRET wrap_triton returns the bare kernel, invisible to tracing: stay opaque.
    if hasattr(torch.library, "triton_op") and os.environ.get("TRITON_INTERPRET") != "1":
        @torch.library.triton_op("specoff::verify_attention", mutates_args=())
        def verify_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                lengths: torch.Tensor, tree_mask: Optional[torch.Tensor], scale: float,
                                kv_len: int, row_start: Optional[torch.Tensor] = None,
                                pdl: bool = True) -> torch.Tensor:
            out = torch.empty_like(q)
            return _verify_attention_into(q, k_cache, v_cache, lengths, tree_mask, scale, kv_len, out,
                                          row_start=row_start, pdl=pdl)
        return verify_attention_op

    @torch.library.custom_op("specoff::verify_attention", mutates_args=())
    def verify_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            lengths: torch.Tensor, tree_mask: Optional[torch.Tensor], scale: float,
                            kv_len: int, row_start: Optional[torch.Tensor] = None,
                            pdl: bool = True) -> torch.Tensor:
        out = torch.empty_like(q)
        return _verify_attention_into(q, k_cache, v_cache, lengths, tree_mask, scale, kv_len, out,
                                      row_start=row_start, pdl=pdl)

    @verify_attention_op.register_fake
    def _(q, k_cache, v_cache, lengths, tree_mask, scale, kv_len, row_start=None, pdl=True):
        return torch.empty_like(q)
    return verify_attention_op


_verify_attention_op = _register_op()


def verify_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     tree_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     kv_len: Optional[int] = None, *, out: Optional[torch.Tensor] = None,
                     num_splits: Optional[int] = None,
                     seg_start: Optional[torch.Tensor] = None,
                     row_start: Optional[torch.Tensor] = None, pdl: bool = True) -> torch.Tensor:
    """Attention of q [B, T, H, hd] over cached keys 0 .. lengths[b] + T - 1 -> [B, T, H, hd].

    Chain (tree_mask None): query t sees keys s < lengths[b] + t + 1, and with `seg_start`
    [B, T] (packed prompts) only those from seg_start[b, t] on. Tree (tree_mask
    [B, T, N], N >= T new keys already in the cache): query t sees the prefix s < lengths[b]
    and new key lengths[b] + j iff tree_mask[b, t, j]. kv_len is a
    host-side bound on max(lengths) + T (or + N) that sizes the grid (default: the cache size S).
    `row_start` [B] (long): batch b's keys begin row_start[b] slots into k_cache[b] (a pool
    shared by the rows, viewed with stride 0 over B: kvcache.SegmentKVCache).
    With `out`, `num_splits` or `seg_start` the kernels run eagerly; otherwise the registered
    op runs. `pdl`: a programmatic dependent launch where the device has them (kernels.launch.pdl_launch).
    """
    _check(q, k_cache, v_cache, lengths, tree_mask)
    lengths = lengths.contiguous()  # the kernels index it as a flat array
    if row_start is not None:
        assert row_start.shape == lengths.shape, "row_start is [B]"
        row_start = row_start.contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kv_len = k_cache.shape[2] if kv_len is None else min(int(kv_len), k_cache.shape[2])
    if seg_start is not None:
        if tree_mask is not None:
            raise ValueError("seg_start is for chains: no tree_mask with it")
        assert seg_start.shape == q.shape[:2], "seg_start is [B, T]"
        out = torch.empty_like(q) if out is None else out
        return _verify_attention_into(q, k_cache, v_cache, lengths, None, scale, kv_len, out,
                                      num_splits, seg_start=seg_start, row_start=row_start, pdl=pdl)
    if out is None and num_splits is None:
        return _verify_attention_op(q, k_cache, v_cache, lengths, tree_mask, scale, kv_len, row_start, pdl)
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.dtype == q.dtype
    return _verify_attention_into(q, k_cache, v_cache, lengths, tree_mask, scale, kv_len, out, num_splits,
                                  row_start=row_start, pdl=pdl)


def rope_verify_attention(qkv: torch.Tensor, n_heads: int, n_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                          positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          kv_len: Optional[int] = None, scale: Optional[float] = None, *,
                          q_in_registers: Optional[bool] = None, pdl: bool = True) -> torch.Tensor:
    """fused.rope_write, then verify_attention of the chain, in one launch: qkv (B, T, (H + 2 KV)
    hd), the QKV projection's output; cos, sin broadcastable to (B, T, 1, hd); positions (B, T)
    consecutive in each row (lengths = positions[:, 0]). The rotated k and v land in the
    layer's cache at positions clamped to S - 1; returns the attention (B, T, H, hd). Where
    the rows' queries take more than one query block, the two launches run instead. Eager
    launches only (the decoder takes it outside tracing). `q_in_registers`: the query rows
    rotated in registers, not through a scratch tensor (None: from Q_REGISTERS_MIN_ROWS rows
    a launch; either way the same bits); `pdl`: as verify_attention's."""
    B, T, width = qkv.shape
    H, KV = n_heads, n_kv_heads
    hd = width // (H + 2 * KV)
    assert width == (H + 2 * KV) * hd and hd % 2 == 0, f"qkv width {width} is not (H + 2 KV) heads"
    assert qkv.stride(2) == 1 and k_cache.dtype == v_cache.dtype == qkv.dtype, "a cache in qkv's dtype"
    assert positions.shape == (B, T) and k_cache.shape[1] == KV and H % KV == 0
    scale = hd ** -0.5 if scale is None else float(scale)
    kv_len = k_cache.shape[2] if kv_len is None else min(int(kv_len), k_cache.shape[2])
    lengths = positions[:, 0].contiguous()
    q_raw = qkv[..., :H * hd].view(B, T, H, hd)
    if launch_config(B, KV, T, H // KV, hd, kv_len, qkv.device, None, qkv.element_size())["q_blocks"] != 1:
        k_raw = qkv[..., H * hd:(H + KV) * hd].view(B, T, KV, hd)
        v_raw = qkv[..., (H + KV) * hd:].view(B, T, KV, hd)
        q = rope_write(q_raw, k_raw, v_raw, cos, sin, k_cache, v_cache, positions, pdl=pdl)
        return verify_attention(q, k_cache, v_cache, lengths, scale=scale, kv_len=kv_len, pdl=pdl)
    _check(q_raw, k_cache, v_cache, lengths, None)
    cos, sin = _token_tables(cos, B, T, hd), _token_tables(sin, B, T, hd)
    assert cos.stride()[:2] == sin.stride()[:2], "cos and sin laid out alike"
    q = torch.empty(B, T, H, hd, dtype=qkv.dtype, device=qkv.device)  # the rotated queries
    out = torch.empty_like(q)
    return _verify_attention_into(q, k_cache, v_cache, lengths, None, scale, kv_len, out,
                                  rope=(qkv, cos, sin, positions), q_in_registers=q_in_registers, pdl=pdl)


def attention_mask(lengths: torch.Tensor, T: int, kv_len: int, tree_mask: Optional[torch.Tensor] = None,
                   seg_start: Optional[torch.Tensor] = None):
    """Boolean [B, T, kv_len] mask: which cached key each new query may see."""
    pos = torch.arange(kv_len, device=lengths.device)[None, None, :]  # (1, 1, S)
    L = lengths.view(-1, 1, 1)  # (B, 1, 1)
    t = torch.arange(T, device=lengths.device)[None, :, None]  # (1, T, 1)
    if tree_mask is None:
        seen = pos < L + t + 1
        return seen if seg_start is None else seen & (pos >= seg_start[:, :, None])
    N = tree_mask.shape[2]  # new keys, N >= T
    j = pos - L
    is_new = (j >= 0) & (j < N)
    ancestor = torch.gather(tree_mask, 2, j.clamp(0, N - 1).expand(-1, T, -1))  # (B, T, S)
    return (pos < L) | (is_new & ancestor)


def verify_attention_ref(q, k_cache, v_cache, lengths, tree_mask=None, scale=None, kv_len=None,
                         seg_start=None, row_start=None):
    """Plain torch in float32: the boolean mask and scaled_dot_product_attention."""
    B, T, H, hd = q.shape
    kv_len = k_cache.shape[2] if kv_len is None else kv_len
    if row_start is not None:  # each row's own keys, gathered from the shared pool
        at = (row_start[:, None] + torch.arange(kv_len, device=q.device)).clamp(max=k_cache.shape[2] - 1)
        at = at[:, None, :, None].expand(B, k_cache.shape[1], kv_len, hd)
        k_cache, v_cache = (c.gather(2, at) for c in (k_cache, v_cache))
    G = H // k_cache.shape[1]
    k = k_cache[:, :, :kv_len].float().repeat_interleave(G, dim=1)  # (B, H, S, hd)
    v = v_cache[:, :, :kv_len].float().repeat_interleave(G, dim=1)
    mask = attention_mask(lengths, T, kv_len, tree_mask, seg_start)[:, None]  # (B, 1, T, S)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k, v, attn_mask=mask, scale=scale)  # (B, H, T, hd)
    return out.transpose(1, 2).to(q.dtype)
