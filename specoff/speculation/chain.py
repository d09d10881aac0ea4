"""Chain verification: which of γ drafted tokens the target accepts, and its next token.

Greedy: the longest prefix of the draft that matches the target's argmax, then the target's
own token. Sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding", §2.3; Chen et al. 2023): accept draft token x with probability
min(1, p(x)/q(x)); at the first rejection draw from norm(max(0, p − q)); after γ
acceptances draw a bonus token from p. The emitted tokens are then distributed exactly as
if sampled from the target alone. Everything stays on the device.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ..kernels.step import argmax_rows
from ..options import KernelOptions
from ..planner import expected_tokens_per_pass
from ..sampling import sample_from

MAX_DRAFT_LEN = 8  # γ never exceeds this; caches and plans are sized for it


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor,
                  kernels: KernelOptions = KernelOptions()) -> Tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens (B, γ), target_logits (B, γ+1, V) → (accepted count (B,), next token (B,))."""
    target = argmax_rows(target_logits, enabled=kernels.step_kernels,  # argmax(dim=-1): (B, γ+1)
                         interpret=kernels.interpret)
    match = (draft_tokens == target[:, :-1]).int()
    accepted = match.cumprod(dim=1).sum(dim=1)
    return accepted, target.gather(1, accepted[:, None])[:, 0]


def sample_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor,
                  target_probs: torch.Tensor, generator: Optional[torch.Generator]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens (B, γ) drawn from draft_probs (B, γ, V); target_probs (B, γ+1, V), both
    after the same temperature / top-k / top-p → (accepted count (B,), next token (B,))."""
    B, gamma = draft_tokens.shape
    p = target_probs[:, :gamma].gather(-1, draft_tokens[..., None])[..., 0]
    q = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    u = torch.rand(B, gamma, device=p.device, generator=generator)
    accepted = (u * q < p).int().cumprod(dim=1).sum(dim=1)  # u < p/q without dividing by q
    # Residual at the first rejection; past the last draft token q is 0, so it is p itself.
    q_next = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    at = accepted[:, None, None].expand(-1, 1, target_probs.shape[-1])
    p_at = target_probs.gather(1, at)[:, 0]
    residual = (p_at - q_next.gather(1, at)[:, 0]).clamp_min(0)
    total = residual.sum(dim=-1, keepdim=True)
    # p == q leaves no residual mass, but then a rejection had probability 0: fall back to p.
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p_at)
    return accepted, sample_from(residual, generator)


def emitted_tokens(draft_tokens: torch.Tensor, accepted: torch.Tensor,
                   next_token: torch.Tensor) -> torch.Tensor:
    """(B, γ+1): the accepted draft tokens, then the target's token at index `accepted`;
    entries past it are meaningless."""
    out = torch.cat([draft_tokens, torch.zeros_like(draft_tokens[:, :1])], dim=1)
    return out.scatter(1, accepted[:, None], next_token[:, None])


def chain_passes(prompts: int, rows_per_group: int, groups: int, new_tokens: int,
                 alpha: float, draft_len: int, seed: int = 0, joint: bool = False) -> int:
    """Target passes a chain run takes for `prompts` prompts of `new_tokens` tokens each,
    simulated as speculation.chain_scheduler.ChainScheduler schedules them: rounds in turn, each row
    emitting 1 + a tokens a pass with P(a ≥ k) = α^k (k ≤ γ), a new prompt's first pass
    included (it is prefilled with its drafts appended and verified like the others), freed
    rows refilled in the group's next pass, two groups merged into one at the tail (and
    with `joint`, before that, both verified in each pass once no prompt waits: the
    pipeline's JOINT_TAIL). Where E
    tokens per row per pass is the steady state, this counts what a finite workload pays:
    the overshoot of each row's last pass, and the rounds with rows left empty at the tail."""
    rng = np.random.default_rng(seed)
    waiting = prompts
    left = [[0] * rows_per_group for _ in range(groups)]  # tokens still to emit; 0: free
    refill = [set() for _ in range(groups)]

    def assign(g):
        nonlocal waiting
        for b in range(rows_per_group):
            if left[g][b] == 0 and waiting:
                waiting -= 1
                left[g][b] = new_tokens
                refill[g].add(b)

    def round_(g) -> int:
        live = [b for b in range(rows_per_group) if left[g][b]]
        if not live:
            return 0
        accepted = np.minimum(rng.geometric(1 - alpha, len(live)) - 1 if alpha < 1
                              else np.full(len(live), draft_len), draft_len)
        for b, a in zip(live, accepted):
            left[g][b] = max(left[g][b] - 1 - int(a), 0)
        refill[g].clear()
        assign(g)
        return 1

    def tail() -> bool:  # no prompt waiting or to prefill (ChainPipeline._joint)
        return len(left) == 2 and not waiting and not any(refill)

    def merge():  # ChainPipeline._merge_tail
        nonlocal left, refill
        live = sum(1 for row in left for n in row if n)
        if tail() and live <= rows_per_group:
            left = [[n for row in left for n in row if n] + [0] * (rows_per_group - live)]
            refill = [set()]

    passes = 0
    for g in range(groups):
        assign(g)
    turn = 0
    while any(any(row) for row in left):
        if joint and tail():
            passes += max(round_(0), round_(1))  # one pass for both groups' rows
            merge()
            continue
        passes += round_(turn % len(left))
        turn += 1
        if turn % 2 == 0:
            merge()
    return passes


def choose_draft_len(alpha: float, target_pass_s: float, draft_step_s: float,
                     interleaved: bool, max_len: int = MAX_DRAFT_LEN) -> int:
    """The γ that maximises tokens per second: E(γ) over the round time, which is
    max(target, draft) when the draft hides under the target pass, else their sum."""
    def rate(g):
        draft = (g + 1) * draft_step_s
        round_s = max(target_pass_s, draft) if interleaved else target_pass_s + draft
        return expected_tokens_per_pass(alpha, g) / max(round_s, 1e-9)
    return max(range(1, max_len + 1), key=rate)
