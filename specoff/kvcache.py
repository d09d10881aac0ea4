"""Preallocated KV cache with a length per row.

Rows of one batch hold different numbers of tokens (different prompt lengths, different
numbers of accepted draft tokens), so each row writes at its own offset. A forward pass
writes its new tokens at `lengths[b] + t` and never moves `lengths`; the caller then
advances each row by the number of tokens it keeps. Dropping rejected tokens is therefore
free: the row simply does not advance over them, and the next write overwrites them.
"""
from __future__ import annotations

import torch


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
    if not (t.is_pinned() and t.is_contiguous()):
        raise ValueError("device_alias needs a contiguous tensor in pinned host memory")
    raw = torch.as_tensor(_CudaArray(t.data_ptr(), t.numel() * t.element_size()),
                          device=torch.device(device))
    return raw.view(t.dtype).view(t.shape)


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
        self._mapped = None  # (k, v) device views of a pinned host cache (see mapped)

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

    def mapped(self) -> tuple:
        """(k, v) as device tensors over this cache's pinned host memory, for a cache that
        sits in host memory beside a CUDA device: kernels write new tokens straight into
        it across the bus (posted writes, the bus's otherwise idle device→host direction),
        ordered on their stream like any other kernel, with no staging, no host thread and
        no wait on the host (decoder.streamed_attention, PrefillStage)."""
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
