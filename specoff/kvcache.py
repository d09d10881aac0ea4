"""Preallocated KV cache with a length per row.

Rows of one batch hold different numbers of tokens (different prompt lengths, different
numbers of accepted draft tokens), so each row writes at its own offset. A forward pass
writes its new tokens at `lengths[b] + t` and never moves `lengths`; the caller then
advances each row by the number of tokens it keeps. Dropping rejected tokens is therefore
free: the row simply does not advance over them, and the next write overwrites them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Optional

import torch


@lru_cache(maxsize=None)
def _writer() -> ThreadPoolExecutor:
    """One host thread for staged cache writes: in order, so a layer's writes land as issued."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="specoff-kv-writer")


class KVCache(torch.nn.Module):
    def __init__(self, n_layers: int, rows: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, pin_memory: bool = False, lengths_device=None):
        super().__init__()
        shape = (n_layers, rows, n_kv_heads, max_len, head_dim)  # (L, B, KV, S, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device,
                                              pin_memory=pin_memory), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device,
                                              pin_memory=pin_memory), persistent=False)
        # Lengths live where positions are computed: the compute device, even when the
        # cache itself sits in host memory.
        self.register_buffer("lengths", torch.zeros(rows, dtype=torch.long,
                                                    device=lengths_device or device),
                             persistent=False)
        self.max_len = max_len
        self._pending = []  # (layer, event, staged k, v, positions): host writes not yet done

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

    def stage_write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor,
                    positions: torch.Tensor) -> None:
        """For a cache in host memory: new keys/values (B, KV, T, hd) computed on the device,
        for per-row `positions` (B, T). Only they cross back, into pinned staging; a host
        thread writes them into the cache once their copy is done, so the thread that
        issues the pass never waits on the device (writes waited for on it, one per layer,
        made the 24 GiB chain pass slower than copying whole layers back)."""
        cuda = k_new.is_cuda
        staged = []
        for t in (k_new.to(self.k.dtype), v_new.to(self.v.dtype), positions):
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
            staged.append(buf.copy_(t, non_blocking=cuda))
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((layer, _writer().submit(self._write, layer, event, *staged)))

    @torch.inference_mode()  # (thread-local: the caller's mode does not reach the thread)
    def _write(self, layer, event, k, v, positions) -> None:
        if event is not None:
            event.synchronize()
        B, KV, T, hd = k.shape
        idx = positions[:, None, :, None].expand(B, KV, T, hd)
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)

    def finish_writes(self, layer: Optional[int] = None) -> None:
        """Wait for the staged host writes of `layer` (before reading or writing it again on
        the host or over the bus), or for all of them (the pass is over)."""
        keep = []
        for at, future in self._pending:
            if layer is not None and at != layer:
                keep.append((at, future))
            else:
                future.result()
        self._pending = keep

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
