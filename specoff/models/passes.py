"""Pass packing: the batches of tokens (parts) that one pass over the layers runs together.

A streamed layer is loaded once a pass however many parts ride on it: prefill chunks,
verification, refills. Prompts of different lengths run packed in one row (PrefillBatch,
SegmentMask); prompts prefilled into rows of a larger cache, or into a cache away from the
device, build their K/V in a one-layer scratch first (PrefillStage, PackedStage).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..kvcache import KVCache
from .attention import SegmentMask


@dataclass(eq=False)
class PassPart:
    """One batch of tokens in a pass: its own cache, positions and attention bound."""
    input_ids: torch.Tensor  # (B, T)
    cache: KVCache
    positions: torch.Tensor  # (B, T) absolute positions, also where K/V are written
    kv_len: int  # host-side bound on the cached positions attended to
    # Tree passes and packed prompts: where each token's K/V is written (default: its
    # position) and which cached keys it sees, a TreeMask, a SegmentMask or (B, 1, T, kv_len)
    # (default: causal over positions).
    slots: Optional[torch.Tensor] = None
    mask: Optional[object] = None
    h: Optional[torch.Tensor] = None  # final hidden states (B, T, D) after run_parts
    # PrefillStage or PackedStage: K/V built on the device, then moved to `cache`
    stage: Optional[object] = None


def prefill_parts(input_ids: torch.Tensor, cache: KVCache, chunk: int, kv_start: int = 0,
                  rows: Optional[torch.Tensor] = None, device=None) -> List[PassPart]:
    """Chunks of a prefill as parts of one pass, each chunk seeing the chunks before it.

    Prompts go through a PrefillStage (they must start empty: kv_start 0) when they fill
    `rows` of a larger cache or when the cache is away from the compute `device`."""
    T = input_ids.shape[1]
    device = device or input_ids.device
    stage = None
    if (rows is not None or cache.k.device.type != torch.device(device).type
            or cache.row_start is not None):
        if kv_start:
            raise ValueError("a staged prefill starts from empty rows (kv_start=0)")
        stage = PrefillStage(cache, rows, T, device)
        positions = torch.arange(T, device=device).expand(input_ids.shape[0], T)
    else:
        positions = cache.positions(T)
    return [PassPart(input_ids[:, lo:lo + chunk], cache, positions[:, lo:lo + chunk],
                     kv_start + min(lo + chunk, T), stage=stage) for lo in range(0, T, chunk)]


def row_chunk(chunk: int, rows: int, prompts: int) -> int:
    """Prompt tokens a row per prefill part for `prompts` prompts, where the plan sized a part
    for `chunk` tokens of each of `rows` rows: fewer prompts take longer chunks, a part
    holding at most chunk × rows tokens (what the plan's memory counts)."""
    return max(chunk, chunk * rows // max(prompts, 1))


class PrefillBatch:
    """The parts of one prefill (B prompts padded to T), and each row's last hidden state
    after the pass. With the lengths known on the host and not all equal, the prompts are
    packed one after another in one row, without padding, each token attending within its
    own prompt (SegmentMask, the verification kernel on a GPU), their K/V built in a one-row
    scratch and moved into the cache's rows after each layer (PackedStage). Parts hold what
    the caller sized one for (chunk × B tokens). Against padding every prompt to the longest
    that computes only the prompts' own tokens, and against padding in length buckets (a
    part per bucket on every layer) it is one part per chunk."""

    def __init__(self, input_ids: torch.Tensor, cache: KVCache, chunk: int, kv_start: int = 0,
                 rows: Optional[torch.Tensor] = None, device=None,
                 lengths_host: Optional[Sequence[int]] = None):
        B, T = input_ids.shape
        self.packed = (kv_start == 0 and lengths_host is not None and B > 1
                       and min(lengths_host) != max(lengths_host))
        if not self.packed:
            self.parts = prefill_parts(input_ids, cache, chunk, kv_start, rows=rows, device=device)
            self.padded_tokens = input_ids.numel()
            return
        device = torch.device(device) if device is not None else input_ids.device
        lens = torch.tensor([int(n) for n in lengths_host])
        starts = torch.cumsum(lens, 0) - lens
        prompt = torch.repeat_interleave(torch.arange(B), lens)  # each packed token's prompt
        pos = torch.arange(int(lens.sum())) - starts[prompt]  # ... and position in it
        N = len(pos)
        ids = input_ids.reshape(-1)[(prompt * T + pos).to(input_ids.device)][None]  # (1, N)
        self.starts = starts.to(device)
        into = prompt if rows is None else rows[prompt.to(rows.device)]  # each token's row
        stage = PackedStage(cache, into, pos, N, device)
        positions, seg_start = pos.to(device)[None], starts[prompt].to(device)[None]
        slots = torch.arange(N, device=device)[None]
        step = max(1, chunk * B)
        self.parts = [PassPart(ids[:, lo:lo + step].to(device), cache, positions[:, lo:lo + step],
                               min(lo + step, N), slots=slots[:, lo:lo + step],
                               mask=SegmentMask(torch.tensor([lo], device=device),
                                                seg_start[:, lo:lo + step]),
                               stage=stage)
                      for lo in range(0, N, step)]
        self.padded_tokens = N

    def last_hidden(self, lengths: torch.Tensor, count: int = 1) -> torch.Tensor:
        """(B, count, D): each row's hidden states at its last `count` tokens, positions
        lengths[b] − count … lengths[b] − 1 (after run_parts)."""
        h = torch.cat([p.h for p in self.parts], dim=1)
        at = lengths.to(h.device)[:, None] - count + torch.arange(count, device=h.device)
        if self.packed:
            return h[0][self.starts.to(h.device)[:, None] + at]
        return h.gather(1, at[..., None].expand(-1, -1, h.shape[-1]))


class PackedStage:
    """The K/V of prompts packed in one row (PrefillBatch), built one layer at a time in a
    one-row scratch on the device; after each layer every token's K/V moves to its row and
    position of the cache (a cache in pinned host memory written from the device across
    the bus, as PrefillStage does)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor, positions: torch.Tensor, N: int,
                 device):
        _, _, KV, _, hd = cache.k.shape
        self.cache = cache
        self.scratch = KVCache(1, 1, N, KV, hd, cache.k.dtype, device)
        self.host = cache.k.device.type == "cpu" and torch.device(device).type == "cuda"
        at = cache.k.device if not self.host else torch.device(device)
        self.rows, self.positions = rows.to(at), positions.to(at)

    def flush(self, layer: int) -> None:
        # on the current stream: ordered after the pass's other writes to the layer
        if self.cache.row_start is not None:  # rows of a shared pool (SegmentKVCache)
            self.cache.put_tokens(layer, self.rows, self.positions, self.scratch.k[0, 0],
                                  self.scratch.v[0, 0])
            return
        for dst, src in zip(self.cache.mapped() if self.host else (self.cache.k, self.cache.v),
                            (self.scratch.k[0, 0], self.scratch.v[0, 0])):  # (KV, N, hd)
            dst[layer][self.rows, :, self.positions] = src.transpose(0, 1).to(dst.dtype)


class PrefillStage:
    """Prompts prefilled into empty `rows` of a cache (all of them when None) that is not
    theirs alone or not on the compute device. Each layer's K/V are built in a one-layer
    scratch on the device, where attention runs over the chunks so far; after the layer the
    scratch moves into the cache's rows. A cache in pinned host memory is written from the
    device across the bus (KVCache.mapped): no CPU attention, no wait on the host, and the
    cache needs no room on the device (copying each layer into pinned staging and moving it
    into the rows from the host was slower)."""

    def __init__(self, cache: KVCache, rows: Optional[torch.Tensor], T: int, device):
        n = cache.rows if rows is None else len(rows)
        _, _, KV, _, hd = cache.k.shape
        self.cache, self.T = cache, T
        self.rows = None if rows is None else rows.to(cache.k.device)
        self.rows_device = None if rows is None else rows.to(device)
        self.scratch = KVCache(1, n, T, KV, hd, cache.k.dtype, device)
        self.host = cache.k.device.type == "cpu" and torch.device(device).type == "cuda"

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor, into=None) -> None:
        T = self.T
        if self.cache.row_start is not None:  # rows of a shared pool (SegmentKVCache)
            self.cache.put_rows(layer, self.rows_device, k, v)
            return
        for dst, src in zip(into or (self.cache.k, self.cache.v), (k, v)):
            if self.rows is None:
                dst[layer, :, :, :T].copy_(src)
            else:
                rows = self.rows if dst.device == self.rows.device else self.rows_device
                dst[layer][rows, :, :T] = src

    def flush(self, layer: int) -> None:
        k, v = self.scratch.k[0], self.scratch.v[0]
        # on the current stream: ordered after the pass's other writes to the layer
        self._store(layer, k, v, into=self.cache.mapped() if self.host else None)
