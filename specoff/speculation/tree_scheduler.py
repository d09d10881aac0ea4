"""The SpecExec schedule (arXiv 2406.02532) over a batch of rows: each round the draft grows
a tree per row (growth.grow), the target verifies every row's tree in one pass
(verify.target_picks, accept) and the accepted paths are committed to both caches.

With more prompts than rows, a row that finishes takes the next waiting prompt: its prefill
joins the next round's verification pass (more parts of the same pass: the weights still
stream once) and gives its first token; the draft's prefill of it follows that pass, on its
own stream where there is one. Until then the row rides along "parked": its cache length is
set past every prompt, so the tree growth and the verification pass write their slots out of
the way of the prompt being prefilled into the same row. Idle rows with nothing to wait for
ride along at length 1.
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..kvcache import KVCache, SegmentAllocator, SegmentKVCache, cache_slots
from ..models.passes import PrefillBatch, row_chunk
from ..options import CacheOptions
from ..planner import TreeBudgetTuner, tree_curve
from ..sampling import SamplingParams, select
from .growth import AcceptanceModel, GrowthGraphs, grow
from .requests import Request, SpecRun, next_request, pad_prompts
from .tree import NEG_INF, Tree, tree_part
from .verify import accept, commit, target_picks


def draft_cache_slots(rows: int, prompts: Sequence[int], max_new_tokens: int,
                      capacity: int, options: CacheOptions) -> Tuple[int, bool]:
    """(slots, segmented): the draft's cache for a tree run over `rows` rows, a segment pool
    or rows × the longest need, as CacheOptions.segment_draft_cache says (kvcache.cache_slots)."""
    return cache_slots(rows, prompts, max_new_tokens, capacity, options.segment_draft_cache,
                       options.draft_slack)


def tree_passes(prompts: int, rows: int, new_tokens: int, accepted_histogram: Sequence[int],
                seed: int = 0,
                request_histograms: Optional[Sequence[Sequence[int]]] = None) -> int:
    """Verification passes a tree run takes for `prompts` prompts of `new_tokens` tokens each
    over `rows` rows, simulated as generate_tree schedules them: the first prompts' prefill
    gives their first token (a pass of its own, not counted here); each pass a serving row
    emits 1 + a tokens, a drawn from `accepted_histogram` ([k]: row passes that accepted k
    nodes, as GenerationStats counts them); a freed row takes the next prompt, whose prefill
    rides on the next pass and gives one token. The rows left empty at the tail and each
    row's overshoot of its last pass are what a finite workload pays beyond the steady state
    (docs/decisions.md has it against measured passes).

    `request_histograms`: one histogram per request seen (GenerationStats.request_histograms).
    Rows then differ as requests do: each prompt takes one request's pace, its mean tokens a
    pass, the requests in a shuffled order (all once, then again), so rows the draft predicts
    badly keep their slow pace and set the tail, as they do in a run. The pace, not passes
    drawn from the request's histogram: a request's histogram already holds one draw of its
    luck, and drawing again around it spreads the slowest rows further than any run does."""
    weights = np.asarray(accepted_histogram, dtype=float)
    if not len(weights) or weights.sum() <= 0 or rows < 1:
        raise ValueError("tree_passes needs a non-empty accepted histogram and rows >= 1")
    rng = np.random.default_rng(seed)
    weights /= weights.sum()
    per_request = [np.asarray(h, dtype=float) / sum(h)
                   for h in (request_histograms or []) if sum(h) > 0]
    order: list = []

    def draw_weights():
        """The acceptance distribution of the next prompt a row takes."""
        if not per_request:
            return weights
        if not order:
            order.extend(rng.permutation(len(per_request)).tolist())  # numpy: no device
        return per_request[order.pop()]

    def pace(w) -> float:
        """Tokens a pass of a row at acceptance distribution w: 1 + the accepted nodes."""
        return float(np.dot(np.arange(1, len(w) + 1), w))

    waiting = prompts - min(rows, prompts)
    left = [new_tokens - 1 if b < prompts else 0 for b in range(rows)]  # tokens still to emit
    row_weights = [draw_weights() if b < prompts else weights for b in range(rows)]
    refill: set = set()

    def assign() -> None:
        nonlocal waiting
        for b in range(rows):
            if left[b] == 0 and waiting:
                waiting -= 1
                left[b] = new_tokens
                row_weights[b] = draw_weights()
                refill.add(b)

    assign()
    passes = 0
    while any(left):
        passes += 1
        live = [b for b in range(rows) if left[b] and b not in refill]
        if per_request:  # each row at its own request's pace
            for b in live:
                rest = left[b] - pace(row_weights[b])
                left[b] = rest if rest > 1e-9 else 0
        else:
            drawn = rng.choice(len(weights), size=len(live), p=weights)
            for b, a in zip(live, drawn):
                left[b] = max(left[b] - 1 - int(a), 0)
        for b in refill:
            left[b] -= 1
        refill.clear()
        assign()
    return passes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _record(device: torch.device):
    """An event at this point of the device's current stream (None off a GPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _draft_prefill(draft, ids, lens, lens_host, rows, cache: KVCache, chunk: int, stream, after):
    """The draft's K/V of new prompts into `rows` of its cache (lengths left to the caller),
    on `stream` (if any) once the event `after` has passed; returns what _join waits for."""
    if stream is not None:
        stream.wait_event(after)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        draft.run_parts(PrefillBatch(ids, cache, chunk, rows=rows, device=ids.device,
                                     lengths_host=lens_host).parts)
        done = _record(ids.device) if stream is not None else None
    if stream is not None:
        for t in (ids, lens, rows):  # made on the current stream, read on this one
            t.record_stream(stream)
    return done


def _join(done, device: torch.device) -> None:
    """The device's current stream waits for a _draft_prefill."""
    if done is not None:
        torch.cuda.current_stream(device).wait_event(done)


@dataclass
class TreeRows:
    """The batch's rows: the request each serves and the slots its segment holds."""
    serving: List[Optional[int]]  # the request each row serves (None: idle)
    segment: List[Optional[Tuple[int, int]]]  # (first slot, slots) of a serving row's segment
    refill: List[int] = field(default_factory=list)  # rows whose new prompt the next pass prefills

    def busy(self) -> bool:
        return any(r is not None for r in self.serving)


class TreeScheduler:
    """Tree-mode generation for `requests` over `rows_per_pass` rows (module docstring).

    `budget`: nodes per row per tree, or a TreeBudgetTuner that picks one before each round
    from the rounds it has seen (these and earlier calls'). `prefill_chunk`: prompt tokens a
    row per prefill part, the plan's; a part holds at most that × rows_per_pass tokens
    however few rows it fills (the plan's memory counts that many). `acceptance`: rank nodes
    by acceptance learned from the target's verdicts (AcceptanceModel), kept across calls.
    """

    def __init__(self, run: SpecRun, requests: Sequence[Request], params: SamplingParams,
                 generator, stats, rows_per_pass: int, budget, *, kv_on_gpu: bool = True,
                 prefill_chunk: Optional[int] = None,
                 acceptance: Optional[AcceptanceModel] = None):
        self.run_, self.requests, self.params = run, requests, params
        self.generator, self.stats = generator, stats
        self.tuner = budget if isinstance(budget, TreeBudgetTuner) else TreeBudgetTuner([budget])
        self.acceptance = acceptance
        self.device = run.device
        self.eos = set(run.eos_token_ids) if not params.ignore_eos else set()
        self.capacity = self.tuner.max_budget
        self.B = B = min(rows_per_pass, len(requests))
        self.chunk = prefill_chunk or run.options.prefill_chunk
        longest = max(len(r.prompt) for r in requests)
        self.max_len = longest + params.max_new_tokens + self.capacity + 2
        # past every prompt: the tree's slots and commit fit after it
        self.park = self.max_len - self.capacity - 1
        self.idle = self.capacity + 3  # a row with nothing to serve: a tree at length 1
        self._make_caches(kv_on_gpu)
        self.rows = TreeRows([None] * B, [None] * B)
        self.waiting = deque(range(len(requests)))
        self.rounds: list = []  # (budget, tokens per row per pass, pass seconds, growth seconds)
        self.per_request: dict = {}  # request → [k]: its row passes that accepted k nodes
        # The draft's prefill of new prompts: on its own stream, under the target's pass?
        self.draft_stream = (torch.cuda.Stream(self.device)
                             if self.device.type == "cuda" and run.options.spec.draft_prefill_stream
                             else None)
        stats.tree_budgets = stats.tree_budgets or []

    def _make_caches(self, kv_on_gpu: bool) -> None:
        """The target's cache where the plan puts it (in pinned host memory it streams to the
        GPU for each layer's attention), the draft's on the device: each dense, or with rows
        in segments of a pool sized by the queue's prompts."""
        run, B, device = self.run_, self.B, self.device
        tcfg, dcfg, options = run.target_config, run.draft_config, run.options.cache
        where = device if kv_on_gpu else torch.device("cpu")
        host = where.type != device.type
        pool, self.segmented = draft_cache_slots(
            B, [len(r.prompt) for r in self.requests], self.params.max_new_tokens,
            self.capacity, options)
        # The target's cache in the draft's segments (the same slots): in host memory, a
        # pass then streams what the rows hold instead of rows × the longest.
        mode = options.segment_target_cache
        target_segmented = self.segmented and (mode == "on" or (mode == "auto" and host))
        if target_segmented:
            self.tcache = SegmentKVCache(tcfg.n_layers, B, pool, self.max_len + 1, tcfg.n_kv_heads,
                                         tcfg.head_dim, run.dtype, where, pin_memory=host,
                                         lengths_device=device)
        else:
            self.tcache = KVCache(tcfg.n_layers, B, self.max_len, tcfg.n_kv_heads, tcfg.head_dim,
                                  run.dtype, where, pin_memory=host, lengths_device=device)
        self.free_slots = None
        if self.segmented:
            self.dcache = SegmentKVCache(dcfg.n_layers, B, pool, self.max_len + 1,
                                         dcfg.n_kv_heads, dcfg.head_dim, run.dtype, device)
            self.free_slots = SegmentAllocator(B * self.idle, pool)
        else:
            self.dcache = KVCache(dcfg.n_layers, B, self.max_len, dcfg.n_kv_heads, dcfg.head_dim,
                                  run.dtype, device)
        self.segmented_caches = [c for c in (self.tcache, self.dcache) if c.row_start is not None]

    def _draft_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids for the draft: ids past its vocabulary (a prefix of the target's) as 0."""
        vocab = self.run_.draft_config.vocab_size
        return torch.where(ids < vocab, ids, torch.zeros_like(ids))

    def _take(self, b: int) -> bool:
        """Row b takes the next waiting request; with segments the first of the lookahead
        whose segment fits (False: none does)."""
        taken = next_request(self.waiting, self.requests,
                             [self.free_slots] if self.segmented else [],
                             self.params.max_new_tokens, self.capacity,
                             self.run_.options.cache.lookahead)
        if taken is None:
            return False
        request, starts, n = taken
        self.rows.serving[b] = request
        if starts:
            self.rows.segment[b] = (starts[0], n)
        return True

    @torch.inference_mode()
    def run(self) -> TreeBudgetTuner:
        """Serve every request; returns the tuner (what it learnt serves the next calls)."""
        self._start()
        self._place_free_rows()
        while self.rows.busy():
            self._round()
        self.stats.tree_curve = tree_curve(self.rounds)
        self.stats.request_histograms = [self.per_request[i] for i in sorted(self.per_request)]
        return self.tuner

    def _start(self) -> None:
        """The first prompts, one to a row, prefilled in both models; their first tokens."""
        rows, B = self.rows, self.B
        for b in range(B):  # the pool holds the first B prompts at once (segment_pool_slots)
            if not self._take(b):
                raise RuntimeError("the draft's segment pool cannot hold the first prompts")
        for c in self.segmented_caches:
            c.assign(range(B), [rows.segment[b][0] for b in range(B)],
                     [rows.segment[b][1] for b in range(B)])
        ids, lens, host = pad_prompts([self.requests[i].prompt for i in rows.serving], self.device)
        target, draft = self.run_.target, self.run_.draft
        last = select(target.prefill(ids, lens, self.tcache, self.chunk, lengths_host=host),
                      self.params, self.generator, self.run_.options.kernels)
        draft.prefill(self._draft_ids(ids), lens, self.dcache, self.chunk, lengths_host=host)
        self.stats.prefill_passes += 1
        for b, tok in enumerate(last.tolist()):  # once, after the first prefill
            if self.requests[rows.serving[b]].add(tok, self.eos, self.params.max_new_tokens):
                rows.serving[b] = None
        self.last, self.prev = last, None
        self.tree = Tree.empty(last, self.capacity)
        self.row_index = torch.arange(B, device=self.device)

    def _place_free_rows(self) -> None:
        """Give free rows the waiting prompts (prefilled in the next pass) and park them;
        rows with nothing left to serve ride along at length 1 (in their idle segment of
        the draft's cache). Every GPU use of a freed segment has ended: the round synced."""
        rows, device = self.rows, self.device
        free = [b for b in range(self.B) if rows.serving[b] is None]
        for b in free:
            if rows.segment[b] is not None:
                self.free_slots.release(*rows.segment[b])
                rows.segment[b] = None
            if self.waiting and self._take(b):
                rows.refill.append(b)
            elif self.waiting:
                self.stats.segment_waits += 1
        if not free:
            return
        at = torch.tensor(free, device=device)
        length = torch.tensor([self.park if b in rows.refill else 1 for b in free], device=device)
        if self.segmented:  # parked past the prompt in the row's own segment
            spans = [rows.segment[b] if b in rows.refill else (b * self.idle, self.idle)
                     for b in free]
            for c in self.segmented_caches:
                c.assign(free, [a for a, _ in spans], [n for _, n in spans])
            parked = torch.tensor([n - self.capacity - 2 if b in rows.refill else 1
                                   for b, (_, n) in zip(free, spans)], device=device)
        for c in (self.tcache, self.dcache):
            c.lengths[at] = parked if c.row_start is not None else length

    def _round(self) -> None:
        """Grow every row's tree, verify them in one target pass with the new prompts'
        prefill, commit, hand out the tokens, refill the free rows."""
        rows, stats = self.rows, self.stats
        verified = [b for b in range(self.B) if rows.serving[b] is not None
                    and b not in rows.refill]
        full = all(r is not None for r in rows.serving)  # every row busy: steady state
        n = self.tuner.next_budget()
        t0, t1, grow_seconds = self._grow(n)
        emitted, accepted, nodes, first = self._verify()
        t2 = time.perf_counter()
        if verified:
            self.rounds.append((n, sum(accepted[b] + 1 for b in verified) / len(verified),
                                t2 - t1, grow_seconds))
            self.tuner.record(*self.rounds[-1])
        stats.tree_budgets.append(n)
        stats.rounds += 1
        stats.draft_seconds += t1 - t0
        stats.target_seconds += t2 - t1
        returned = self._emit(verified, emitted, accepted, nodes, first)
        if full:
            stats.steady_tokens += returned
            stats.steady_seconds += t2 - t0
        rows.refill.clear()
        self._place_free_rows()

    def _grow(self, budget: int) -> Tuple[float, float, float]:
        """Every row's tree of `budget` nodes: (start, end, growth seconds without graph
        captures: the budget's curve is steady-state growth)."""
        run = self.run_
        _sync(self.device)  # one sync each side of the growth: it is timed per round
        t0, captured = time.perf_counter(), GrowthGraphs.capture_seconds
        grow(run.draft, self.dcache, self.last, budget, vocab=run.target_config.vocab_size,
             tree=self.tree, prev=self.prev, acceptance=self.acceptance,
             growth_tokens=run.options.spec.growth_tokens)
        _sync(self.device)
        t1 = time.perf_counter()
        capture = GrowthGraphs.capture_seconds - captured
        self.stats.graph_capture_seconds += capture
        return t0, t1, t1 - t0 - capture

    def _verify(self):
        """The target's pass over every tree (and the refilled rows' prompts), the walk, the
        commit to both caches. Returns host lists: each row's emitted tokens, accepted nodes,
        proposed nodes, and the refilled rows' first tokens."""
        run, rows, tree, device = self.run_, self.rows, self.tree, self.device
        tcache, dcache, params = self.tcache, self.dcache, self.params
        B = self.B
        parts = [tree_part(tree, torch.arange(tree.size, device=device).expand(B, -1), tcache)]
        refill = rows.refill
        if refill:
            new_ids, new_lens, new_host = pad_prompts(
                [self.requests[rows.serving[b]].prompt for b in refill], device)
            at = torch.tensor(refill, device=device)
            new_draft_ids = self._draft_ids(new_ids)  # before `grown`: the draft's stream reads it
            refill_chunk = row_chunk(self.chunk, B, len(refill))
            prefill = PrefillBatch(new_ids, tcache, refill_chunk, rows=at, device=device,
                                   lengths_host=new_host)
            parts += prefill.parts
        grown = _record(device)
        run.target.run_parts(parts)
        self.stats.decode_passes += 1
        if refill:
            # Issued once the host has queued the whole pass (nothing in it waits on the
            # host); with a draft stream, after the growth on that stream, so the draft's
            # prefill of the new prompts runs while the pass waits on its weight copies. It
            # writes positions [0, prompt) of rows parked past every prompt, apart from all
            # the pass, the growth and the commit touch; their lengths are set after the
            # commit.
            drafted = _draft_prefill(run.draft, new_draft_ids, new_lens, new_host, at, dcache,
                                     refill_chunk, self.draft_stream, grown)
        picks = target_picks(run.target.head, parts[0].h, params, self.generator,
                             chunk=run.options.spec.logit_rows, kernels=run.options.kernels)
        path, accepted, nxt = accept(tree, None, params, self.generator, self.acceptance,
                                     picks=picks)
        commit(tcache, path, accepted)
        commit(dcache, path, accepted)
        self.prev = tree.tokens[self.row_index, path[:, -1]]
        emitted = torch.cat([tree.tokens.gather(1, path[:, 1:]), nxt[:, None]], dim=1)
        emitted = emitted.scatter(1, accepted[:, None], nxt[:, None])
        self.last = nxt
        nodes = (tree.logp[:, :tree.size] > NEG_INF).sum(1) - 1  # proposed, past the root
        if refill:  # the new prompts' first tokens; their rows' lengths past their prompts
            first_tok = select(run.target.head(prefill.last_hidden(new_lens))[:, 0], params,
                               self.generator, run.options.kernels)
            _join(drafted, device)
            tcache.lengths[at] = new_lens
            dcache.lengths[at] = new_lens
            self.last[at] = first_tok
            self.prev[at] = new_ids.gather(1, (new_lens - 1)[:, None])[:, 0]
        # One sync per round (the first tokens are ready once the others are).
        first = first_tok.tolist() if refill else []
        return emitted.tolist(), accepted.tolist(), nodes.tolist(), first

    def _emit(self, verified, emitted, accepted, nodes, first) -> int:
        """The round's tokens to their requests (a row that finishes frees); returns how
        many were returned."""
        rows, stats, new = self.rows, self.stats, self.params.max_new_tokens
        returned = 0
        for b in verified:
            stats.count_verified(nodes[b], accepted[b])
            seen = self.per_request.setdefault(rows.serving[b], [])
            seen.extend([0] * (accepted[b] + 1 - len(seen)))
            seen[accepted[b]] += 1
            for tok in emitted[b][:accepted[b] + 1]:
                returned += 1
                if self.requests[rows.serving[b]].add(tok, self.eos, new):
                    rows.serving[b] = None
                    break
        for b, tok in zip(rows.refill, first):
            returned += 1
            if self.requests[rows.serving[b]].add(tok, self.eos, new):
                rows.serving[b] = None
        return returned
