"""SpecExec tree mode (arXiv 2406.02532): a best-first draft tree verified in one pass.

Growth (§3.2): per row, the draft grows a tree of likely continuations of the row's pending
token (the root) under a node budget N. Each draft pass expands, at once, the `width` most
probable nodes not yet expanded (attention over the row's cached prefix plus the node's
ancestors, positions = prefix length + depth) and proposes each one's top `children`
tokens. The tree keeps the N best of its nodes and the proposals by cumulative
log-probability: while there is room the proposals take empty slots; once full, a proposal
better than the worst node takes the worst leaf's slot (its draft K/V slot and ancestor
row are reused). A child is never more probable than its parent, so whenever the most
probable unexpanded node is no better than the worst kept node, no further growth can
change the top-N set: growth stops there, or when every open node is at the depth cap.

Every pass has the same shapes (rows, width, N slots, empty ones at -inf) and no host
sync, so on a GPU it is captured once as a CUDA graph and replayed; the host reads each
pass's stop flag while the next pass runs, and a pass with nothing open changes nothing.

Verification: the target scores every node in one pass with the same ancestor mask.
Acceptance treats the tree as a cache of target distributions: the target picks a token at
the root (argmax, or a sample from its own distribution); the child carrying that token is
accepted and the walk goes on from it; at the first node with no such child the target's
pick is the bonus token. Exact for greedy and for sampling, whatever the tree's shape.

Node i of row b keeps its K/V in cache slot lengths[b] + i during a round; commit gathers
the accepted path into positions lengths[b] + depth, in the target's cache and the
draft's. Arrays are preallocated for the largest budget: token, parent, depth, cumulative
log-probability, the ancestor mask and two flags (expanded, draft K/V present).
"""
from __future__ import annotations

import contextlib
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..kvcache import (KVCache, SegmentAllocator, SegmentKVCache, bits, cache_slots,
                       check_segment_mode, draft_cache_dtype, segment_pool_slots, segment_size)
from ..models.decoder import PassPart, PrefillBatch, TreeMask, row_chunk
from ..planner import TreeBudgetTuner, tree_curve
from ..sampling import SamplingParams, select
from .pipeline import pad_prompts

NEG_INF = float("-inf")


GROWTH_TOKENS = 512  # the most nodes one growth pass expands over all rows (default shape)
COMMIT_SCRATCH_BYTES = 64 << 20  # commit moves K/V through at most this much scratch at once
LOGIT_ROWS = 512  # the target's picks over a tree pass: logits of this many nodes at a time
# Refills: the draft prefills the new prompts on its own CUDA stream under the target's pass
# (True) or after it on the pass's stream (False). H200, 130 rows, 16-node trees, 328
# HumanEval prompts (`tools/gpu_session.sh overlap`, session 11): pass 1.943 s on its own
# stream against 1.970 s after the pass (one A/B pair after a warm-up run).
DRAFT_PREFILL_STREAM = True
# The draft's cache: a segment per row sized for its own prompt in a pool shared by the rows
# (kvcache.SegmentKVCache) or every row as long as the longest prompt needs: "auto" takes
# the pool where it is the smaller (many rows, prompts of different lengths), "on" and
# "off" force one. The pool: SEGMENT_SLACK × the rows' mean need, and two of the longest.
SEGMENT_DRAFT_CACHE = "auto"
SEGMENT_SLACK = 1.15
SEGMENT_LOOKAHEAD = 8  # a refill takes the first of this many waiting prompts that fits
# The target's cache in the same segments as the draft's, where the draft's is segmented:
# "auto" where the target's cache sits in host memory (a pass streams the pool, what the
# rows hold, instead of rows × the longest: ~11 GB a pass at 222 HumanEval rows of
# Mixtral 8x7B against ~6 GB), "on" anywhere, "off". H200, 237 rows, 328 prompts, 16
# tokens, ABAB (session 12): passes 2.180 / 2.111 s off, 2.094 / 1.924 s auto; tokens/s
# 158.6 / 150.0 against 142.9 / 169.3, within the noise of 11-13 round runs whose growth
# timings carried each run's graph captures. "auto" since: half the pinned host memory, and
# at the ~430 rows an fp8 draft leaves room for, ~9 GB a pass streamed instead of ~21.
SEGMENT_TARGET_CACHE = "auto"
# Plain rows: up to this many rows beyond the plan's tree rows that the target alone serves,
# a token each a pass, in the same passes as the trees (their cache where the target's is, in
# row segments when in host memory). A copy-bound pass streams the weights once for both:
# a plain row costs it little more than its cache's stream, and rows are not bounded by the
# draft's cache. A tree row that frees when no prompt waits takes over the plain row with the
# most tokens still to come (its prompt and tokens so far prefilled as a refill), so a
# queue's tail runs at tree speed. (H200, 24 GiB, 492 HumanEval prompts × 32 tokens: the
# target alone batching every prompt, 251.9 tokens/s, beat 222 tree rows, 231.1, whose
# queue ran in three waves: session 12.) 0: off. Measured (H200, 24 GiB, 492 prompts × 32
# tokens, ABAB, session 13): 200 plain rows beside 226 tree rows 282.5 / 303.6 tokens/s,
# 248 tree rows alone 301.6 / 326.2: the pass grew by the plain rows' prefill and cache
# stream more than they added. Off.
PLAIN_ROWS = 0
# A workload's tail: once no prompt waits and at most TAIL_ROWS × the batch's rows still
# serve, the serving rows go on alone (a batch of their own over the same cache pools, each
# row's segment moved to a larger one where it must grow) with trees of up to TAIL_BUDGET
# nodes: the budget × the batch's rows / the serving rows, in powers of two. A copy-bound
# pass costs about the same over fewer rows with bigger trees, so the rows that set the end
# could take more tokens a pass. Needs both caches in segments (the target's then sits in
# them on the GPU too); 0: off. Measured (H200, 24 GiB, the 164 HumanEval prompts × 32
# tokens, session 15): Qwen3-30B-A3B pair, one run each way in one call, 176.6 tokens/s with
# TAIL_BUDGET 128 against 194.5 without (22 passes against 23; the last 10 rows took 1.9
# tokens a pass with 128-node trees: rows the draft predicts badly, which bigger trees do
# not fix) and 3.7 s of graph captures for the new shapes; Mixtral 8x7B 191.3 (11 passes,
# as without; 204.6 without in session 13). Off.
TAIL_BUDGET = 0
TAIL_ROWS = 0.5


def growth_shape(budget: int, rows: int = 1) -> Tuple[int, int]:
    """Default (width, children) for a budget: a draft pass over up to ~128 nodes costs about
    what a pass over one does on a GPU (the weights' read), so wide passes grow big trees in
    few passes: 16 nodes a pass up to budget 64, then budget / 4 up to 64, budget / 8 up to
    256. Over many rows a pass's nodes are capped at GROWTH_TOKENS in all: past that the
    draft's pass costs its FLOPs (144 rows × 16 nodes ~ 33 TFLOP), while growth by acceptance
    ranks is deep and narrow, opening few nodes a pass per row."""
    width = min(budget, max(16, min(64, budget // 4), min(256, budget // 8)))
    width = max(1, min(width, GROWTH_TOKENS // max(rows, 1)))
    children = 4 if budget <= 32 else 8
    return width, children


@dataclass
class Tree:
    """A tree per row, in `size` slots of preallocated arrays. An empty slot (a row with
    fewer nodes than another) has parent -1, log-probability -inf, and is never matched."""
    tokens: torch.Tensor  # (B, C) long
    parent: torch.Tensor  # (B, C) long, -1 at the root and at empty slots
    depth: torch.Tensor  # (B, C) long
    logp: torch.Tensor  # (B, C) float, cumulative draft log-probability
    ancestors: torch.Tensor  # (B, C, C) bool: ancestors[b, i, j] iff j is i or an ancestor of i
    expanded: torch.Tensor  # (B, C) bool: the node's children were proposed (or the slot is empty)
    has_kv: torch.Tensor  # (B, C) bool: the draft's K/V of the node sits in its slot
    rank: torch.Tensor  # (B, C) long: the node's rank among its parent's proposals (0: the draft's top)
    own: torch.Tensor  # (B, C) float: the draft's log-probability of the node's token after its parent
    size: int  # slots in use (the same in every row)

    @classmethod
    def empty(cls, root: torch.Tensor, capacity: int) -> "Tree":
        B, device = root.shape[0], root.device
        tree = cls(tokens=torch.zeros(B, capacity, dtype=torch.long, device=device),
                   parent=torch.empty(B, capacity, dtype=torch.long, device=device),
                   depth=torch.empty(B, capacity, dtype=torch.long, device=device),
                   logp=torch.empty(B, capacity, device=device),
                   ancestors=torch.empty(B, capacity, capacity, dtype=torch.bool, device=device),
                   expanded=torch.empty(B, capacity, dtype=torch.bool, device=device),
                   has_kv=torch.empty(B, capacity, dtype=torch.bool, device=device),
                   rank=torch.empty(B, capacity, dtype=torch.long, device=device),
                   own=torch.empty(B, capacity, device=device), size=1)
        tree.reset(root)
        return tree

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return (self.tokens, self.parent, self.depth, self.logp, self.ancestors, self.expanded,
                self.has_kv, self.rank, self.own)

    def to(self, device) -> "Tree":
        return Tree(*(t.to(device) for t in self.tensors()), size=self.size)

    def reset(self, root: torch.Tensor) -> None:
        """Only the root (B,), not yet expanded and without draft K/V."""
        self.tokens.zero_()
        self.parent.fill_(-1)
        self.depth.zero_()
        self.logp.fill_(NEG_INF)
        self.ancestors.zero_()
        self.expanded.fill_(True)
        self.has_kv.fill_(True)
        self.rank.zero_()
        self.own.zero_()
        self.tokens[:, 0] = root
        self.logp[:, 0] = 0.0
        self.ancestors[:, 0, 0] = True
        self.expanded[:, 0] = self.has_kv[:, 0] = False
        self.size = 1

    def load(self, src: "Tree") -> None:
        """This tree := `src` (of capacity <= this one's) in the first slots, the others empty."""
        self.reset(src.tokens[:, 0])
        N = src.capacity
        for dst, values in zip(self.tensors(), src.tensors()):
            (dst[:, :N, :N] if dst.dim() == 3 else dst[:, :N]).copy_(values)
        self.size = src.size

    @classmethod
    def from_parents(cls, tokens, parents) -> "Tree":
        """A hand-built tree (one row per list): parents[i] < i, parents[0] = -1."""
        tok = torch.tensor(tokens, dtype=torch.long)
        par = torch.tensor(parents, dtype=torch.long)
        B, N = tok.shape
        tree = cls.empty(tok[:, 0], N)
        tree.tokens, tree.parent, tree.size = tok, par, N
        for i in range(1, N):
            p = par[:, i]
            tree.depth[:, i] = tree.depth.gather(1, p[:, None])[:, 0] + 1
            tree.ancestors[:, i] = tree.ancestors[torch.arange(B), p]
            tree.ancestors[:, i, i] = True
        tree.logp.zero_()
        tree.own.zero_()
        tree.expanded.zero_()
        tree.has_kv.zero_()
        return tree

    def open_nodes(self, max_depth: int) -> torch.Tensor:
        """(B, size) bool: the nodes whose children could still enter the row's top `size`:
        unexpanded, under the depth cap and above the row's worst node (-inf while the row has
        an empty slot; a child is never above its parent, so nothing else can enter)."""
        logp = self.logp[:, :self.size]
        worst = logp.min(dim=1, keepdim=True).values
        return ~self.expanded[:, :self.size] & (self.depth[:, :self.size] < max_depth) & (logp > worst)

    def merge(self, cand_logp: torch.Tensor, cand_parent: torch.Tensor,
              cand_tokens: torch.Tensor, cand_rank: Optional[torch.Tensor] = None,
              cand_own: Optional[torch.Tensor] = None) -> None:
        """Keep the `size` best of the tree's nodes and the candidate children (B, M) by
        cumulative log-probability, ties to the shallower node: a parent always outranks its
        children, so what is kept is a tree and only whole subtrees (in practice leaves) are
        dropped. Empty slots and candidates at -inf are never kept. Kept candidates take the
        dropped nodes' slots and the empty ones; fixed shapes, no host sync. cand_rank,
        cand_own: each candidate's rank among its parent's proposals and its draft
        log-probability (default 0 and cand_logp)."""
        B, M = cand_logp.shape
        N, device = self.size, cand_logp.device
        cand_depth = self.depth.gather(1, cand_parent) + 1
        logp = torch.cat([self.logp[:, :N], cand_logp], dim=1)  # (B, N + M)
        depth = torch.cat([self.depth[:, :N], cand_depth], dim=1)
        by_depth = depth.argsort(dim=1, stable=True)
        order = by_depth.gather(1, logp.gather(1, by_depth).argsort(dim=1, descending=True,
                                                                    stable=True))
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(N + M, device=device).expand(B, -1).contiguous())
        kept = (rank < N) & (logp > NEG_INF)
        keep_old, keep_new = kept[:, :N], kept[:, N:]
        # Dropped nodes only make room for kept candidates, so the free slots (dropped or
        # empty) number at least the kept candidates; free slots left over were empty.
        K = min(M, N)
        slot = keep_old.long().argsort(dim=1, stable=True)[:, :K]  # free slots first
        pick = (~keep_new).long().argsort(dim=1, stable=True)[:, :K]  # kept candidates first
        # Column k places a candidate iff k < the row's count; the other columns write a slot's
        # own values back (their slots differ from the placed ones).
        fill = torch.arange(K, device=device) < keep_new.sum(1, keepdim=True)  # (B, K)
        parent = cand_parent.gather(1, pick)
        values = [(self.tokens, cand_tokens.gather(1, pick)), (self.parent, parent),
                  (self.depth, cand_depth.gather(1, pick)), (self.logp, cand_logp.gather(1, pick)),
                  (self.expanded, False), (self.has_kv, False)]
        values.append((self.rank, 0 if cand_rank is None else cand_rank.gather(1, pick)))
        values.append((self.own, (cand_logp if cand_own is None else cand_own).gather(1, pick)))
        ancestors = self.ancestors[:, :N, :N]
        anc = ancestors.gather(1, parent[..., None].expand(-1, -1, N))  # (B, K, N): the parent's set
        anc.scatter_(2, slot[..., None], True)  # and the node itself
        for buf, value in values:
            buf.scatter_(1, slot, torch.where(fill, value, buf.gather(1, slot)))
        rows_at = slot[..., None].expand(-1, -1, N)
        ancestors.scatter_(1, rows_at, torch.where(fill[..., None], anc, ancestors.gather(1, rows_at)))


class AcceptanceModel:
    """How likely the target is to pick a proposed child, learned from verification.

    The draft's own probabilities can be far from the chance that the target agrees: where
    they understate it, ranking nodes by draft log-probability grows wide, shallow trees
    (the random-weight Mixtral-8x7B benchmark pair, batch 1, budget 1024 on the H200: 4.78
    tokens a pass by draft ranks, 8.73 by learned ones). Like
    Sequoia's positional acceptance vector (arXiv 2402.12374), but keyed by the child's rank
    among its parent's proposals *and* a bin of its draft log-probability, this keeps
    per-cell counts of proposals and of those the target picked. Every verified tree adds
    one sample per proposed node (its parent's target pick is known at every node, on the
    accepted path or not). The estimate is (hits + w·p₀) / (proposals + w), where p₀ is the
    draft's probability at the bin's centre: an unseen cell scores as the draft says.
    Growth ranks nodes by the sum of these log-estimates along the path, a monotone score
    (each term <= 0), so growth's stopping rule still holds; exactness of acceptance does not
    depend on the tree's shape. Counts halve once they pass `cap`, to follow a drift.
    `table` is updated in place: CUDA graphs of growth read the current values.
    """
    EDGES = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0)  # -log p

    def __init__(self, device, ranks: int = 8, prior: float = 4.0, cap: float = 1e5):
        device = torch.device(device)
        self.edges = torch.tensor(self.EDGES, device=device)
        bounds = (0.0,) + self.EDGES + (16.0,)
        centres = torch.tensor([(a + b) / 2 for a, b in zip(bounds, bounds[1:])], device=device)
        self.p0 = torch.exp(-centres).expand(ranks, -1).contiguous()  # (ranks, bins)
        self.prior, self.cap = prior, cap
        self.hits = torch.zeros_like(self.p0)
        self.trials = torch.zeros_like(self.p0)
        self.table = torch.log(self.p0)  # (ranks, bins) log-estimates

    @property
    def ranks(self) -> int:
        return self.table.shape[0]

    def cells(self, rank: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Flat cell index of (rank, draft log-probability)."""
        bins = torch.bucketize(-own.float(), self.edges)
        return rank.clamp(max=self.ranks - 1) * self.table.shape[1] + bins

    def score(self, own: torch.Tensor) -> torch.Tensor:
        """Log-estimates for top-k proposals own (..., k) in rank order."""
        rank = torch.arange(own.shape[-1], device=own.device).expand_as(own)
        return self.table.view(-1)[self.cells(rank, own)]

    def observe(self, tree: "Tree", picks: torch.Tensor) -> None:
        """Count a verified tree: picks (B, N), the target's token after each node."""
        N = tree.size
        if N < 2:
            return
        parent = tree.parent[:, 1:N]
        valid = (parent >= 0) & (tree.logp[:, 1:N] > NEG_INF)
        hit = (tree.tokens[:, 1:N] == picks.gather(1, parent.clamp(min=0))) & valid
        cell = self.cells(tree.rank[:, 1:N], tree.own[:, 1:N]).reshape(-1)
        self.trials.view(-1).scatter_add_(0, cell, valid.reshape(-1).float())
        self.hits.view(-1).scatter_add_(0, cell, hit.reshape(-1).float())
        halve = torch.where(self.trials.sum() > self.cap, 0.5, 1.0)
        self.trials.mul_(halve)
        self.hits.mul_(halve)
        estimate = (self.hits + self.prior * self.p0) / (self.trials + self.prior)
        self.table.copy_(estimate.log().clamp(max=0.0))


def tree_mask(lengths: torch.Tensor, ancestors: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B, 1, T, kv_len) from ancestor rows (B, T, N): a node sees the row's cached prefix
    and the slots lengths + j of its ancestors j (itself included)."""
    return TreeMask(lengths, ancestors).dense(kv_len)


def tree_part(tree: Tree, nodes: torch.Tensor, cache: KVCache,
              vocab_size: Optional[int] = None) -> PassPart:
    """The pass over `nodes` (B, T) of the tree, with K/V written to their node slots.
    Tokens at or past `vocab_size` (a draft with a smaller vocabulary) become token 0."""
    lengths, N = cache.lengths, tree.size
    ancestors = tree.ancestors[:, :, :N].gather(1, nodes[..., None].expand(-1, -1, N))  # (B, T, N)
    tokens = tree.tokens.gather(1, nodes)
    if vocab_size is not None:
        tokens = torch.where(tokens < vocab_size, tokens, torch.zeros_like(tokens))
    return PassPart(tokens, cache,
                    positions=lengths[:, None] + tree.depth.gather(1, nodes), kv_len=cache.max_len,
                    slots=lengths[:, None] + nodes, mask=TreeMask(lengths, ancestors))


def root_part(tree: Tree, prev: torch.Tensor, cache: KVCache, vocab_size: int) -> PassPart:
    """The root with the token before it, (B, 2) causal at positions lengths - 1, lengths:
    that token is last round's deepest accepted node, whose draft K/V is missing when it was
    a leaf never expanded; recomputing it costs nothing extra on this pass."""
    tokens = torch.stack([prev, tree.tokens[:, 0]], dim=1)
    tokens = torch.where(tokens < vocab_size, tokens, torch.zeros_like(tokens))
    start = (cache.lengths - 1).clamp(min=0)
    positions = start[:, None] + torch.arange(2, device=start.device)
    return PassPart(tokens, cache, positions=positions, kv_len=cache.max_len)


@torch.inference_mode()
def expand(draft, cache: KVCache, tree: Tree, width: int, children: int, max_depth: int,
           vocab: Optional[int] = None, acceptance: Optional[AcceptanceModel] = None, *,
           root: bool = False, prev: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One growth pass over the tree's `size` slots, in fixed shapes with no host sync (a
    CUDA graph captures it): expand the `width` best open nodes (`root`: the root alone, with
    `prev` before it, see root_part) and merge their top `children` proposals. Picks past
    the open nodes only pad the pass: their K/V is rewritten (the same values: a node's
    ancestors are in place) or lands in an empty slot. Returns the stop flag, 0-dim bool:
    no node is open for the next pass. A pass with no node open leaves the tree as it is.
    `acceptance`: nodes are ranked by its learned log-estimates instead of the draft's
    log-probabilities (AcceptanceModel)."""
    B = tree.tokens.shape[0]
    open_ = tree.open_nodes(max_depth)
    if root:
        nodes = torch.zeros(B, 1, dtype=torch.long, device=open_.device)
        best = tree.logp[:, :1].masked_fill(~open_[:, :1], NEG_INF)
    else:
        best, nodes = tree.logp[:, :tree.size].masked_fill(~open_, NEG_INF).topk(width, dim=1)
    dvocab = draft.config.vocab_size
    if prev is not None:
        part = root_part(tree, prev, cache, dvocab)
        draft.run_parts([part])
        h = part.h[:, 1:]
    else:
        part = tree_part(tree, nodes, cache, dvocab)
        draft.run_parts([part])
        h = part.h
    valid = best > NEG_INF
    computed = valid | root  # the root's K/V is needed even with nothing to expand (budget 1)
    tree.has_kv.scatter_(1, nodes, tree.has_kv.gather(1, nodes) | computed)
    tree.expanded.scatter_(1, nodes, tree.expanded.gather(1, nodes) | valid)
    logprobs = torch.log_softmax(draft.head(h).float(), dim=-1)  # (B, w, V)
    if vocab is not None:
        logprobs = logprobs[..., :vocab]
    top_lp, top_tok = logprobs.topk(min(children, logprobs.shape[-1]), dim=-1)  # (B, w, c)
    step = top_lp if acceptance is None else acceptance.score(top_lp)
    # -inf under a padding pick, whatever its (maybe NaN) output.
    cand_logp = torch.where(valid[..., None], best[..., None] + step, NEG_INF).reshape(B, -1)
    cand_parent = nodes[..., None].expand_as(top_tok).reshape(B, -1)
    cand_rank = torch.arange(top_tok.shape[-1], device=top_tok.device).expand_as(top_tok)
    tree.merge(cand_logp, cand_parent, top_tok.reshape(B, -1), cand_rank.reshape(B, -1),
               top_lp.reshape(B, -1))
    return ~tree.open_nodes(max_depth).any()


def first_pass(draft, cache: KVCache, tree: Tree, root: torch.Tensor, budget: int, children: int,
               max_depth: int, vocab: Optional[int] = None,
               acceptance: Optional[AcceptanceModel] = None,
               prev: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reset the tree to `root` (B,) over `budget` slots and expand the root (see expand)."""
    tree.reset(root)
    tree.size = budget
    return expand(draft, cache, tree, 1, children, max_depth, vocab, acceptance, root=True,
                  prev=prev)


class GrowthGraphs:
    """The growth passes of one (draft, draft cache, rows, budget, growth shape) as CUDA graphs
    over a static tree: the first pass with `prev` and the wide pass, each captured once
    (warm-up on a side stream, like graphs.LayerGraphs) and replayed. The caller's tree gets
    a copy of the static one after growth (a few kernels)."""
    capture_seconds = 0.0  # spent capturing, all instances: round timings leave it out

    def __init__(self, draft, cache: KVCache, rows: int, budget: int, width: int, children: int,
                 max_depth: int, vocab: Optional[int], acceptance: Optional[AcceptanceModel], pool):
        # A weak reference: the graphs must not keep their cache (the dictionary key) alive.
        self.draft, self.cache, self.pool = draft, weakref.proxy(cache), pool
        self.shape = (budget, children, max_depth, vocab, acceptance)
        self.width = width
        self.root = torch.zeros(rows, dtype=torch.long, device=cache.k.device)
        self.prev = torch.zeros_like(self.root)
        self.tree = Tree.empty(self.root, budget)
        self.graphs = {}  # "first" | "wide" → (CUDAGraph, its stop flag)

    def first(self, root: torch.Tensor, prev: Optional[torch.Tensor]) -> torch.Tensor:
        self.root.copy_(root)
        if prev is None:  # once per batch (the first round): eager
            return first_pass(self.draft, self.cache, self.tree, self.root, *self.shape)
        self.prev.copy_(prev)
        return self._replay("first", lambda: first_pass(self.draft, self.cache, self.tree,
                                                        self.root, *self.shape, prev=self.prev))

    def wide(self) -> torch.Tensor:
        _, children, max_depth, vocab, acceptance = self.shape
        return self._replay("wide", lambda: expand(self.draft, self.cache, self.tree, self.width,
                                                   children, max_depth, vocab, acceptance))

    def _replay(self, name, step) -> torch.Tensor:
        if name not in self.graphs:
            self.graphs[name] = self._capture(step)
        graph, done = self.graphs[name]
        graph.replay()
        return done

    def _capture(self, step):
        # The warm-up pass runs for real; the tree is put back so that the replay after the
        # capture repeats it (the same K/V written to the same slots).
        stream = torch.cuda.current_stream(self.root.device)
        stream.synchronize()
        start = time.perf_counter()
        saved = [t.clone() for t in self.tree.tensors()]
        side = torch.cuda.Stream(self.root.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            step()
        stream.wait_stream(side)
        for t, s in zip(self.tree.tensors(), saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            done = step()
        stream.synchronize()
        GrowthGraphs.capture_seconds += time.perf_counter() - start
        return graph, done


# Draft KVCache → {"pool": memory pool, (draft, rows, budget, …): GrowthGraphs}, dropped with
# the cache. The graphs share a pool: they replay one at a time and their only outputs, the
# stop flags, are copied out right after each replay.
_growth_graphs = weakref.WeakKeyDictionary()


def drop_growth_graphs() -> None:
    """Forget every captured growth graph (a draft's weights moved: LLM._park_draft)."""
    _growth_graphs.clear()


def growth_graphs(draft, cache: KVCache, rows: int, budget: int, width: int, children: int,
                  max_depth: int, vocab: Optional[int],
                  acceptance: Optional[AcceptanceModel] = None) -> GrowthGraphs:
    per_cache = _growth_graphs.setdefault(cache, {})
    key = (draft, rows, budget, width, children, max_depth, vocab, id(acceptance))
    if key not in per_cache:
        if "pool" not in per_cache:
            per_cache["pool"] = torch.cuda.graph_pool_handle()
        per_cache[key] = GrowthGraphs(draft, cache, rows, budget, width, children, max_depth,
                                      vocab, acceptance, per_cache["pool"])
    return per_cache[key]


def _flag_to_host(flag: torch.Tensor):
    """Start copying a device stop flag to the host: (pinned copy, event) on a GPU."""
    if not flag.is_cuda:
        return flag, None
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _read_flag(pending) -> bool:
    host, event = pending
    if event is not None:
        event.synchronize()
    return bool(host)


@torch.inference_mode()
def grow(draft, cache: KVCache, root: torch.Tensor, budget: int, *, width: Optional[int] = None,
         children: Optional[int] = None, max_depth: int = 32, max_passes: Optional[int] = None,
         vocab: Optional[int] = None, tree: Optional[Tree] = None,
         prev: Optional[torch.Tensor] = None, graphs: Optional[bool] = None,
         acceptance: Optional[AcceptanceModel] = None) -> Tree:
    """Grow a best-first tree of at most `budget` nodes from `root` (B,) (module docstring).

    width, children: nodes expanded per draft pass and children proposed per node (default
    growth_shape(budget)); max_depth caps the depth; max_passes bounds the draft passes.
    `tree` is reused when given (capacity >= budget); its size is then `budget`. `prev` (B,):
    the token at position lengths - 1, recomputed in the first pass (see root_part). Every
    node that can end an accepted path has its draft K/V, except unexpanded leaves:
    root_part repairs those. `graphs`: replay CUDA graphs of the passes (default: where the
    draft has `use_graphs`, no streamed layers and the cache is on the GPU). `acceptance`:
    rank nodes by its learned estimates (AcceptanceModel) rather than draft log-probabilities.
    """
    default_width, default_children = growth_shape(budget, root.shape[0])
    width, children = min(width or default_width, budget), children or default_children
    max_passes = max_passes or max_depth + 2 * -(-budget // width)
    if prev is not None:
        prev = prev.clone()  # it may be a view of the tree reset below
    if tree is None:
        tree = Tree.empty(root, budget)
    else:
        assert tree.capacity >= budget, "the tree was allocated for a smaller budget"
    if graphs is None:
        graphs = (getattr(draft, "use_graphs", False) and getattr(draft, "ring", None) is None
                  and cache.k.is_cuda)
    if graphs:
        runner = growth_graphs(draft, cache, root.shape[0], budget, width, children, max_depth,
                               vocab, acceptance)
        first, wide = lambda: runner.first(root, prev), runner.wide  # noqa: E731
    else:
        first = lambda: first_pass(draft, cache, tree, root, budget, children,  # noqa: E731
                                   max_depth, vocab, acceptance, prev=prev)
        wide = lambda: expand(draft, cache, tree, width, children, max_depth, vocab,  # noqa: E731
                              acceptance)
    # On a GPU the host reads pass i's stop flag while pass i + 1 runs (then a no-op if the
    # tree was done): the GPU never waits for the host.
    lag = 1 if root.is_cuda else 0
    pending = []
    for step in range(max_passes):
        pending.append(_flag_to_host(first() if step == 0 else wide()))
        if len(pending) > lag and _read_flag(pending[-1 - lag]):
            break
    if graphs:
        tree.load(runner.tree)
    return tree


def target_picks(head, h: torch.Tensor, params: SamplingParams,
                 generator: Optional[torch.Generator], chunk: Optional[int] = None) -> torch.Tensor:
    """What the target picks after each node, (B, N): its head over the final hidden states
    h (B, N, D), greedy or sampled, LOGIT_ROWS rows × nodes at a time, so a throughput
    pass's logits (130 rows × 17 nodes × 32k vocabulary: 1.1 GiB in fp32 with top-p's sort)
    never sit in memory at once (planner.plan_run's max_logit_rows)."""
    B, N, D = h.shape
    flat, chunk = h.reshape(B * N, D), chunk or LOGIT_ROWS
    if B * N <= chunk:
        return select(head(h), params, generator)
    picks = torch.empty(B * N, dtype=torch.long, device=h.device)
    for lo in range(0, B * N, chunk):
        picks[lo:lo + chunk] = select(head(flat[lo:lo + chunk][None])[0], params, generator)
    return picks.view(B, N)


def accept(tree: Tree, target_logits: Optional[torch.Tensor], params: SamplingParams,
           generator: Optional[torch.Generator], acceptance: Optional[AcceptanceModel] = None,
           picks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk the tree with the target's picks: `picks` (B, N), or drawn here from
    target_logits (B, N, V) at every node; `acceptance` counts the tree's proposals against
    the picks (AcceptanceModel.observe).

    Returns (path (B, D+1) node indices, root first, padded with the last node; accepted
    (B,) nodes past the root; next token (B,))."""
    B, N = tree.tokens.shape[0], tree.size
    device = tree.tokens.device
    max_depth = int(tree.depth[:, :N].max()) + 1
    if picks is None:  # (B, N): what the target says after each node
        picks = select(target_logits, params, generator)
    if acceptance is not None:
        acceptance.observe(tree, picks)
    rows = torch.arange(B, device=device)
    cur = torch.zeros(B, dtype=torch.long, device=device)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    path = torch.zeros(B, max_depth + 1, dtype=torch.long, device=device)
    accepted = torch.zeros(B, dtype=torch.long, device=device)
    for step in range(max_depth):
        want = picks[rows, cur]  # (B,)
        match = (tree.parent[:, :N] == cur[:, None]) & (tree.tokens[:, :N] == want[:, None])
        found = match.any(dim=1) & alive
        child = match.float().argmax(dim=1)
        cur = torch.where(found, child, cur)
        accepted += found.long()
        alive &= found
        path[:, step + 1] = cur
    return path, accepted, picks[rows, cur]


def commit(cache: KVCache, path: torch.Tensor, accepted: torch.Tensor) -> None:
    """Move the accepted nodes' K/V from their slots lengths + node to the contiguous
    positions lengths + depth, and keep them (root + accepted).

    Kernels on the current stream do it, a few layers at a time (a bounded scratch), so no
    host sync: after the pass's own writes. A cache in pinned host memory beside a GPU
    (decoder.streamed_attention) is moved by the same kernels through its device alias
    (KVCache.mapped), only the path's nodes crossing the bus; gathering it on the CPU took
    seconds a round at 130 rows (Mixtral 8x7B, tree throughput, session 10)."""
    if cache.row_start is not None:  # rows of a shared pool (SegmentKVCache)
        _commit_segments(cache, path)
        cache.advance(accepted + 1)
        return
    L_, B, KV, S, hd = cache.k.shape
    P = path.shape[1]
    src = (cache.lengths[:, None] + path).clamp(max=S - 1)  # (B, P)
    dst = (cache.lengths[:, None] + torch.arange(P, device=path.device)).clamp(max=S - 1)
    bufs = (cache.k, cache.v)
    if cache.k.device != src.device:  # a cache in host memory (decoder.streamed_attention)
        if src.is_cuda:
            bufs = cache.mapped()
        else:
            src, dst = src.to(cache.k.device), dst.to(cache.k.device)
    step = max(1, COMMIT_SCRATCH_BYTES // (B * KV * P * hd * cache.k.element_size()))
    for lo in range(0, L_, step):
        n = min(step, L_ - lo)
        index = lambda i: i[None, :, None, :, None].expand(n, B, KV, P, hd)  # noqa: E731
        for buf in bufs:
            part = bits(buf[lo:lo + n])  # float8 caches move as bytes
            part.scatter_(3, index(dst), part.gather(3, index(src)))
    cache.advance(accepted + 1)


def _commit_segments(cache: SegmentKVCache, path: torch.Tensor) -> None:
    """commit's moves in a pool of row segments: the same gathers and scatters on slots (a
    pool in host memory through its device alias)."""
    B, P = path.shape
    L_, KV, _, hd = cache.k_pool.shape
    base, end = (cache.row_start + cache.lengths)[:, None], cache.row_end[:, None]
    src = torch.minimum(base + path, end).reshape(-1)  # (B * P,)
    dst = torch.minimum(base + torch.arange(P, device=path.device), end).reshape(-1)
    step = max(1, COMMIT_SCRATCH_BYTES // (B * KV * P * hd * cache.k_pool.element_size()))
    for lo in range(0, L_, step):
        n = min(step, L_ - lo)
        index = lambda i: i[None, None, :, None].expand(n, KV, B * P, hd)  # noqa: E731
        for pool in cache.pools_at(path.device):
            part = bits(pool[lo:lo + n])
            part.scatter_(2, index(dst), part.gather(2, index(src)))


def draft_cache_slots(rows: int, prompts: Sequence[int], max_new_tokens: int,
                      capacity: int) -> Tuple[int, bool]:
    """(slots, segmented): the draft's cache for a tree run over `rows` rows, a segment pool
    or rows × the longest need, as SEGMENT_DRAFT_CACHE says (kvcache.cache_slots)."""
    return cache_slots(rows, prompts, max_new_tokens, capacity, SEGMENT_DRAFT_CACHE,
                       SEGMENT_SLACK, "spec.tree.SEGMENT_DRAFT_CACHE")


def tree_passes(prompts: int, rows: int, new_tokens: int, accepted_histogram: Sequence[int],
                seed: int = 0, plain: int = 0,
                request_histograms: Optional[Sequence[Sequence[int]]] = None) -> int:
    """Verification passes a tree run takes for `prompts` prompts of `new_tokens` tokens each
    over `rows` rows, simulated as generate_tree schedules them: the first prompts' prefill
    gives their first token (a pass of its own, not counted here); each pass a serving row
    emits 1 + a tokens, a drawn from `accepted_histogram` ([k]: row passes that accepted k
    nodes, as GenerationStats counts them); a freed row takes the next prompt, whose prefill
    rides on the next pass and gives one token. The rows left empty at the tail and each
    row's overshoot of its last pass are what a finite workload pays beyond the steady state
    (on the H200 runs of session 10 it matched the measured passes within one: 40, 45, 44
    and 52 predicted against 40, 46, 43 and 51 at budgets 16, 8, 32 and 64). `plain`: plain
    rows (PLAIN_ROWS) beside them, a token each a pass; a freed tree row with no prompt
    waiting takes over the plain row with the most tokens to come.

    `request_histograms`: one histogram per request seen (GenerationStats.request_histograms).
    Rows then differ as requests do: each prompt takes one request's pace, its mean tokens a
    pass, the requests in a shuffled order (all once, then again), so rows the draft predicts
    badly keep their slow pace and set the tail, as they do in a run (one wave of 164 rows on
    the Qwen3-30B-A3B pair: 23 passes measured, session 15). The pace, not passes drawn from
    the request's histogram: a request's histogram already holds one draw of its luck, and
    drawing again around it spreads the slowest rows further than any run (H200, session
    19, 328 HumanEval prompts through 164 rows: 23 and 24 passes measured, 26–30 drawn)."""
    import numpy as np

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
    plain_left = [0] * plain
    refill: set = set()
    plain_refill: set = set()

    def assign() -> None:
        nonlocal waiting
        for b in range(rows):
            if left[b] == 0 and waiting:
                waiting -= 1
                left[b] = new_tokens
                row_weights[b] = draw_weights()
                refill.add(b)
            elif left[b] == 0 and plain:
                live = [p for p in range(plain) if plain_left[p] and p not in plain_refill]
                if live:
                    p = max(live, key=lambda p: plain_left[p])
                    left[b], plain_left[p] = plain_left[p], 0
                    row_weights[b] = draw_weights()
                    refill.add(b)
        for p in range(plain):
            if plain_left[p] == 0 and waiting:
                waiting -= 1
                plain_left[p] = new_tokens
                plain_refill.add(p)

    assign()
    passes = 0
    while any(left) or any(plain_left):
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
        for p in range(plain):
            plain_left[p] = max(plain_left[p] - 1, 0)
        refill.clear()
        plain_refill.clear()
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


def _take_request(queue, requests, allocator: Optional[SegmentAllocator], new_tokens: int,
                  extra: int):
    """(the request a free row takes from `queue`, its segment (first slot, slots) or None),
    removed from the queue: the next one, or with an `allocator` (rows in segments) the first
    of SEGMENT_LOOKAHEAD whose segment fits; None when none does."""
    if allocator is None:
        return queue.popleft() if isinstance(queue, deque) else queue.pop(0), None
    window = [queue[k] for k in range(min(SEGMENT_LOOKAHEAD, len(queue)))]
    found = allocator.take_first([segment_size(len(requests[i].prompt), new_tokens, extra)
                                  for i in window])
    if found is None:
        return None
    j, start, n = found
    taken = queue[j]
    del queue[j]
    return taken, (start, n)


def tail_budget_for(full_budget: int, batch_rows: int, serving: int) -> int:
    """A tail batch's tree budget: the full batch's × its rows / the serving rows, in powers
    of two, at most TAIL_BUDGET (the pass's nodes stay about what the full batch's were)."""
    grow = 1
    while 2 * grow * serving <= batch_rows:
        grow *= 2
    return max(full_budget, min(TAIL_BUDGET, full_budget * grow))


def _tail_batch(serving: list, segment: list, allocator: SegmentAllocator, requests,
                new_tokens: int, caches, budget: int, max_len: int):
    """The serving rows as a batch of their own, for trees of `budget` nodes: (their rows in
    the old batch, caches of just those rows over the same pools), or None where the pool has
    no room for the segments that must grow. A row whose segment cannot hold its cache, the
    tokens it still makes and a tree of `budget` nodes moves to a larger one, its cached K/V
    copied there on the caches' device (a pool in host memory through its device alias);
    `segment` (and the allocator) then hold the new segments. Every earlier use of the
    pools has ended (the round synced)."""
    act = [b for b, r in enumerate(serving) if r is not None]
    lengths = [c.lengths[act] for c in caches]
    # A sync, once per tail batch (a few a run), after the round's own sync.
    held = torch.maximum(*lengths).tolist() if len(caches) > 1 else lengths[0].tolist()
    moves, new_segments = [], {}
    for b, length in zip(act, held):
        need = segment_size(length, new_tokens - len(requests[serving[b]].tokens), budget)
        if segment[b][1] >= need:
            continue
        start = allocator.alloc(need)
        if start is None:  # put back what was taken: nothing moved
            for first, n in new_segments.values():
                allocator.release(first, n)
            return None
        new_segments[b] = (start, need)
        moves.append((segment[b][0], start, length))
    for c in caches:
        device = c.lengths.device
        if moves:
            src = torch.cat([torch.arange(a, a + n) for a, _, n in moves]).to(device)
            dst = torch.cat([torch.arange(a, a + n) for _, a, n in moves]).to(device)
            for pool in c.pools_at(device):
                pool = bits(pool)
                for layer in range(pool.shape[0]):  # a layer's rows at a time: small scratch
                    pool[layer][:, dst] = pool[layer][:, src]
    for b, found in new_segments.items():
        allocator.release(*segment[b])
        segment[b] = found
    sizes = [segment[b][1] for b in act]
    views = []
    for c, length in zip(caches, lengths):
        L, KV, P, hd = c.k_pool.shape
        view = SegmentKVCache(L, len(act), P, max(max_len, *sizes), KV, hd, c.k_pool.dtype,
                              c.k_pool.device, pools=(c.k_pool, c.v_pool),
                              lengths_device=c.lengths.device)
        view.assign(range(len(act)), [segment[b][0] for b in act], sizes)
        view.lengths.copy_(length)
        view._mapped = c._mapped  # a host pool's device alias, where it was made
        views.append(view)
    return act, tuple(views)


def _context(request) -> list:
    """What a refill prefills: the prompt and the tokens a request has so far (a plain row's
    request moving onto a tree row has some)."""
    return request.prompt + request.tokens


class PlainRows:
    """The rows of a tree run that the target alone serves (PLAIN_ROWS): their cache, the
    request each serves, and the prompts the next pass prefills into them. Every row rides
    each pass's decode part (a row with nothing to decode at length 1 in its idle segment,
    a row being prefilled parked past its prompt); only serving rows' tokens are kept."""

    IDLE = 3  # slots of a row's idle segment

    def __init__(self, llm, rows: int, requests, queue: Sequence[int], params: SamplingParams,
                 where: torch.device):
        cfg, device = llm.config, llm.device
        self.requests, self.params, self.device, self.rows = requests, params, device, rows
        new = params.max_new_tokens
        lengths = [len(requests[i].prompt) for i in queue] or [1]
        longest = max(len(r.prompt) for r in requests)
        host = where.type != device.type
        # In host memory a pass streams the cache: rows in segments stream what they hold
        # (as a plain batch's cache: engine.SEGMENT_HOST_CACHE, "on" anywhere).
        from ..engine import host_cache_segmented

        self.segmented = host_cache_segmented(lengths, host)
        if self.segmented:
            pool = segment_pool_slots(rows, lengths, new, 0, SEGMENT_SLACK)
            self.cache = SegmentKVCache(cfg.n_layers, rows, pool, longest + new + 3,
                                        cfg.n_kv_heads, cfg.head_dim, llm.dtype, where,
                                        pin_memory=host, lengths_device=device)
            self.free = SegmentAllocator(rows * self.IDLE, pool)
            self.cache.assign(range(rows), [self.IDLE * b for b in range(rows)],
                              [self.IDLE] * rows)
        else:
            self.cache = KVCache(cfg.n_layers, rows, longest + new + 2, cfg.n_kv_heads,
                                 cfg.head_dim, llm.dtype, where, pin_memory=host,
                                 lengths_device=device)
        self.cache.lengths.fill_(1)
        self.last = torch.zeros(rows, dtype=torch.long, device=device)  # newest, not cached
        self.serving: list = [None] * rows
        self.segment: list = [None] * rows
        self.refill: list = []
        self.decoding: list = []
        self.decode = self.prefill = None

    def busy(self) -> bool:
        return any(r is not None for r in self.serving)

    def _take(self, b: int, waiting) -> bool:
        taken = _take_request(waiting, self.requests, self.free if self.segmented else None,
                              self.params.max_new_tokens, 0)
        if taken is None:
            return False
        self.serving[b], self.segment[b] = taken
        return True

    def place(self, waiting, stats) -> None:
        """Free rows take waiting prompts (prefilled in the next pass) or idle."""
        free = [b for b in range(self.rows) if self.serving[b] is None]
        for b in free:
            if self.segment[b] is not None:
                self.free.release(*self.segment[b])
                self.segment[b] = None
            if waiting and self._take(b, waiting):
                self.refill.append(b)
            elif waiting:
                stats.segment_waits += 1
        if not free:
            return
        if self.segmented:
            spans = [self.segment[b] if b in self.refill else (self.IDLE * b, self.IDLE)
                     for b in free]
            self.cache.assign(free, [a for a, _ in spans], [n for _, n in spans])
            # parked past the prompt and its new tokens: the decode part writes there
            length = [n - 2 if b in self.refill else 1 for b, (_, n) in zip(free, spans)]
        else:
            length = [self.cache.max_len - 2 if b in self.refill else 1 for b in free]
        self.cache.lengths[torch.tensor(free, device=self.device)] = torch.tensor(
            length, device=self.device)

    def candidate(self) -> Optional[int]:
        """The decoding row whose request has the most tokens still to come (None: none)."""
        rows = [b for b in range(self.rows) if self.serving[b] is not None
                and b not in self.refill]
        return min(rows, key=lambda b: len(self.requests[self.serving[b]].tokens), default=None)

    def parts(self, chunk: int) -> list:
        """This pass's parts: every row's next token, the new prompts' prefill."""
        self.decoding = [b for b in range(self.rows) if self.serving[b] is not None
                         and b not in self.refill]
        c, parts = self.cache, []
        # row indices on the device now, before the pass is queued: made after it, they
        # would wait for it (a copy from pageable memory)
        self.decoding_at = torch.tensor(self.decoding, device=self.device)
        self.decode = (PassPart(self.last[:, None], c, positions=c.lengths[:, None],
                                kv_len=c.max_len) if self.decoding else None)
        if self.decode is not None:
            parts.append(self.decode)
        self.prefill = None
        if self.refill:
            ids, self.new_lens, host = pad_prompts(
                [self.requests[self.serving[b]].prompt for b in self.refill], self.device)
            self.at = torch.tensor(self.refill, device=self.device)
            self.prefill = PrefillBatch(ids, c, row_chunk(chunk, self.rows, len(self.refill)),
                                        rows=self.at, device=self.device, lengths_host=host)
            parts += self.prefill.parts
        return parts

    def sample(self, head, generator) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """After the pass: (every row's next token, the new prompts' first tokens), on the
        device; the decoding rows' lengths move past their token."""
        nxt = first = None
        if self.decode is not None:
            nxt = select(head(self.decode.h)[:, -1], self.params, generator)
            at = self.decoding_at
            self.cache.lengths[at] += 1
            self.last[at] = nxt[at]
        if self.prefill is not None:
            first = select(head(self.prefill.last_hidden(self.new_lens))[:, 0], self.params,
                           generator)
            self.cache.lengths[self.at] = self.new_lens
            self.last[self.at] = first
        return nxt, first

    def emit(self, nxt: Optional[list], first: Optional[list], eos, stats) -> None:
        """The pass's tokens (as lists, after the round's sync) to the requests."""
        new = self.params.max_new_tokens
        for b in self.decoding:
            stats.plain_tokens += 1
            if self.requests[self.serving[b]].add(nxt[b], eos, new):
                self.serving[b] = None
        for b, tok in zip(self.refill, first or []):
            stats.plain_tokens += 1
            if self.requests[self.serving[b]].add(tok, eos, new):
                self.serving[b] = None
        self.refill.clear()


def _join(done, device: torch.device) -> None:
    """The device's current stream waits for a _draft_prefill."""
    if done is not None:
        torch.cuda.current_stream(device).wait_event(done)


@torch.inference_mode()
def generate_tree(llm, requests, params: SamplingParams, generator, stats, rows_per_pass: int,
                  budget, kv_on_gpu: bool = True,
                  prefill_chunk: Optional[int] = None) -> TreeBudgetTuner:
    """Tree-mode generation for `requests` (spec.pipeline.Request) over `rows_per_pass` rows.
    `budget`: nodes per row per tree, or a TreeBudgetTuner that picks one before each round
    from the rounds it has seen (these and earlier ones). Returns the tuner.
    `prefill_chunk`: prompt tokens a row per prefill part, the plan's (default
    llm.prefill_chunk); a part holds at most that × rows_per_pass tokens however few rows
    it fills (the plan's memory counts that many).

    With more prompts than rows, a row that finishes takes the next waiting prompt: its
    prefill joins the next round's verification pass (more parts of the same pass: the
    weights still stream once) and gives its first token; its draft prefill follows that
    pass. Until then the row rides along "parked": its cache length is set past every
    prompt, so the tree growth and the verification pass write their slots out of the way
    of the prompt being prefilled into the same row. Idle rows with nothing to wait for ride
    along at length 1."""
    tuner = budget if isinstance(budget, TreeBudgetTuner) else TreeBudgetTuner([budget])
    target, draft = llm.model, llm.draft_model
    tcfg, dcfg, device = llm.config, llm.draft_config, llm.device
    eos = set(llm.eos_token_ids) if not params.ignore_eos else set()
    capacity = tuner.max_budget
    acceptance = llm.tree_acceptance_model()
    stats.tree_budgets = stats.tree_budgets or []
    rounds = []  # (budget, tokens per row per pass, pass seconds, growth seconds)
    per_request: dict = {}  # request → [k]: its row passes that accepted k nodes
    B = min(rows_per_pass, len(requests))
    chunk = prefill_chunk or llm.prefill_chunk
    longest = max(len(r.prompt) for r in requests)
    max_len = longest + params.max_new_tokens + capacity + 2
    park = max_len - capacity - 1  # past every prompt; the tree's slots and commit fit after it
    # The target's cache where the plan puts it: in pinned host memory it streams to the GPU
    # for each layer's attention (decoder.streamed_attention).
    where = device if kv_on_gpu else torch.device("cpu")
    pool, segmented = draft_cache_slots(B, [len(r.prompt) for r in requests],
                                        params.max_new_tokens, capacity)
    check_segment_mode("spec.tree.SEGMENT_TARGET_CACHE", SEGMENT_TARGET_CACHE)
    # The target's cache in the draft's segments (the same slots): in host memory, a pass
    # then streams what the rows hold instead of rows × the longest.
    tail = TAIL_BUDGET > 0 and B > 1  # the tail may go on in a smaller batch (TAIL_BUDGET)
    target_segmented = segmented and (SEGMENT_TARGET_CACHE == "on" or (
        SEGMENT_TARGET_CACHE == "auto" and (where.type != device.type or tail)))
    if target_segmented:
        tcache = SegmentKVCache(tcfg.n_layers, B, pool, max_len + 1, tcfg.n_kv_heads,
                                tcfg.head_dim, llm.dtype, where,
                                pin_memory=where.type != device.type, lengths_device=device)
    else:
        tcache = KVCache(tcfg.n_layers, B, max_len, tcfg.n_kv_heads, tcfg.head_dim, llm.dtype,
                         where, pin_memory=where.type != device.type, lengths_device=device)
    idle = capacity + 3  # a row with nothing to serve: a tree at length 1 (SegmentKVCache)
    if segmented:  # a segment per row in a pool sized by the queue's prompts
        dcache = SegmentKVCache(dcfg.n_layers, B, pool, max_len + 1, dcfg.n_kv_heads,
                                dcfg.head_dim, draft_cache_dtype(llm.dtype), device)
        free_slots = SegmentAllocator(B * idle, pool)
    else:
        dcache = KVCache(dcfg.n_layers, B, max_len, dcfg.n_kv_heads, dcfg.head_dim,
                         draft_cache_dtype(llm.dtype), device)
    segmented_caches = [c for c in (tcache, dcache) if c.row_start is not None]
    draft_ids = lambda ids: torch.where(ids < dcfg.vocab_size, ids, torch.zeros_like(ids))  # noqa: E731
    waiting = deque(range(len(requests)))
    serving: list = [None] * B  # the request of each row (None: idle)
    segment: list = [None] * B  # (first slot, slots) of each serving row's draft segment
    home = list(range(B))  # each row's row in the first batch: its idle segment's place
    # The tail (TAIL_BUDGET): the first batch's rows, its last budget, the tail's budget.
    batch_rows, full_budget, tail_budget = B, None, None

    def take(b: int, queue=waiting) -> bool:
        """Row b takes the next request of `queue` (the waiting prompts); with segments the
        first of SEGMENT_LOOKAHEAD whose segment fits (False: none does)."""
        taken = _take_request(queue, requests, free_slots if segmented else None,
                              params.max_new_tokens, capacity)
        if taken is None:
            return False
        serving[b], found = taken
        if found is not None:
            segment[b] = found
        return True

    for b in range(B):  # the pool holds the first B prompts at once (segment_pool_slots)
        if not take(b):
            raise RuntimeError("the draft's segment pool cannot hold the first prompts")
    P = max(0, min(PLAIN_ROWS, len(requests) - B))
    plain = PlainRows(llm, P, requests, list(waiting), params, where) if P else None
    stats.plain_rows = P
    for c in segmented_caches:
        c.assign(range(B), [segment[b][0] for b in range(B)], [segment[b][1] for b in range(B)])
    ids, lens, host = pad_prompts([requests[i].prompt for i in serving], device)
    last = select(target.prefill(ids, lens, tcache, chunk, lengths_host=host),
                  params, generator)
    draft.prefill(draft_ids(ids), lens, dcache, chunk, lengths_host=host)
    stats.prefill_passes += 1
    for b, tok in enumerate(last.tolist()):  # once, after the first prefill
        if requests[serving[b]].add(tok, eos, params.max_new_tokens):
            serving[b] = None
    tree, prev = Tree.empty(last, capacity), None
    rows = torch.arange(B, device=device)
    refill: list = []  # rows whose new prompt the next pass prefills
    # The draft's prefill of new prompts: on its own stream, under the target's pass?
    draft_stream = (torch.cuda.Stream(device) if device.type == "cuda" and DRAFT_PREFILL_STREAM
                    else None)

    def place_free_rows() -> None:
        """Give free rows the waiting prompts (prefilled in the next pass) and park them;
        rows with nothing left to serve ride along at length 1 (in their idle segment of
        the draft's cache). Every GPU use of a freed segment has ended: the round synced."""
        free = [b for b in range(B) if serving[b] is None]
        for b in free:
            if segment[b] is not None:
                free_slots.release(*segment[b])
                segment[b] = None
            p = plain.candidate() if plain is not None and not waiting else None
            if waiting and take(b):
                refill.append(b)
            elif waiting:
                stats.segment_waits += 1
            elif p is not None and take(b, [plain.serving[p]]):
                # no prompt waits: the plain row with the most tokens to come moves here
                plain.serving[p] = None
                stats.promotions += 1
                refill.append(b)
            elif p is not None:
                stats.segment_waits += 1
        if plain is not None:
            plain.place(waiting, stats)
        if free:
            at = torch.tensor(free, device=device)
            length = torch.tensor([park if b in refill else 1 for b in free], device=device)
            if segmented:  # parked past the prompt in the row's own segment
                spans = [segment[b] if b in refill else (home[b] * idle, idle) for b in free]
                for c in segmented_caches:
                    c.assign(free, [a for a, _ in spans], [n for _, n in spans])
                parked = torch.tensor([n - capacity - 2 if b in refill else 1
                                       for b, (_, n) in zip(free, spans)], device=device)
            for c in (tcache, dcache):
                c.lengths[at] = parked if c.row_start is not None else length

    place_free_rows()
    while any(r is not None for r in serving) or (plain is not None and plain.busy()):
        serving_rows = sum(r is not None for r in serving) if tail else 0
        if (tail and plain is None and not waiting and not refill and len(segmented_caches) == 2
                and serving_rows <= TAIL_ROWS * B and full_budget is not None
                and tail_budget_for(full_budget, batch_rows, serving_rows)
                > (tail_budget or full_budget)):
            # The tail: the serving rows go on as a batch of their own with bigger trees.
            budget_now = tail_budget_for(full_budget, batch_rows, serving_rows)
            moved = _tail_batch(serving, segment, free_slots, requests, params.max_new_tokens,
                                (tcache, dcache), budget_now, max_len)
            if moved is not None:
                act, (tcache, dcache) = moved
                tail_budget = budget_now
                segmented_caches = [tcache, dcache]
                at = torch.tensor(act, device=device)
                serving, segment = [serving[b] for b in act], [segment[b] for b in act]
                home = [home[b] for b in act]
                last, prev = last[at], (prev[at] if prev is not None else None)
                B = len(act)
                rows = torch.arange(B, device=device)
                tree = Tree.empty(last, tail_budget)
                stats.tail_batches = (stats.tail_batches or []) + [(B, tail_budget)]
            else:
                tail = False  # no room to move the rows' segments: the batch goes on as is
        verified = [b for b in range(B) if serving[b] is not None and b not in refill]
        full = all(r is not None for r in serving)  # every row busy: steady state
        plain_tokens0, returned = stats.plain_tokens, 0
        n = tail_budget or tuner.next_budget()
        full_budget = full_budget if tail_budget else n
        _sync(device)  # one sync each side of the growth: it is timed per round
        t0, captured = time.perf_counter(), GrowthGraphs.capture_seconds
        grow(draft, dcache, last, n, vocab=tcfg.vocab_size, tree=tree, prev=prev,
             acceptance=acceptance)
        _sync(device)
        t1 = time.perf_counter()
        # The budget's curve is steady-state growth: a first round's graph capture left out.
        grow_seconds = t1 - t0 - (GrowthGraphs.capture_seconds - captured)
        stats.graph_capture_seconds += GrowthGraphs.capture_seconds - captured
        parts = [tree_part(tree, torch.arange(tree.size, device=device).expand(B, -1), tcache)]
        if refill:
            new_ids, new_lens, new_host = pad_prompts([_context(requests[serving[b]])
                                                       for b in refill], device)
            at = torch.tensor(refill, device=device)
            new_draft_ids = draft_ids(new_ids)  # before `grown`: the draft's stream reads it
            refill_chunk = row_chunk(chunk, B, len(refill))
            prefill = PrefillBatch(new_ids, tcache, refill_chunk, rows=at, device=device,
                                   lengths_host=new_host)
            parts += prefill.parts
        if plain is not None:  # the plain rows' tokens and new prompts ride the same pass
            parts += plain.parts(chunk)
        grown = _record(device)
        target.run_parts(parts)
        stats.decode_passes += 1
        if refill:
            # Issued once the host has queued the whole pass (nothing in it waits on the
            # host); with a draft stream, after the growth on that stream, so the draft's
            # prefill of the new prompts runs while the pass waits on its weight copies. It
            # writes positions [0, prompt) of rows parked past every prompt, apart from all
            # the pass, the growth and the commit touch; their lengths are set after the
            # commit.
            drafted = _draft_prefill(draft, new_draft_ids, new_lens, new_host, at, dcache,
                                     refill_chunk, draft_stream, grown)
        picks = target_picks(target.head, parts[0].h, params, generator)
        plain_next, plain_first = (plain.sample(target.head, generator) if plain is not None
                                   else (None, None))
        path, accepted, nxt = accept(tree, None, params, generator, acceptance, picks=picks)
        commit(tcache, path, accepted)
        commit(dcache, path, accepted)
        prev = tree.tokens[rows, path[:, -1]]
        emitted = torch.cat([tree.tokens.gather(1, path[:, 1:]), nxt[:, None]], dim=1)
        emitted = emitted.scatter(1, accepted[:, None], nxt[:, None])
        last = nxt
        nodes = (tree.logp[:, :tree.size] > NEG_INF).sum(1) - 1  # proposed, past the root
        if refill:  # the new prompts' first tokens; their rows' lengths past their prompts
            first_tok = select(target.head(prefill.last_hidden(new_lens))[:, 0], params, generator)
            _join(drafted, device)
            tcache.lengths[at] = new_lens
            dcache.lengths[at] = new_lens
            last[at] = first_tok
            prev[at] = new_ids.gather(1, (new_lens - 1)[:, None])[:, 0]
        # One sync per round (the first tokens are ready once the others are).
        emitted, accepted_list, nodes = emitted.tolist(), accepted.tolist(), nodes.tolist()
        first = first_tok.tolist() if refill else []  # ready: the sync above waited for it
        if plain is not None:  # ready too: the sync above waited for the whole pass
            nxt_list = plain_next.tolist() if plain_next is not None else None  # no wait
            first_list = plain_first.tolist() if plain_first is not None else None  # no wait
            plain.emit(nxt_list, first_list, eos, stats)
        t2 = time.perf_counter()
        if verified:
            rounds.append((n, sum(accepted_list[b] + 1 for b in verified) / len(verified),
                           t2 - t1, grow_seconds))
            if tail_budget is None:  # the tuner learns the full batch's rounds
                tuner.record(*rounds[-1])
        stats.tree_budgets.append(n)
        stats.rounds += 1
        stats.draft_seconds += t1 - t0
        stats.target_seconds += t2 - t1
        for b in verified:
            stats.count_verified(nodes[b], accepted_list[b])
            seen = per_request.setdefault(serving[b], [])
            seen.extend([0] * (accepted_list[b] + 1 - len(seen)))
            seen[accepted_list[b]] += 1
            for tok in emitted[b][:accepted_list[b] + 1]:
                returned += 1
                if requests[serving[b]].add(tok, eos, params.max_new_tokens):
                    serving[b] = None
                    break
        for b, tok in zip(refill, first):
            returned += 1
            if requests[serving[b]].add(tok, eos, params.max_new_tokens):
                serving[b] = None
        if full:
            stats.steady_tokens += returned + stats.plain_tokens - plain_tokens0
            stats.steady_seconds += t2 - t0
        refill.clear()
        place_free_rows()
    stats.tree_curve = tree_curve(rounds)
    stats.request_histograms = [per_request[i] for i in sorted(per_request)]
    return tuner
