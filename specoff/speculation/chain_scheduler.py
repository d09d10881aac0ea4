"""The SpecOffload schedule (arXiv 2505.10259 §3-4): chain speculation over two row groups.

While the target's weights stream through one pass for group A (bound by the copy), the
draft, resident on the GPU and on its own CUDA stream, drafts the next γ tokens for group
B; then the groups swap. A row that finishes hands its slot to the next waiting prompt: the
draft prefills it and drafts γ tokens after it like any other row's, and the group's next
target pass prefills the prompt with those drafts appended (one more part of that pass, so
the weights still stream once) and verifies them, so a new prompt's first pass gives 1 + a
tokens, not one. Each row accepts its own number of tokens: per-row cache lengths move by
that number, nothing is padded or shifted.
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from ..kernels.step import argmax_rows
from ..kvcache import KVCache, SegmentAllocator, SegmentKVCache, cache_slots
from ..models.passes import PassPart, PrefillBatch, row_chunk
from ..options import CacheOptions
from ..sampling import SamplingParams, logits_to_probs, sample_from
from .chain import MAX_DRAFT_LEN, choose_draft_len, emitted_tokens, greedy_accept, sample_accept
from .requests import Request, SpecRun, next_request, pad_prompts


def draft_cache_slots(rows: int, prompts: Sequence[int], max_new_tokens: int,
                      options: CacheOptions) -> Tuple[int, bool]:
    """(slots, segmented): the draft's cache of a chain run over `rows` rows in all."""
    return cache_slots(rows, prompts, max_new_tokens, MAX_DRAFT_LEN,
                       options.segment_draft_cache, options.draft_slack)


@dataclass(eq=False)
class Group:
    """A set of rows that go through the target together, with their caches and state."""
    rows: int
    target_cache: KVCache
    draft_cache: KVCache
    last: torch.Tensor  # (B,) each row's newest token, not yet in either cache
    request: List[Optional[int]]  # which request each row serves (None: idle)
    refill: List[int] = field(default_factory=list)  # rows to prefill in the next pass
    # Their prompts as (ids (R, longest), lengths, lengths as ints), built by the draft round
    # that prefills them in the draft and reused by the target round
    prompts: Optional[tuple] = None
    draft_tokens: Optional[torch.Tensor] = None  # (B, γ)
    draft_probs: Optional[torch.Tensor] = None  # (B, γ, V) when sampling
    drafted: Optional[object] = None  # event: the draft tokens are ready
    # A draft cache in segments: each row's (first slot, slots), None while it idles in its
    # own idle segment, which starts at idle_first + b × the idle size.
    segment: List[Optional[tuple]] = field(default_factory=list)
    idle_first: int = 0
    # The target's cache in segments (CacheOptions.segment_target_cache): the group's own pool, its
    # allocator, and each row's (first slot, slots) there (None: idling at b × the idle size)
    target_slots: Optional[SegmentAllocator] = None
    target_segment: List[Optional[tuple]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return any(r is not None for r in self.request)


@dataclass
class RoundTiming:
    target_start: object
    target_end: object
    # The draft rounds timed with this pass (the other group's, beside it; at a joint tail
    # pass each group's, before it): (start, steps, end, γ + 1) each, `steps` after the
    # draft's prefill of new prompts, before its steps.
    drafts: list = field(default_factory=list)
    wall: float = 0.0
    kind: str = "interleaved"  # or "first", "joint", "serial" (stats.draft_exposed_seconds)


class ChainScheduler:
    """Chain-mode generation for `requests` over `groups` row groups of `rows_per_group`
    rows (module docstring). `draft_len`: γ, or None to adapt it between rounds."""

    def __init__(self, run: SpecRun, params: SamplingParams, requests: List[Request],
                 rows_per_group: int, groups: int, draft_len: Optional[int], generator, stats, *,
                 kv_on_gpu: bool = True, prefill_chunk: Optional[int] = None):
        self.run_, self.target, self.draft = run, run.target, run.draft
        self.cache_options, spec = run.options.cache, run.options.spec
        self.params, self.requests, self.generator, self.stats = params, requests, generator, stats
        self.device = run.device
        self.cuda = self.device.type == "cuda"
        # The plan's KV placement (the target's cache may sit in pinned host memory, streamed
        # to the device for attention) and prefill chunk; the draft's cache is on the device.
        self.kv_on_gpu, self.chunk = kv_on_gpu, prefill_chunk or run.options.prefill_chunk
        # The plan's chunk is sized for prefilling every row at once; a refill of a few rows
        # takes as many tokens per part (rows × chunk), so it runs in few parts: each part
        # costs its launches on every layer, which for chunks of ~10 tokens outweighed the
        # copy-bound pass itself.
        self.part_rows = rows_per_group * groups
        self.adaptive = draft_len is None
        self.gamma = draft_len or 4
        self.max_gamma = MAX_DRAFT_LEN
        self.vocab = run.target_config.vocab_size
        self.alpha = 0.7  # prior acceptance rate, replaced by what is observed
        self.waiting = deque(range(len(requests)))
        longest = max(len(r.prompt) for r in requests)
        self.max_len = longest + params.max_new_tokens + self.max_gamma + 2
        self.eos = sorted(run.eos_token_ids) if not params.ignore_eos else []
        self.draft_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool, self.segmented = draft_cache_slots(
            rows_per_group * groups, [len(r.prompt) for r in requests], params.max_new_tokens,
            self.cache_options)
        self.idle = self.max_gamma + 3  # an idle row's segment: its γ+1 draft steps at 0..γ
        if self.segmented:
            self.free_slots = SegmentAllocator(rows_per_group * groups * self.idle, self.pool)
        # The target's cache in segments too, a pool per group (a pass streams its own
        # group's rows): where it sits in host memory, a pass then streams what its rows
        # hold, not rows × the longest need.
        mode = self.cache_options.segment_target_cache
        self.target_segmented = self.segmented and (mode == "on" or (
            mode == "auto" and not kv_on_gpu and self.cuda))
        self.target_pool = cache_slots(
            rows_per_group, [len(r.prompt) for r in requests], params.max_new_tokens,
            MAX_DRAFT_LEN, "on", self.cache_options.target_slack)[0] if self.target_segmented else None
        self._pools = None  # the draft caches' shared pools
        self.groups = [self._new_group(rows_per_group, i) for i in range(groups)]
        # The tail (no prompt waiting): one pass verifies both groups, their drafts before
        # it, unhidden, where each group would pay a whole pass for its thinning rows: where
        # the target is offloaded its pass costs the weights' copy, whatever the rows.
        self.joint_tail = spec.joint_tail == "on" or (spec.joint_tail == "auto"
                                                      and run.offloaded)
        self.timings: List[RoundTiming] = []
        self.draft_step_s, self.target_pass_s = None, run.predicted_pass_seconds
        self._pending_drafts, self._last_commit = [], None
        self._pending_cpu: List[float] = []  # off a GPU: the drafts' seconds since the last pass

    # -- state -----------------------------------------------------------------------------

    def _new_group(self, rows: int, index: int) -> Group:
        tcfg, dcfg = self.run_.target_config, self.run_.draft_config
        dtype, device = self.run_.dtype, self.device
        where = device if self.kv_on_gpu else torch.device("cpu")
        if self.target_segmented:
            tcache = SegmentKVCache(tcfg.n_layers, rows, self.target_pool, self.max_len + 1,
                                    tcfg.n_kv_heads, tcfg.head_dim, dtype, where,
                                    pin_memory=where.type != device.type, lengths_device=device)
            tcache.assign(range(rows), [b * self.idle for b in range(rows)], [self.idle] * rows)
        else:
            tcache = KVCache(tcfg.n_layers, rows, self.max_len, tcfg.n_kv_heads, tcfg.head_dim,
                             dtype, where, pin_memory=where.type != device.type,
                             lengths_device=device)
        if not self.segmented:
            dcache = KVCache(dcfg.n_layers, rows, self.max_len, dcfg.n_kv_heads, dcfg.head_dim,
                             dtype, device)
            return Group(rows, tcache, dcache, torch.zeros(rows, dtype=torch.long, device=device),
                         [None] * rows)
        dcache = SegmentKVCache(dcfg.n_layers, rows, self.pool, self.max_len + 1, dcfg.n_kv_heads,
                                dcfg.head_dim, dtype, device, pools=self._pools)
        self._pools = (dcache.k_pool, dcache.v_pool)
        g = Group(rows, tcache, dcache, torch.zeros(rows, dtype=torch.long, device=device),
                  [None] * rows, segment=[None] * rows, idle_first=index * rows * self.idle)
        if self.target_segmented:
            g.target_slots = SegmentAllocator(rows * self.idle, self.target_pool)
            g.target_segment = [None] * rows
        dcache.assign(range(rows), [g.idle_first + b * self.idle for b in range(rows)],
                      [self.idle] * rows)
        return g

    def _assign(self, g: Group) -> None:
        """Give free rows the next waiting prompts (with the caches in segments, the first
        of a few whose segments fit; a row waits while none does); they are prefilled in the
        next pass."""
        placed = []
        pools = ([self.free_slots] + ([g.target_slots] if self.target_segmented else [])
                 if self.segmented else [])
        for b in range(g.rows):
            if g.request[b] is not None or not self.waiting:
                continue
            taken = next_request(self.waiting, self.requests, pools, self.params.max_new_tokens,
                                 self.max_gamma, self.cache_options.lookahead)
            if taken is None:
                self.stats.segment_waits += 1
                continue
            g.request[b], starts, n = taken
            if self.segmented:
                g.segment[b] = (starts[0], n)
                if self.target_segmented:
                    g.target_segment[b] = (starts[1], n)
                placed.append(b)
            g.refill.append(b)
        if placed:
            g.draft_cache.assign(placed, [g.segment[b][0] for b in placed],
                                 [g.segment[b][1] for b in placed])
            if self.target_segmented:
                g.target_cache.assign(placed, [g.target_segment[b][0] for b in placed],
                                      [g.target_segment[b][1] for b in placed])

    def _release(self, g: Group, rows: List[int]) -> None:
        """Finished rows give their draft segments back and idle in their own (the round
        synced: no work on them is in flight)."""
        done = [b for b in rows if g.segment and g.segment[b] is not None]
        for b in done:
            self.free_slots.release(*g.segment[b])
            g.segment[b] = None
        if done:
            g.draft_cache.assign(done, [g.idle_first + b * self.idle for b in done],
                                 [self.idle] * len(done))
        done = [b for b in rows if g.target_segment and g.target_segment[b] is not None]
        for b in done:
            g.target_slots.release(*g.target_segment[b])
            g.target_segment[b] = None
        if done:
            g.target_cache.assign(done, [b * self.idle for b in done], [self.idle] * len(done))

    def _stream(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _event(self):
        return torch.cuda.Event(enable_timing=True) if self.cuda else None

    # -- draft -----------------------------------------------------------------------------

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits over the target's vocabulary (a draft vocabulary may be a prefix of it,
        or padded past it)."""
        V = self.vocab
        if logits.shape[-1] > V:
            return logits[..., :V]
        if logits.shape[-1] < V:
            return torch.nn.functional.pad(logits, (0, V - logits.shape[-1]), value=float("-inf"))
        return logits

    def _draft_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Target tokens the draft cannot embed (its vocabulary is a prefix of the target's)
        become token 0: it only weakens the draft's guesses, never the output."""
        n = self.run_.draft_config.vocab_size
        return ids if n >= self.vocab else torch.where(ids < n, ids, torch.zeros_like(ids))

    def _prefill_draft(self, g: Group) -> None:
        """New prompts into the draft: all but the last token, which becomes the row's `last`,
        so the draft's γ+1 steps run for these rows as for the others."""
        g.prompts = None
        if not g.refill:
            return
        ids, lens, host = pad_prompts([self.requests[g.request[b]].prompt for b in g.refill],
                                      self.device)
        g.prompts = (ids, lens, host)
        at = torch.tensor(g.refill, device=self.device)
        g.last[at] = ids.gather(1, (lens - 1)[:, None])[:, 0]
        g.draft_cache.lengths[at] = 0
        some = [i for i, n in enumerate(host) if n > 1]  # one-token prompts: nothing to cache
        if some:
            sel = torch.tensor(some, device=self.device)
            chunk = row_chunk(self.chunk, self.part_rows, len(some))
            self.draft.prefill(self._draft_ids(ids[sel]), lens[sel] - 1, g.draft_cache, chunk,
                               rows=at[sel], lengths_host=[host[i] - 1 for i in some])

    def draft_round(self, g: Group) -> None:
        """γ draft tokens per row (γ+1 draft steps: the last writes d_γ's K/V, so that any
        number of accepted tokens leaves the draft cache complete). Rows given a new prompt
        are prefilled in the draft first."""
        if not g.active:
            return
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        with self._stream(self.draft_stream):
            if self.cuda:
                self.draft_stream.wait_stream(main)  # the last accept of this group is done
                start = self._event()
                start.record()
            t0 = time.perf_counter()
            self._prefill_draft(g)
            t_steps = time.perf_counter()
            if self.cuda:
                steps = self._event()
                steps.record()
            tokens, drafted, probs = g.last, [], []
            for step in range(self.gamma + 1):
                logits = self.draft(self._draft_ids(tokens)[:, None], g.draft_cache)[:, 0]
                g.draft_cache.advance(1)
                if step == self.gamma:
                    break
                logits = self._fit_vocab(logits)
                if self.params.greedy:
                    kernels = self.run_.options.kernels  # argmax(dim=-1), one launch on a GPU
                    tokens = argmax_rows(logits, enabled=kernels.step_kernels,
                                         interpret=kernels.interpret)
                else:
                    q = logits_to_probs(logits, self.params.temperature, self.params.top_k,
                                        self.params.top_p)
                    tokens = sample_from(q, self.generator)
                    probs.append(q)
                drafted.append(tokens)
            g.draft_tokens = torch.stack(drafted, dim=1)
            g.draft_probs = torch.stack(probs, dim=1) if probs else None
            if self.cuda:
                end = self._event()
                end.record()
                g.drafted = end
                for t in (g.draft_tokens, g.draft_probs, *(g.prompts or ())[:2]):
                    if t is not None:
                        t.record_stream(main)
                # timed with the next target round
                self._pending_drafts.append((start, steps, end, self.gamma + 1))
            else:
                seconds = time.perf_counter() - t0
                self.stats.draft_seconds += seconds
                self._pending_cpu.append(seconds)  # nothing runs beside it
                self.stats.draft_prefill_seconds += t_steps - t0
                # γ is chosen from the steps alone: a round with new prompts also prefills them
                self.draft_step_s = (time.perf_counter() - t_steps) / (self.gamma + 1)

    # -- target ----------------------------------------------------------------------------

    def target_round(self, *groups: Group) -> None:
        """One offloaded target pass for the groups (one, or at the tail every active one:
        SpecOptions.joint_tail): verify their drafts, and prefill their new prompts with their drafts
        appended (verified the same way); then commit what each row accepted."""
        work = []  # (group, verify?, refilled rows) for each group with drafts to verify
        for g in groups:
            refill = list(g.refill)
            verify = any(g.request[b] is not None and b not in refill for b in range(g.rows))
            if g.draft_tokens is None:
                if verify or refill:  # ChainPipeline.run drafts every group before its pass
                    raise RuntimeError("a target round before the group's draft round")
                continue
            work.append((g, verify, refill))
        if not work:
            return
        if self.cuda:
            for g, _, _ in work:
                if g.drafted is not None:
                    torch.cuda.current_stream(self.device).wait_event(g.drafted)
        kind = ("first" if not self.stats.decode_passes else "joint" if len(groups) > 1
                else "serial" if len(self.groups) == 1 else "interleaved")
        timing = RoundTiming(self._event(), self._event(), kind=kind)
        timing.drafts, self._pending_drafts = self._pending_drafts, []
        for seconds in self._pending_cpu:
            self.stats.expose(kind, seconds)
        self._pending_cpu = []
        wall0 = time.perf_counter()
        if self.cuda:
            timing.target_start.record()
        parts: List[PassPart] = []
        pending = []
        for g, verify, refill in work:
            own = self._parts(g, verify, refill)
            pending.append((g, own))
            parts += own[0]
        self.target.run_parts(parts)
        self.stats.decode_passes += 1
        done = [(g, self._verify(g, *own)) for g, own in pending]
        if self.cuda:
            timing.target_end.record()
        # One host sync per group a round (in _commit): finished rows and refills are decided
        # on the host, between target passes, never inside one.
        full = all(r is not None for g, _ in done for r in g.request)  # steady state
        returned = sum(self._commit(g, *verdict) for g, verdict in done)
        # A round's wall time runs from the previous round's commit to this one's: in steady
        # state it holds this pass and whatever drafting ran beside or before it.
        now = time.perf_counter()
        timing.wall = now - (self._last_commit or wall0)
        self._last_commit = now
        if full:
            self.stats.steady_tokens += returned
            self.stats.steady_seconds += timing.wall
        if not self.cuda:
            self.stats.target_seconds += timing.wall
            self.target_pass_s = timing.wall
        self.timings.append(timing)

    def _parts(self, g: Group, verify: bool, refill: List[int]) -> tuple:
        """Group g's parts of a pass — the verification of its rows' drafts (every row: a
        refilled row's result is replaced), then its new prompts with their drafts — and
        what _verify needs of them."""
        parts: List[PassPart] = []
        gamma = g.draft_tokens.shape[1]
        if verify:
            ids = torch.cat([g.last[:, None], g.draft_tokens], dim=1)  # (B, γ+1)
            parts.append(PassPart(ids, g.target_cache, g.target_cache.positions(gamma + 1),
                                  self.max_len))
        prefill = rows = lens = None
        if refill:
            ids, lens, host = g.prompts  # the draft round's
            rows = torch.tensor(refill, device=self.device)
            # Each prompt, then its γ drafts (the draft took the prompt's last token as `last`).
            ids = torch.cat([ids, ids.new_zeros(len(refill), gamma)], dim=1)
            if gamma:
                at = lens[:, None] + torch.arange(gamma, device=self.device)
                ids.scatter_(1, at, g.draft_tokens[rows])
            # Straight into the rows' cache, attention on the device (models.passes.PrefillBatch).
            chunk = row_chunk(self.chunk, self.part_rows, len(refill))
            prefill = PrefillBatch(ids, g.target_cache, chunk, rows=rows, device=self.device,
                                   lengths_host=[n + gamma for n in host])
            parts += prefill.parts
        return parts, verify, prefill, rows, lens

    def _verify(self, g: Group, parts, verify, prefill, rows, lens) -> tuple:
        """Accept group g's drafts against the pass's logits; (emitted, accepted, γ)."""
        gamma = g.draft_tokens.shape[1]
        # The target's logits after `last` and each draft, (B, γ+1, V); a new prompt's are
        # those after its last token and each draft, so it is verified like any other row.
        h = parts[0].h if verify else None
        if prefill is not None:
            fresh = prefill.last_hidden(lens + gamma, gamma + 1)
            if h is None:
                h = fresh.new_zeros(g.rows, gamma + 1, fresh.shape[-1])
            h = h.index_copy(0, rows.to(h.device), fresh)
            g.target_cache.lengths[rows] = lens - 1  # as if `last` were not yet cached
        logits = self.target.head(h)
        if self.params.greedy:
            accepted, nxt = greedy_accept(g.draft_tokens, logits, self.run_.options.kernels)
        else:
            p = logits_to_probs(logits, self.params.temperature, self.params.top_k,
                                self.params.top_p)
            accepted, nxt = sample_accept(g.draft_tokens, g.draft_probs, p, self.generator)
        emitted = emitted_tokens(g.draft_tokens, accepted, nxt)
        g.draft_tokens = g.draft_probs = None  # verified: nothing pending
        g.target_cache.advance(1 + accepted)
        g.draft_cache.rollback(gamma - accepted)  # drafting advanced it by γ+1
        g.last.copy_(nxt)
        return emitted, accepted, gamma

    def _commit(self, g: Group, emitted, accepted, gamma) -> int:
        """Append what each row accepted, free finished rows and refill them; returns the
        tokens appended (what the requests will return)."""
        emitted, accepted = emitted.tolist(), accepted.tolist()  # the round's one sync
        returned = 0
        for b in range(g.rows):
            if g.request[b] is None:
                continue
            self.stats.count_verified(gamma, accepted[b])
            returned += self._append(g, b, emitted[b][:accepted[b] + 1])
        g.refill.clear()
        g.prompts = None
        idle = [b for b in range(g.rows) if g.request[b] is None]
        if idle:  # idle rows ride along in passes: keep their caches from growing
            rows = torch.tensor(idle, device=self.device)
            g.target_cache.lengths[rows] = 0
            g.draft_cache.lengths[rows] = 0
            self._release(g, idle)
        self._assign(g)
        return returned

    def _append(self, g: Group, b: int, tokens: List[int]) -> int:
        """The row's accepted tokens onto its request, up to its end; returns how many."""
        req = self.requests[g.request[b]]
        for i, t in enumerate(tokens):
            if req.add(t, self.eos, self.params.max_new_tokens):
                g.request[b] = None  # the slot is free for the next prompt
                return i + 1
        return len(tokens)

    # -- schedule --------------------------------------------------------------------------

    def _adapt(self) -> None:
        if self.stats.proposed:
            self.alpha = min(self.stats.position_acceptance(), 0.99)
        if self.adaptive and self.draft_step_s and self.target_pass_s:
            interleaved = len(self.groups) > 1 and not self._joint()
            self.gamma = choose_draft_len(self.alpha, self.target_pass_s, self.draft_step_s,
                                          interleaved=interleaved, max_len=self.max_gamma)

    def _joint(self) -> bool:
        """Whether the groups share their passes now (SpecOptions.joint_tail): the queue is empty and
        no group has a prompt to prefill."""
        return (self.joint_tail and len(self.groups) > 1 and not self.waiting
                and not any(g.refill for g in self.groups))

    def run(self) -> None:
        for g in self.groups:
            self._assign(g)
        # Every group is drafted before its first pass (the second group's under the
        # first's pass): its prompts' first pass verifies drafts too.
        self.draft_round(self.groups[0])
        turn = 0
        while any(g.active for g in self.groups):
            if self._joint():
                for g in self.groups:
                    if g.draft_tokens is None:
                        self.draft_round(g)
                self.target_round(*self.groups)
                self.stats.joint_passes += 1
                self._measure()
                self._adapt()
                self._merge_tail()
                continue
            g = self.groups[turn % len(self.groups)]
            other = self.groups[(turn + 1) % len(self.groups)]
            if other is not g:
                self.draft_round(other)  # on the draft stream, under g's target pass
            self.target_round(g)
            if other is g:
                self._adapt()
                self.draft_round(g)  # serial: the draft waits for the target
            turn += 1
            if turn % len(self.groups) == 0:
                self._measure()
                self._adapt()
                self._merge_tail()
        self._measure(final=True)

    def _merge_tail(self) -> None:
        """At the tail of a workload (no prompt waiting, the live rows fit in one group) the
        two groups become one: each pass then serves every live row, where two half-empty
        groups would each pay a whole pass for half of them. The pending drafts are dropped
        (the draft caches roll back over them) and the merged group drafts afresh."""
        if len(self.groups) < 2 or self.waiting or any(g.refill for g in self.groups):
            return
        live = [(g, b) for g in self.groups for b in range(g.rows) if g.request[b] is not None]
        dst = max(self.groups, key=lambda g: sum(r is not None for r in g.request))
        if len(live) > dst.rows:
            return
        moved = {}  # the target's cache in segments: each moving row's new segment in dst's pool
        if self.target_segmented:
            for g, b in live:
                if g is not dst:
                    first = dst.target_slots.alloc(g.target_segment[b][1])
                    if first is None:  # no room in dst's pool: the groups go on as they are
                        for a, n in moved.values():
                            dst.target_slots.release(a, n)
                        return
                    moved[g, b] = (first, g.target_segment[b][1])
        if self.cuda:  # the host copies below touch caches (maybe in host memory) in flight
            torch.cuda.synchronize(self.device)
        for g in self.groups:
            if g.draft_tokens is not None:  # drafted, not verified: γ+1 draft steps to undo
                g.draft_cache.rollback(g.draft_tokens.shape[1] + 1)
            g.draft_tokens = g.draft_probs = g.drafted = None
        free = [b for b in range(dst.rows) if dst.request[b] is None]
        for g, b in live:
            if g is dst:
                continue
            d = free.pop(0)
            caches = [(g.target_cache, dst.target_cache)]
            if self.target_segmented:  # its K/V into its new segment in dst's pool
                (a, n), (first, _) = g.target_segment[b], moved[g, b]
                src, out = g.target_cache, dst.target_cache
                out.k_pool[:, :, first:first + n] = src.k_pool[:, :, a:a + n]
                out.v_pool[:, :, first:first + n] = src.v_pool[:, :, a:a + n]
                dst.target_segment[d] = moved[g, b]
                out.assign([d], [first], [n])
                out.lengths[d] = src.lengths[b]
                caches = []
            if self.segmented:  # one pool: the row's segment changes hands, not its K/V
                dst.segment[d] = g.segment[b]
                dst.draft_cache.assign([d], [g.segment[b][0]], [g.segment[b][1]])
                dst.draft_cache.lengths[d] = g.draft_cache.lengths[b]
            else:
                caches.append((g.draft_cache, dst.draft_cache))
            for src, out in caches:
                out.k[:, d] = src.k[:, b]
                out.v[:, d] = src.v[:, b]
                out.lengths[d] = src.lengths[b]
            dst.last[d] = g.last[b]
            dst.request[d] = g.request[b]
        self.groups = [dst]
        self._pending_drafts, self._pending_cpu = [], []
        self.stats.tail_merges += 1
        self.draft_round(dst)  # before its next pass, as every group's

    def _measure(self, final: bool = False) -> None:
        """Fold finished rounds' device timings into the stats (no extra sync)."""
        if not self.cuda:
            return
        if final:
            torch.cuda.synchronize(self.device)
        done = [t for t in self.timings if t.target_end.query()
                and all(end.query() for _, _, end, _ in t.drafts)]
        for t in done:
            target = t.target_start.elapsed_time(t.target_end) / 1e3
            self.stats.target_seconds += target
            self.target_pass_s = target
            if t.drafts:
                self.stats.round_seconds += t.wall
                self.stats.rounds += 1
            for start, steps_at, end, count in t.drafts:
                draft = start.elapsed_time(end) / 1e3
                self.stats.draft_seconds += draft
                # γ is chosen from the steps alone: a round with new prompts prefills them too
                steps = steps_at.elapsed_time(end) / 1e3
                self.stats.draft_prefill_seconds += draft - steps
                self.draft_step_s = steps / count
                # The draft's time on the device that overlapped the target's pass (events on
                # two streams, one clock). Not target + draft - the round's wall time: that
                # charges the host's turn between passes to the draft.
                begin = t.target_start.elapsed_time(start) / 1e3
                end_s = t.target_start.elapsed_time(end) / 1e3
                hidden = max(min(end_s, target) - max(begin, 0.0), 0.0)
                self.stats.draft_hidden_seconds += hidden
                self.stats.expose(t.kind, draft - hidden)
        self.timings = [t for t in self.timings if t not in done]
