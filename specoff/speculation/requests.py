"""What chain and tree speculation share: the requests they serve, the narrow handle on the
engine they run with, and how a free row takes the next waiting prompt.

Both schedulers keep a queue of waiting requests; a row that finishes takes the next one
(with the caches in row segments, the first of a few whose segment fits every pool) and the
next target pass prefills it as one more part of the pass, so the weights still stream once.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, FrozenSet, List, Optional, Sequence, Tuple

import torch

from ..config import ModelConfig
from ..kvcache import SegmentAllocator, segment_size
from ..options import EngineOptions


@dataclass(frozen=True)
class SpecRun:
    """What a speculative schedule needs of the engine: the two models, their configs, where
    and in what dtype they run, the options, and the plan's figures."""
    target: torch.nn.Module
    draft: torch.nn.Module
    target_config: ModelConfig
    draft_config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: FrozenSet[int]
    options: EngineOptions
    offloaded: bool = False  # the target streams from host memory (its pass costs the copy)
    predicted_pass_seconds: Optional[float] = None  # the plan's target pass


@dataclass
class Request:
    prompt: List[int]
    tokens: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    on_finish: Optional[Callable[[], None]] = None  # called once, when it finishes (progress)

    def add(self, token: int, eos, max_new_tokens: int) -> bool:
        """Append a generated token; True once the request has finished."""
        self.tokens.append(token)
        if token in eos:
            self.finish_reason = "stop"
        elif len(self.tokens) >= max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.on_finish is not None:
            self.on_finish()
            self.on_finish = None
        return self.finish_reason is not None


def pad_prompts(prompts, device) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """(ids (R, longest) zero-padded, lengths, lengths as ints) of token lists, on `device`."""
    host = [len(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(host), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    return ids.to(device), torch.tensor(host, device=device), host


def take_segments(needs: Sequence[int], pools: Sequence[SegmentAllocator]
                  ) -> Optional[Tuple[int, List[int], int]]:
    """(i, first slot in each pool, slots) for the first of `needs` that every pool holds,
    allocated; None when none fits."""
    for i, n in enumerate(needs):
        starts = []
        for pool in pools:
            start = pool.alloc(n)
            if start is None:
                break
            starts.append(start)
        if len(starts) == len(pools):
            return i, starts, n
        for pool, start in zip(pools, starts):
            pool.release(start, n)
    return None


def next_request(waiting: deque, requests: Sequence[Request], pools: Sequence[SegmentAllocator],
                 new_tokens: int, extra: int, lookahead: int):
    """(the request a free row takes from `waiting`, its segment's first slot in each pool,
    slots), removed from the queue: the next one, or with `pools` (rows in segments) the
    first of `lookahead` whose segment of its prompt, `new_tokens` and `extra` fits every
    pool; None when none does."""
    if not pools:
        return waiting.popleft(), [], 0
    window = [waiting[k] for k in range(min(lookahead, len(waiting)))]
    found = take_segments([segment_size(len(requests[i].prompt), new_tokens, extra)
                           for i in window], pools)
    if found is None:
        return None
    j, starts, n = found
    taken = waiting[j]
    del waiting[j]
    return taken, starts, n
