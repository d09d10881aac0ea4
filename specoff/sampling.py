"""Token selection without host syncs: greedy, temperature, top-k, top-p.

Random choices use the Gumbel-style trick `argmax(p / Exponential(1))` (as gpt-fast does),
which draws exactly from p and stays on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .kernels.step import argmax_rows
from .options import KernelOptions


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """The distribution actually sampled from: fp32, temperature-scaled, top-k/top-p cut."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens before it already hold top_p of the mass.
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row of `probs` (..., V), on the device."""
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-30)
    return (probs / noise).argmax(dim=-1)


def select(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator],
           kernels: KernelOptions = KernelOptions()) -> torch.Tensor:
    """The next token of every row from its logits (..., V); greedy through kernels.step's
    argmax where `kernels` runs the step kernels."""
    if params.greedy:
        return argmax_rows(logits, enabled=kernels.step_kernels, interpret=kernels.interpret)
    return sample_from(logits_to_probs(logits, params.temperature, params.top_k, params.top_p),
                       generator)
