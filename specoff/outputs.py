"""What a generate call gives back: each request's tokens and text, and the call's figures.

Only tokens returned to the caller are counted; prefill and decode are timed apart and
together; the planner's predicted figures sit beside the measured ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional


@dataclass
class RequestOutput:
    prompt_token_ids: List[int]
    token_ids: List[int]
    text: str
    finish_reason: str  # "stop" (an EOS token) or "length" (max_new_tokens)


@dataclass
class GenerationStats:
    """Figures of the last `generate` call. Only returned tokens are counted."""
    rows: int = 0
    tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_passes: int = 0
    decode_passes: int = 0  # target passes after prefill
    plan: Optional[dict] = None
    predicted_pass_seconds: Optional[float] = None
    predicted_prefill_seconds: Optional[float] = None
    bytes_streamed: int = 0  # host→device weight bytes over the whole run
    peak_gpu_bytes: int = 0
    acceptance_rate: Optional[float] = None  # accepted draft tokens / proposed
    # Per-position acceptance α (the E(α, γ) formula's): accepted / (accepted + rejections),
    # a rejection being a row that kept fewer drafts than it was offered. accepted / proposed
    # counts the drafts after a rejection as refused too, and so reads low.
    token_acceptance: Optional[float] = None
    tokens_per_pass: Optional[float] = None  # tokens a row emits per target pass, on average
    draft_hidden_fraction: Optional[float] = None  # of draft time, the part under target passes
    # From the plan (and α): plain and chain runs count this workload's passes (prefill
    # included; chain: speculation.chain.chain_passes, tail and all; every row to max_new_tokens),
    # tree mode gives the steady state.
    predicted_tokens_per_second: Optional[float] = None
    predicted_passes: Optional[int] = None
    groups: int = 1
    rows_per_group: int = 0
    draft_len: Optional[int] = None  # γ at the end of the run (it adapts)
    tree_budget: Optional[int] = None  # nodes per row per tree (tree mode; "auto": the choice)
    tree_budgets: Optional[List[int]] = None  # tree mode: each round's budget, in order
    tree_scores: Optional[str] = None  # tree mode: "learned" or "draft" node ranking
    # Tree mode, per budget tried: rounds, tokens_per_pass (per row), pass_seconds, grow_seconds.
    tree_curve: Optional[List[dict]] = None
    target_seconds: float = 0.0  # device time of speculative target passes
    draft_seconds: float = 0.0  # device time of drafting (tree mode: growing the trees)
    # chain: the part of draft_seconds spent prefilling new prompts in the draft (device time
    # of the draft stream, including waits for the host to issue it)
    draft_prefill_seconds: float = 0.0
    # chain: the draft's work a round as the planner sees it (γ+1 steps at their measured
    # time, plus the prefill of new prompts predicted from its FLOPs)
    predicted_draft_seconds: Optional[float] = None
    round_seconds: float = 0.0  # wall time of the rounds that had drafting
    rounds: int = 0  # rounds that had drafting
    draft_hidden_seconds: float = 0.0  # draft time that overlapped a target pass
    # chain: the draft time that did not, by the kind of pass it was timed with: "first"
    # (the first pass: the first group's draft runs before it), "interleaved" (the other
    # group's draft beside the pass), "joint" (JOINT_TAIL: both drafts before it), "serial"
    # (one group: its draft between passes)
    draft_exposed_seconds: Dict[str, float] = field(default_factory=dict)
    proposed: int = 0
    accepted: int = 0
    row_passes: int = 0  # (row, target pass) pairs that verified drafts
    rejections: int = 0  # of those, the ones that kept fewer drafts than offered
    accepted_histogram: Optional[List[int]] = None  # [k]: row passes that accepted k drafts
    # Tree mode: the same per request (in the order of the requests that had a pass)
    request_histograms: Optional[List[List[int]]] = None
    tail_merges: int = 0  # times the two row groups became one at the end of a workload
    joint_passes: int = 0  # chain passes that verified both groups at the tail (JOINT_TAIL)
    speculated: bool = False  # the call ran speculation (generate's speculate, or the planner's choice)
    speculation_note: Optional[str] = None  # why the planner ran the target alone (speculate=None)
    # Draft cache in row segments: times a free row found no room for a waiting prompt
    segment_waits: int = 0
    # After a speculative run: the planner's figure for the target alone batching the same
    # prompts (a big queue of short answers can favour it)
    predicted_plain_tokens_per_second: Optional[float] = None
    # Tree mode: seconds its growth spent capturing CUDA graphs (inside draft_seconds and the
    # run's time: a new draft cache each call captures anew)
    graph_capture_seconds: float = 0.0
    # Steady state, every row busy: the returned tokens and wall time of the passes (chain:
    # rounds whose group had a request on every row; plain: whole batches of the plan's rows,
    # prefill included). A workload's first wave and its tail of half-empty passes fall
    # outside, so this is the rate a queue of thousands of prompts would see.
    steady_tokens: int = 0
    steady_seconds: float = 0.0
    options: Optional[dict] = None  # the EngineOptions the call ran with

    def count_verified(self, proposed: int, accepted: int) -> None:
        """One row's drafts checked by one target pass: `accepted` of `proposed` kept."""
        self.proposed += proposed
        self.accepted += accepted
        self.rejections += accepted < proposed
        self.row_passes += 1
        histogram = self.accepted_histogram = self.accepted_histogram or []
        histogram.extend([0] * (accepted + 1 - len(histogram)))
        histogram[accepted] += 1

    def expose(self, kind: str, seconds: float) -> None:
        """Draft time no target pass hid, timed with a pass of this kind."""
        self.draft_exposed_seconds[kind] = self.draft_exposed_seconds.get(kind, 0.0) + seconds

    def position_acceptance(self) -> float:
        """Per-position α so far (see token_acceptance)."""
        return self.accepted / max(self.accepted + self.rejections, 1)

    def finalize(self) -> None:
        if self.proposed:
            self.acceptance_rate = self.accepted / self.proposed
            self.token_acceptance = self.position_acceptance()
            self.tokens_per_pass = (self.accepted + self.row_passes) / self.row_passes
        if self.draft_seconds and self.rounds:
            self.draft_hidden_fraction = self.draft_hidden_seconds / self.draft_seconds
        elif self.draft_seconds:
            self.draft_hidden_fraction = 0.0  # serial: nothing ran beside the target

    @property
    def measured_pass_seconds(self) -> float:
        """Mean wall time of one decode pass."""
        return self.decode_seconds / self.decode_passes if self.decode_passes else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Returned tokens over the whole run's time (prefill + decode)."""
        total = self.prefill_seconds + self.decode_seconds
        return self.tokens / total if total > 0 else 0.0

    @property
    def steady_tokens_per_second(self) -> Optional[float]:
        """Returned tokens a second while every row was busy (None: no such pass)."""
        return self.steady_tokens / self.steady_seconds if self.steady_seconds > 0 else None

    def to_dict(self) -> dict:
        return dict(asdict(self), tokens_per_second=self.tokens_per_second,
                    measured_pass_seconds=self.measured_pass_seconds,
                    steady_tokens_per_second=self.steady_tokens_per_second)
