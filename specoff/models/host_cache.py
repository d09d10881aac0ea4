"""A target's cache in pinned host memory, streamed to the GPU a layer at a time.

Where the plan keeps the target's cache in host memory, each layer's keys and values cross
the bus for attention (a copy stream fetches them ahead, HostCacheReads) and the pass's new
tokens are written into both the device copy and the host cache, by the same kernels across
the bus (KVCache.mapped).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..kernels.attention import verify_attention
from ..kvcache import KVCache
from ..options import KernelOptions
from .attention import TreeMask, attend


def streamed_attention(q, k, v, mask, cache: KVCache, layer: int, positions, kv_len,
                       causal: bool = True, *, kernels: KernelOptions = KernelOptions()):
    """Attention over a cache in pinned host memory: the layer's keys and values cross the
    bus to the device, the new tokens are written in there and, by the same kernels,
    straight into the host cache (KVCache.mapped: no staging, no host thread, no wait); for
    verification passes that beats attention on the CPU by far, and costs the pass about the
    copy of the cache's bytes (planner.predict_pass). The whole (B, KV, max_len, hd) block
    moves in one asynchronous DMA: copying only [0, kv_len) of every row, or gathering it
    across the bus with a kernel reading the mapped cache, was no faster."""
    if cache.row_start is not None:  # rows of a shared pool (SegmentKVCache)
        return streamed_segments(q, k, v, mask, cache, layer, positions, kv_len, causal, kernels=kernels)
    keys, values = HostCacheReads.blocks(cache, layer, q.device)
    B, KV, T, hd = k.shape
    slots = positions.clamp(max=kv_len - 1)
    idx = slots[:, None, :, None].expand(B, KV, T, hd)
    for dev, host, new in zip((keys, values), cache.mapped(), (k, v)):
        new = new.to(dev.dtype)
        dev.scatter_(2, idx, new)
        host[layer].scatter_(2, idx, new)
    return attend(q, keys.to(q.dtype), values.to(q.dtype), mask, positions, kv_len, causal, kernels)


def streamed_segments(q, k, v, mask, cache, layer: int, positions, kv_len, causal: bool, *,
                      kernels: KernelOptions = KernelOptions()):
    """streamed_attention over a cache of row segments in pinned host memory: the layer's
    pool (what the rows hold, not rows × the longest) crosses the bus, the new tokens go into
    it and, by the same kernels, into the host pool; the attention kernel reads each row's
    segment by its offset (`mask`: a TreeMask, or causal over `positions`)."""
    B, KV, T, hd = k.shape
    keys, values = HostCacheReads.blocks(cache, layer, q.device)
    slots = cache._slots(None, positions).reshape(-1)  # (B * T,), within each row's segment
    idx = slots.reshape(1, B * T, 1).expand(KV, B * T, hd)
    for dev, host, new in zip((keys, values), cache.pools_at(q.device), (k, v)):
        new = new.to(dev.dtype).transpose(0, 1).reshape(KV, B * T, hd)
        dev.scatter_(1, idx, new)
        if host.data_ptr() != dev.data_ptr():  # a copy crossed the bus: the host pool too
            host[layer].scatter_(1, idx, new)
    pooled = [t.to(q.dtype)[None].expand(B, *t.shape) for t in (keys, values)]
    if isinstance(mask, TreeMask):
        y = verify_attention(q.transpose(1, 2), *pooled, mask.lengths, mask.ancestors,
                             kv_len=kv_len, row_start=cache.row_start, pdl=kernels.pdl)
    elif causal:
        y = verify_attention(q.transpose(1, 2), *pooled, positions[:, 0], kv_len=kv_len,
                             row_start=cache.row_start, pdl=kernels.pdl)
    else:
        raise ValueError("a streamed segment cache takes a TreeMask or a causal mask")
    return y.transpose(1, 2)


class HostCacheReads:
    """The caches in pinned host memory that one pass over the layers reads, fetched `ahead`
    layers ahead (Transformer.host_cache_ahead): layer i + 1's keys and values cross the bus
    on a copy stream of their own while layer i computes, so the compute stream never waits
    on the bus for them (nor the weights' copy stream on the compute stream behind them);
    `ahead` 0, or a CPU device: each layer's copy on the compute stream as the layer comes. A
    layer's blocks are copied once for every part of the pass that reads them; each part's
    new tokens go into the copy as well as the host (streamed_attention), so a later part
    sees them.

    Ordering: a layer's copy starts after everything queued on the compute stream before
    the layer that issues it (the pass's writes to a layer — new tokens, a PrefillStage's
    flush — are made while that layer computes, after its copy), and the layer waits for
    its copy. The copies land in blocks allocated on the compute stream before that point,
    so the caching allocator's reuse stays ordered."""

    _streams: dict = {}  # device index → the copy stream

    def __init__(self, caches, n_layers: int, device, ahead: int = 1):
        self.device, self.n_layers = torch.device(device), n_layers
        self.sources = {}  # the host blocks' address → (k, v), each indexed by layer
        for c in caches:
            k, v = self.host_blocks(c)
            self.sources.setdefault(k.data_ptr(), (k, v))
        self.ahead = ahead if self.device.type == "cuda" else 0
        self.fetched = {}  # layer → ({address: (keys, values) on the device}, copied event)
        self.caches = list(caches)

    @staticmethod
    def host_blocks(cache) -> tuple:
        """What crosses the bus a layer: the whole (B, KV, S, hd) block, or a SegmentKVCache's
        pools (what the rows hold)."""
        if cache.row_start is not None:
            return cache.k_pool, cache.v_pool
        return cache.k, cache.v

    @classmethod
    def for_parts(cls, caches, n_layers: int, device, ahead: int = 1) -> Optional["HostCacheReads"]:
        """Reads for the caches among `caches` that sit in host memory beside a CUDA
        `device` (None when there are none), `ahead` layers ahead; attached to them until
        close()."""
        device = torch.device(device)
        host = [c for c in {id(c): c for c in caches if c is not None}.values()
                if c.k.device.type == "cpu" and device.type == "cuda"]
        if not host:
            return None
        reads = cls(host, n_layers, device, ahead)
        for c in host:
            c.host_reads = reads
        return reads

    def close(self) -> None:
        for c in self.caches:
            c.host_reads = None
        for layer in list(self.fetched):
            self._drop(layer)

    def _drop(self, layer: int) -> None:
        out, copied = self.fetched.pop(layer, (None, None))
        if copied is not None:  # never read: its blocks go back to the compute stream's
            torch.cuda.current_stream(self.device).wait_event(copied)  # pool once written

    def begin(self, layer: int) -> None:
        """Before layer `layer` runs: its blocks and those of the next `ahead` layers are
        on their way; the layer before's are let go."""
        self._drop(layer - 1)
        for j in range(layer, min(layer + self.ahead, self.n_layers - 1) + 1):
            if j not in self.fetched:
                self._issue(j)

    def _issue(self, layer: int) -> None:
        out = {addr: tuple(torch.empty(t.shape[1:], dtype=t.dtype, device=self.device)
                           for t in kv) for addr, kv in self.sources.items()}
        stream = None
        if self.ahead:  # on the copy stream, after everything queued before this issue
            stream = self._streams.get(self.device.index)
            if stream is None:
                stream = self._streams[self.device.index] = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for addr, kv in self.sources.items():
                for dst, src in zip(out[addr], kv):
                    dst.copy_(src[layer], non_blocking=True)
        copied = None  # ahead 0: on the compute stream, in its order
        if stream is not None:
            copied = torch.cuda.Event()
            copied.record(stream)
        self.fetched[layer] = (out, copied)

    def get(self, cache, layer: int) -> tuple:
        if layer not in self.fetched:  # a layer the pass did not announce
            self._issue(layer)
        out, copied = self.fetched[layer]
        if copied is not None:
            torch.cuda.current_stream(self.device).wait_event(copied)
            self.fetched[layer] = (out, None)
        return out[self.host_blocks(cache)[0].data_ptr()]

    @classmethod
    def blocks(cls, cache, layer: int, device) -> tuple:
        """Layer `layer` of a host cache's blocks on `device`: fetched ahead within a pass
        (run_parts), else copied now on the current stream."""
        reads = getattr(cache, "host_reads", None)
        if reads is not None:
            return reads.get(cache, layer)
        return tuple(t[layer].to(device, non_blocking=True) for t in cls.host_blocks(cache))
