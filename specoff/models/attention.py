"""Attention over a cache, and the masks a pass attends under.

A causal step, a chain verification or a prefill chunk goes to the verification kernel where
KernelOptions lets it (kernels.attention.verify_attention), else to torch's masked
attention; a tree (TreeMask: SpecExec, arXiv 2406.02532 §3) or prompts packed in one row
(SegmentMask) carry their own masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels.attention import attention_mask, verify_attention
from ..kvcache import KVCache
from ..options import KernelOptions


def use_chain_kernel(q: torch.Tensor, causal: bool, kernels: KernelOptions) -> bool:
    """Whether q (B, H, T, hd) under the causal mask attends with verify_attention
    (kernels.chain_attention): decode steps, verification and prefill chunks alike, since
    torch's masked attention may pick a backend that plans each new shape on the host."""
    return causal and kernels.runs(kernels.chain_attention, q)


def attend(q, keys, values, mask, positions, kv_len, causal: bool, kernels: KernelOptions = KernelOptions()):
    """q (B, H, T, hd) over keys/values (B, KV, >= kv_len, hd) holding the new tokens at
    `positions` (B, T), under `mask` (B, 1, T, kv_len). A `causal` mask (positions run
    consecutively in each row) may go to the verification kernel instead: the row's keys
    below positions[b, 0] + t + 1, as the mask says."""
    if use_chain_kernel(q, causal, kernels):
        y = verify_attention(q.transpose(1, 2), keys, values, positions[:, 0], kv_len=kv_len, pdl=kernels.pdl)
        return y.transpose(1, 2)
    keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                          enable_gqa=keys.shape[1] != q.shape[1])


def cached_attention(q, k, v, mask, cache: KVCache, layer: int, positions, kv_len,
                     causal: bool = True, *, kernels: KernelOptions = KernelOptions()):
    """Write k, v (B, KV, T, hd) at `positions` (None: already written, rope_write), then
    attend over the row's cache."""
    if k is not None:
        cache.write(layer, k, v, positions)
    if cache.row_start is not None:  # rows of a shared pool (SegmentKVCache)
        if use_chain_kernel(q, causal, kernels):
            y = verify_attention(q.transpose(1, 2), cache.k[layer], cache.v[layer], positions[:, 0],
                                 kv_len=kv_len, row_start=cache.row_start, pdl=kernels.pdl)
            return y.transpose(1, 2)
        keys, values = cache.dense(layer, kv_len)
        return attend(q, keys.to(q.dtype), values.to(q.dtype), mask, positions, kv_len, False, kernels)
    keys, values = cache.k[layer], cache.v[layer]  # (B, KV, S, hd)
    if keys.dtype != q.dtype:
        keys, values = keys[:, :, :kv_len].to(q.dtype), values[:, :, :kv_len].to(q.dtype)
    return attend(q, keys, values, mask, positions, kv_len, causal, kernels)


@dataclass(eq=False)
class TreeMask:
    """Tree attention (SpecExec, arXiv 2406.02532 §3): query t of row b sees the row's cached
    prefix (keys < lengths[b]) and the slot lengths[b] + j of every j with ancestors[b, t, j]."""
    lengths: torch.Tensor  # (B,)
    ancestors: torch.Tensor  # (B, T, N) bool, N >= T tree slots
    _dense: Optional[tuple] = None  # (kv_len, (B, 1, T, kv_len) mask), built once per pass

    def dense(self, kv_len: int) -> torch.Tensor:
        """The (B, 1, T, kv_len) boolean mask for plain masked attention."""
        if self._dense is None or self._dense[0] != kv_len:
            B, T, N = self.ancestors.shape
            device = self.lengths.device
            keys = torch.arange(kv_len, device=device)
            prefix = (keys[None, None, :] < self.lengths[:, None, None]).expand(B, T, kv_len)
            slots = (self.lengths[:, None] + torch.arange(N, device=device))[:, None, :]
            nodes = torch.zeros(B, T, kv_len, dtype=torch.bool, device=device)
            nodes.scatter_(2, slots.expand(B, T, N), self.ancestors)
            self._dense = (kv_len, (prefix | nodes)[:, None])
        return self._dense[1]

    def use_kernel(self, x: torch.Tensor, kernels: KernelOptions) -> bool:
        return kernels.runs(kernels.tree_attention, x)

    def attend(self, q, keys, values, kv_len: int, row_start=None, pdl: bool = True) -> torch.Tensor:
        return verify_attention(q, keys, values, self.lengths, self.ancestors, kv_len=kv_len,
                                row_start=row_start, pdl=pdl)


@dataclass(eq=False)
class SegmentMask:
    """Prompts packed one after another in one row (PrefillBatch): the part's query t sits
    at slot lengths[0] + t and sees the slots from its own prompt's first, seg_start[0, t],
    up to its own; never another prompt's."""
    lengths: torch.Tensor  # (1,) the part's first slot
    seg_start: torch.Tensor  # (1, T)

    def dense(self, kv_len: int) -> torch.Tensor:
        T = self.seg_start.shape[1]
        return attention_mask(self.lengths, T, kv_len, seg_start=self.seg_start)[:, None]

    def use_kernel(self, x: torch.Tensor, kernels: KernelOptions) -> bool:
        return kernels.runs(kernels.chain_attention, x)

    def attend(self, q, keys, values, kv_len: int, row_start=None, pdl: bool = True) -> torch.Tensor:
        return verify_attention(q, keys, values, self.lengths, kv_len=kv_len,
                                seg_start=self.seg_start, row_start=row_start, pdl=pdl)


def causal_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B, 1, T, kv_len): a token at position p sees the cached keys at positions <= p."""
    keys = torch.arange(kv_len, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]
