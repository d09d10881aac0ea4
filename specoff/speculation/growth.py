"""Tree growth (SpecExec §3.2): the draft expands the most promising open nodes a pass at a
time, best-first by cumulative log-probability (or by acceptance learned from the target's
verdicts, AcceptanceModel), until the budget's nodes are the best it can find.

Each growth pass has fixed shapes and no host sync, so CUDA graphs capture it
(GrowthGraphs); the host reads a pass's stop flag while the next pass runs.
"""
from __future__ import annotations

import time
import weakref
from typing import Optional, Tuple

import torch

from ..kvcache import KVCache
from .tree import NEG_INF, Tree, root_part, tree_part


def growth_shape(budget: int, rows: int = 1, growth_tokens: int = 512) -> Tuple[int, int]:
    """Default (width, children) for a budget: a draft pass over up to ~128 nodes costs about
    what a pass over one does on a GPU (the weights' read), so wide passes grow big trees in
    few passes: 16 nodes a pass up to budget 64, then budget / 4 up to 64, budget / 8 up to
    256. Over many rows a pass's nodes are capped at `growth_tokens` in all: past that the
    draft's pass costs its FLOPs (144 rows × 16 nodes ~ 33 TFLOP), while growth by acceptance
    ranks is deep and narrow, opening few nodes a pass per row."""
    width = min(budget, max(16, min(64, budget // 4), min(256, budget // 8)))
    width = max(1, min(width, growth_tokens // max(rows, 1)))
    children = 4 if budget <= 32 else 8
    return width, children


class AcceptanceModel:
    """How likely the target is to pick a proposed child, learned from verification.

    The draft's own probabilities can be far from the chance that the target agrees: where
    they understate it, ranking nodes by draft log-probability grows wide, shallow trees
    (docs/decisions.md: on the random-weight Mixtral-8x7B pair learned ranks nearly double
    the tokens a pass at batch 1). Like
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
         acceptance: Optional[AcceptanceModel] = None, growth_tokens: int = 512) -> Tree:
    """Grow a best-first tree of at most `budget` nodes from `root` (B,) (module docstring).

    width, children: nodes expanded per draft pass and children proposed per node (default
    growth_shape(budget, rows, growth_tokens)); max_depth caps the depth; max_passes bounds the draft passes.
    `tree` is reused when given (capacity >= budget); its size is then `budget`. `prev` (B,):
    the token at position lengths - 1, recomputed in the first pass (see root_part). Every
    node that can end an accepted path has its draft K/V, except unexpanded leaves:
    root_part repairs those. `graphs`: replay CUDA graphs of the passes (default: where the
    draft has `use_graphs`, no streamed layers and the cache is on the GPU). `acceptance`:
    rank nodes by its learned estimates (AcceptanceModel) rather than draft log-probabilities.
    """
    default_width, default_children = growth_shape(budget, root.shape[0], growth_tokens)
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
