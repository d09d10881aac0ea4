"""Preallocated KV cache with a length per row.

Rows of one batch hold different numbers of tokens (different prompt lengths, different
numbers of accepted draft tokens), so each row writes at its own offset. A forward pass
writes its new tokens at `lengths[b] + t` and never moves `lengths`; the caller then
advances each row by the number of tokens it keeps. Dropping rejected tokens is therefore
free: the row simply does not advance over them, and the next write overwrites them.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .hostmem import HOST_BLOCKS, host_zeros

def _zeros(shape, dtype, device, pin_memory: bool) -> torch.Tensor:
    if pin_memory:
        return host_zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


class _CudaArray:
    """__cuda_array_interface__ (v3) of raw device-addressable memory."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = dict(shape=(nbytes,), typestr="|u1", data=(ptr, False),
                                             strides=None, version=3)


def device_alias(t: torch.Tensor, device) -> torch.Tensor:
    """A CUDA tensor over the memory of `t`, a contiguous tensor in pinned host memory.

    With unified addressing (every 64-bit CUDA platform) pinned host memory is mapped into
    the device's address space at its host address, so a kernel can read and write it
    directly across the bus. The alias does not own the memory: `t` must outlive it."""
    if not ((t.is_pinned() or HOST_BLOCKS.holds(t)) and t.is_contiguous()):
        raise ValueError("device_alias needs a contiguous tensor in pinned host memory")
    raw = torch.as_tensor(_CudaArray(t.data_ptr(), t.numel() * t.element_size()),
                          device=torch.device(device))
    return raw.view(t.dtype).view(t.shape)


class KVCache(torch.nn.Module):
    def __init__(self, n_layers: int, rows: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, pin_memory: bool = False, lengths_device=None):
        super().__init__()
        shape = (n_layers, rows, n_kv_heads, max_len, head_dim)  # (L, B, KV, S, hd)
        self.register_buffer("k", _zeros(shape, dtype, device, pin_memory), persistent=False)
        self.register_buffer("v", _zeros(shape, dtype, device, pin_memory), persistent=False)
        # Lengths live where positions are computed: the compute device, even when the
        # cache itself sits in host memory.
        self.register_buffer("lengths", torch.zeros(rows, dtype=torch.long,
                                                    device=lengths_device or device),
                             persistent=False)
        self.max_len = max_len
        self._mapped = None  # (k, v) device views of a pinned host cache (see mapped)
        self.host_reads = None  # models.host_cache.HostCacheReads while a pass reads it ahead
        self.row_start = None  # per-row first slots in a pool shared by the rows (SegmentKVCache)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def positions(self, n_tokens: int) -> torch.Tensor:
        """Absolute positions of the next `n_tokens` tokens of every row: (B, T)."""
        steps = torch.arange(n_tokens, device=self.lengths.device)
        return self.lengths[:, None] + steps

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor,
              positions: torch.Tensor) -> None:
        """Store (B, KV, T, hd) keys/values of layer `layer` at per-row `positions` (B, T)."""
        B, KV, T, hd = k_new.shape
        idx = positions.clamp(max=self.max_len - 1)[:, None, :, None].expand(B, KV, T, hd)
        self.k[layer].scatter_(2, idx, k_new.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v_new.to(self.v.dtype))

    def dense(self, layer: int, kv_len: int) -> tuple:
        """(keys, values) of layer `layer` as (B, KV, >= kv_len, hd) tensors, for plain torch."""
        return self.k[layer], self.v[layer]

    def mapped(self) -> tuple:
        """(k, v) as device tensors over this cache's pinned host memory, for a cache that
        sits in host memory beside a CUDA device: kernels write new tokens straight into
        it across the bus (posted writes, the bus's otherwise idle device→host direction),
        ordered on their stream like any other kernel, with no staging, no host thread and
        no wait on the host (models.host_cache.streamed_attention, models.passes.PrefillStage)."""
        if self._mapped is None:
            self._mapped = (device_alias(self.k, self.lengths.device),
                            device_alias(self.v, self.lengths.device))
        return self._mapped

    def advance(self, n) -> None:
        """Keep the next `n` written tokens of each row (an int or a LongTensor of shape (B,))."""
        self.lengths += n

    def rollback(self, n) -> None:
        """Forget the last `n` tokens of each row."""
        self.lengths -= n

    def reset(self, rows=None) -> None:
        """Empty all rows, or the given rows (to hand a slot to a new prompt)."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0


class SegmentKVCache(KVCache):
    """Rows of different lengths in one pool per layer: row b's tokens sit at pool slots
    row_start[b] .. row_start[b] + row_size[b] - 1, so the cache holds what its rows need
    rather than rows × the longest row. `k`, `v` are (L, B, KV, P, hd) views of the pools
    (L, KV, P, hd) with stride 0 over B: the attention kernels add row_start[b] to their key
    offsets (verify_attention(row_start=)); torch paths gather a row's keys (dense) and
    writes go to the pool (write, put_rows, put_tokens). A write past a row's segment lands
    on its last slot, which the caller keeps unused (the tree scheduler sizes segments one slot over).

    Segments are handed out by the caller (the speculation schedulers, SegmentAllocator):
    `assign(rows, starts, sizes)` before the rows are used. On the GPU the draft's cache in
    tree mode: HumanEval prompts average 113 tokens against a longest of 340, so the draft's
    cache of a 24 GiB throughput run holds about twice the rows at the same size."""

    def __init__(self, n_layers: int, rows: int, pool: int, max_len: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, pools: Optional[tuple] = None,
                 pin_memory: bool = False, lengths_device=None):
        """`pools`: another SegmentKVCache's (k_pool, v_pool), shared (rows of two groups
        in one pool: a row moves between them by its segment's address alone). A pool in
        pinned host memory (`pin_memory`) keeps lengths and segments on `lengths_device`,
        where the kernels that write it across the bus run (KVCache.mapped)."""
        torch.nn.Module.__init__(self)
        shape = (n_layers, n_kv_heads, pool, head_dim)
        k, v = pools or (_zeros(shape, dtype, device, pin_memory),
                         _zeros(shape, dtype, device, pin_memory))
        device = lengths_device or device
        if tuple(k.shape) != shape or tuple(v.shape) != shape:
            raise ValueError(f"shared pools of shape {tuple(k.shape)}, not {shape}")
        self.register_buffer("k_pool", k, persistent=False)
        self.register_buffer("v_pool", v, persistent=False)
        self.k = self.k_pool[:, None].expand(n_layers, rows, n_kv_heads, pool, head_dim)
        self.v = self.v_pool[:, None].expand(n_layers, rows, n_kv_heads, pool, head_dim)
        self.register_buffer("lengths", torch.zeros(rows, dtype=torch.long, device=device),
                             persistent=False)
        # Updated in place only: captured CUDA graphs read them where they are.
        self.register_buffer("row_start", torch.zeros(rows, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("row_end", torch.full((rows,), pool - 1, dtype=torch.long,
                                                   device=device), persistent=False)
        self.max_len = max_len  # the longest segment: the bound on a row's positions
        self.pool = pool
        self._mapped = None
        self.host_reads = None

    def assign(self, rows, starts, sizes) -> None:
        """Rows `rows` (ints) take the segments starts[i] .. starts[i] + sizes[i] - 1."""
        if not len(rows):
            return
        if max(sizes) > self.max_len or min(starts) < 0 or max(
                a + n for a, n in zip(starts, sizes)) > self.pool:
            raise ValueError("a segment past the pool or longer than max_len")
        at = torch.tensor(list(rows), device=self.row_start.device)
        first = torch.tensor(list(starts), device=at.device)
        self.row_start[at] = first
        self.row_end[at] = first + torch.tensor(list(sizes), device=at.device) - 1

    def _slots(self, rows, positions: torch.Tensor) -> torch.Tensor:
        """Pool slots of `positions` (n, T) of `rows` (n,) (all rows when None)."""
        start = self.row_start if rows is None else self.row_start[rows]
        end = self.row_end if rows is None else self.row_end[rows]
        return torch.minimum(start[:, None] + positions, end[:, None])

    def pools_at(self, device) -> tuple:
        """(k_pool, v_pool) as tensors on `device`: the pools, or their device alias."""
        if self.k_pool.device.type == torch.device(device).type:
            return self.k_pool, self.v_pool
        return self.mapped()

    def _scatter(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """K/V (KV, n, hd) at pool slots (n,) (across the bus into a pool in host memory)."""
        KV, n, hd = k.shape
        idx = slots.reshape(1, n, 1).expand(KV, n, hd)
        for pool, new in zip(self.pools_at(slots.device), (k, v)):
            pool[layer].scatter_(1, idx, new.to(pool.dtype))

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor,
              positions: torch.Tensor) -> None:
        B, KV, T, hd = k_new.shape
        flat = lambda t: t.transpose(0, 1).reshape(KV, B * T, hd)  # noqa: E731
        self._scatter(layer, self._slots(None, positions).reshape(-1), flat(k_new), flat(v_new))

    def put_rows(self, layer: int, rows, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prompts' K/V (n, KV, T, hd) at positions 0..T-1 of `rows` (n,) (all when None)."""
        n, KV, T, hd = k.shape
        rows = None if rows is None else rows.to(self.row_start.device)
        pos = torch.arange(T, device=self.row_start.device).expand(n, T)
        flat = lambda t: t.transpose(0, 1).reshape(KV, n * T, hd)  # noqa: E731
        self._scatter(layer, self._slots(rows, pos).reshape(-1), flat(k), flat(v))

    def put_tokens(self, layer: int, rows: torch.Tensor, positions: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens' K/V (KV, N, hd), token i at row rows[i], position positions[i]."""
        self._scatter(layer, self._slots(rows, positions[:, None])[:, 0], k, v)

    def dense(self, layer: int, kv_len: int) -> tuple:
        B = self.lengths.shape[0]
        pos = torch.arange(kv_len, device=self.row_start.device).expand(B, kv_len)
        slots = self._slots(None, pos)  # (B, kv_len)
        return tuple(pool[layer][:, slots].transpose(0, 1)  # (B, KV, kv_len, hd)
                     for pool in (self.k_pool, self.v_pool))

    def mapped(self) -> tuple:
        """(k_pool, v_pool) as device tensors over pinned host pools (KVCache.mapped)."""
        if self._mapped is None:
            self._mapped = (device_alias(self.k_pool, self.lengths.device),
                            device_alias(self.v_pool, self.lengths.device))
        return self._mapped


class SegmentAllocator:
    """First-fit segments of a pool's slots [lo, hi), on the host."""

    def __init__(self, lo: int, hi: int):
        self.free = [(lo, hi)]  # sorted, disjoint, never adjacent

    def alloc(self, n: int):
        """The first slot of a free run of n slots, or None."""
        for i, (a, b) in enumerate(self.free):
            if b - a >= n:
                if b - a == n:
                    del self.free[i]
                else:
                    self.free[i] = (a + n, b)
                return a
        return None

    def release(self, start: int, n: int) -> None:
        runs = sorted(self.free + [(start, start + n)])
        merged = [runs[0]]
        for a, b in runs[1:]:
            if a < merged[-1][1]:
                raise ValueError(f"slots {a}..{b} released twice")
            if a == merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        self.free = merged

    def take_first(self, needs: Sequence[int]) -> Optional[Tuple[int, int, int]]:
        """(i, first slot, slots) for the first of `needs` a free run holds, allocated; None
        when none fits (a queue's next few prompts: the first that fits goes)."""
        for i, n in enumerate(needs):
            start = self.alloc(n)
            if start is not None:
                return i, start, n
        return None

    @property
    def largest(self) -> int:
        return max((b - a for a, b in self.free), default=0)


def segment_size(prompt: int, max_new_tokens: int, extra: int) -> int:
    """Slots of a row's segment: its prompt, its new tokens, `extra` more in flight (a tree
    parked past them, or a chain's drafts) and one slot that takes writes past the end."""
    return prompt + max_new_tokens + extra + 3


def segment_pool_slots(rows: int, prompts: Sequence[int], max_new_tokens: int, extra: int,
                       slack: float) -> int:
    """Slots of a segment pool for `rows` rows over prompts of these lengths (in queue
    order): an idle segment of `extra` + 3 for every row (a row with nothing to serve still
    rides the passes), and room for the first `rows` prompts at once and for `slack` × the
    mean need of that many rows plus two of the longest (what the rows' needs wander by and
    the pool's fragments)."""
    needs = [segment_size(n, max_new_tokens, extra) for n in prompts]
    serving = min(rows, len(needs))
    mean = sum(needs) / len(needs)
    return rows * (extra + 3) + max(sum(needs[:serving]),
                                    math.ceil(serving * mean * slack) + 2 * max(needs))


def cache_slots(rows: int, prompts: Sequence[int], max_new_tokens: int, extra: int, mode: str,
                slack: float) -> Tuple[int, bool]:
    """(slots, segmented): a cache of rows in segments (segment_pool_slots) or of rows ×
    the longest need, by `mode`: "auto" takes the pool where it is the smaller, "on" and
    "off" force one."""
    dense = rows * (max(prompts) + max_new_tokens + extra + 2)
    if mode == "off":
        return dense, False
    pool = segment_pool_slots(rows, prompts, max_new_tokens, extra, slack)
    segmented = mode == "on" or pool < dense
    return (pool, True) if segmented else (dense, False)
