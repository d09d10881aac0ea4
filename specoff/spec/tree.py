"""SpecExec tree mode (arXiv 2406.02532): a best-first draft tree verified in one pass.

Growth (§3.2): per row, the draft grows a tree of likely continuations of the row's pending
token (the root) under a node budget N. Each draft pass expands, at once, the `width` most
probable nodes not yet expanded (attention over the row's cached prefix plus the node's
ancestors, positions = prefix length + depth) and proposes each one's top `children`
tokens. The tree keeps the N best of its nodes and the proposals by cumulative
log-probability: while there is room the proposals are appended; once full, a proposal
better than the worst node takes the worst leaf's slot (its draft K/V slot and ancestor
row are reused). A child is never more probable than its parent, so whenever the most
probable unexpanded node is no better than the worst kept node, no further growth can
change the top-N set: growth stops there, or when every open node is at the depth cap.

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

import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..kvcache import KVCache
from ..models.decoder import PassPart, TreeMask
from ..planner import TreeBudgetTuner, tree_curve
from ..sampling import SamplingParams, logits_to_probs, sample_from, select

NEG_INF = float("-inf")


def growth_shape(budget: int) -> Tuple[int, int]:
    """Default (width, children) for a budget: a draft pass over 16 … 64 nodes costs about
    what a pass over one does on a GPU, so wide passes grow big trees in few passes."""
    width = min(budget, max(16, min(64, budget // 4)))
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
                   has_kv=torch.empty(B, capacity, dtype=torch.bool, device=device), size=1)
        tree.reset(root)
        return tree

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    def reset(self, root: torch.Tensor) -> None:
        """Only the root (B,), not yet expanded and without draft K/V."""
        self.tokens.zero_()
        self.parent.fill_(-1)
        self.depth.zero_()
        self.logp.fill_(NEG_INF)
        self.ancestors.zero_()
        self.expanded.fill_(True)
        self.has_kv.fill_(True)
        self.tokens[:, 0] = root
        self.logp[:, 0] = 0.0
        self.ancestors[:, 0, 0] = True
        self.expanded[:, 0] = self.has_kv[:, 0] = False
        self.size = 1

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
        tree.expanded.zero_()
        tree.has_kv.zero_()
        return tree

    def merge(self, cand_logp: torch.Tensor, cand_parent: torch.Tensor, cand_tokens: torch.Tensor,
              new_size: int) -> None:
        """Keep the `new_size` best of the tree's nodes and the candidate children (B, M) by
        cumulative log-probability, ties to the shallower node: a parent always outranks its
        children, so what is kept is a tree and only whole subtrees (in practice leaves) are
        dropped. Kept candidates take the dropped nodes' slots, then fresh ones; a candidate
        at -inf (nothing to propose) becomes an empty slot."""
        B, M = cand_logp.shape
        S = self.size
        device = cand_logp.device
        rows = torch.arange(B, device=device)[:, None]
        dead = cand_logp == NEG_INF
        cand_depth = self.depth.gather(1, cand_parent) + 1
        logp = torch.cat([self.logp[:, :S], cand_logp], dim=1)  # (B, S + M)
        depth = torch.cat([self.depth[:, :S], cand_depth], dim=1)
        by_depth = depth.argsort(dim=1, stable=True)
        order = by_depth.gather(1, logp.gather(1, by_depth).argsort(dim=1, descending=True,
                                                                    stable=True))
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(S + M, device=device).expand(B, -1).contiguous())
        kept = rank < new_size
        keep_old, keep_new = kept[:, :S], kept[:, S:]
        free = torch.cat([~keep_old, torch.ones(B, new_size - S, dtype=torch.bool, device=device)], 1)
        K = min(M, new_size)
        slot = (~free).long().argsort(dim=1, stable=True)[:, :K]  # free slots first
        pick = (~keep_new).long().argsort(dim=1, stable=True)[:, :K]  # kept candidates first
        # Column k places a candidate iff k < the row's count; the other columns write a kept
        # node's own values back (their slots differ from the placed ones).
        fill = torch.arange(K, device=device) < keep_new.sum(1, keepdim=True)  # (B, K)
        gone = dead.gather(1, pick)
        parent = cand_parent.gather(1, pick)
        values = [(self.tokens, torch.where(gone, 0, cand_tokens.gather(1, pick))),
                  (self.parent, torch.where(gone, -1, parent)),
                  (self.depth, torch.where(gone, 0, cand_depth.gather(1, pick))),
                  (self.logp, cand_logp.gather(1, pick)),
                  (self.expanded, gone), (self.has_kv, gone)]
        own = self.ancestors[rows, parent] & ~gone[..., None]  # (B, K, C): the parent's set
        own.scatter_(2, slot[..., None], True)  # and the node itself
        for buf, value in values:
            buf.scatter_(1, slot, torch.where(fill, value, buf.gather(1, slot)))
        self.ancestors[rows, slot] = torch.where(fill[..., None], own, self.ancestors[rows, slot])
        self.size = new_size


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
def grow(draft, cache: KVCache, root: torch.Tensor, budget: int, *, width: Optional[int] = None,
         children: Optional[int] = None, max_depth: int = 32, max_passes: Optional[int] = None,
         vocab: Optional[int] = None, tree: Optional[Tree] = None,
         prev: Optional[torch.Tensor] = None) -> Tree:
    """Grow a best-first tree of at most `budget` nodes from `root` (B,) (module docstring).

    width, children: nodes expanded per draft pass and children proposed per node (default
    growth_shape(budget)); max_depth caps the depth; max_passes bounds the draft passes.
    `tree` is reused when given (capacity >= budget). `prev` (B,): the token at position
    lengths - 1, recomputed in the first pass (see root_part). Every node that can end an
    accepted path has its draft K/V, except unexpanded leaves: root_part repairs those.
    """
    default_width, default_children = growth_shape(budget)
    width, children = width or default_width, children or default_children
    max_passes = max_passes or max_depth + 2 * -(-budget // width)
    if prev is not None:
        prev = prev.clone()  # it may be a view of the tree reset below
    if tree is None:
        tree = Tree.empty(root, budget)
    else:
        assert tree.capacity >= budget, "the tree was allocated for a smaller budget"
        tree.reset(root)
    B, device = root.shape[0], root.device
    rows = torch.arange(B, device=device)[:, None]
    dvocab = draft.config.vocab_size
    for step in range(max_passes):
        S = tree.size
        logp = tree.logp[:, :S]
        # Once a row is full, a child (never above its parent) enters only by beating the
        # row's worst node; a row with an empty slot has min -inf and takes anything.
        worst = logp.min(dim=1).values if S == budget else torch.full((B,), NEG_INF, device=device)
        open_ = (~tree.expanded[:, :S] & (tree.depth[:, :S] < max_depth)
                 & (logp > worst[:, None]))
        best, nodes = logp.masked_fill(~open_, NEG_INF).topk(min(width, S), dim=1)
        count = int((best > NEG_INF).sum(1).max())  # host sync once per draft pass
        if count == 0 and step > 0:
            break
        best, nodes = best[:, :max(count, 1)], nodes[:, :max(count, 1)]
        if step == 0 and prev is not None:  # the root alone, with last round's leaf
            part = root_part(tree, prev, cache, dvocab)
            draft.run_parts([part])
            h = part.h[:, 1:]
        else:
            part = tree_part(tree, nodes, cache, dvocab)
            draft.run_parts([part])
            h = part.h
        valid = best > NEG_INF  # the other picks only pad the pass (their K/V is rewritten)
        tree.has_kv[rows, nodes] = True
        if count == 0:
            break  # a budget of 1: the root needed its K/V, nothing more
        tree.expanded[rows, nodes] |= valid
        logprobs = torch.log_softmax(draft.head(h).float(), dim=-1)  # (B, w, V)
        if vocab is not None:
            logprobs = logprobs[..., :vocab]
        top_lp, top_tok = logprobs.topk(min(children, logprobs.shape[-1]), dim=-1)  # (B, w, c)
        cand_logp = (best[..., None] + top_lp).reshape(B, -1)  # -inf under an invalid pick
        cand_parent = nodes[..., None].expand_as(top_tok).reshape(B, -1)
        tree.merge(cand_logp, cand_parent, top_tok.reshape(B, -1),
                   min(budget, S + cand_logp.shape[1]))
    return tree


def accept(tree: Tree, target_logits: torch.Tensor, params: SamplingParams,
           generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk the tree with the target's picks. target_logits (B, N, V) at every node.

    Returns (path (B, D+1) node indices, root first, padded with the last node; accepted
    (B,) nodes past the root; next token (B,))."""
    B, N = tree.tokens.shape[0], tree.size
    device = tree.tokens.device
    max_depth = int(tree.depth[:, :N].max()) + 1
    if params.greedy:
        picks = target_logits.argmax(dim=-1)  # (B, N): what the target says after each node
    else:
        probs = logits_to_probs(target_logits, params.temperature, params.top_k, params.top_p)
        picks = sample_from(probs, generator)
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
    positions lengths + depth, and keep them (root + accepted)."""
    L_, B, KV, S, hd = cache.k.shape
    P = path.shape[1]
    src = (cache.lengths[:, None] + path).clamp(max=S - 1)  # (B, P)
    dst = (cache.lengths[:, None] + torch.arange(P, device=path.device)).clamp(max=S - 1)
    index = lambda i: i[None, :, None, :, None].expand(L_, B, KV, P, hd)  # noqa: E731
    for buf in (cache.k, cache.v):
        moved = buf.gather(3, index(src))
        buf.scatter_(3, index(dst), moved)
    cache.advance(accepted + 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate_tree(llm, requests, params: SamplingParams, generator, stats, rows_per_pass: int,
                  budget) -> TreeBudgetTuner:
    """Tree-mode generation for `requests` (spec.pipeline.Request), `rows_per_pass` at a time.
    `budget`: nodes per row per tree, or a TreeBudgetTuner that picks one before each round
    from the rounds it has seen (these and earlier ones). Returns the tuner."""
    tuner = budget if isinstance(budget, TreeBudgetTuner) else TreeBudgetTuner([budget])
    target, draft = llm.model, llm.draft_model
    tcfg, dcfg, device = llm.config, llm.draft_config, llm.device
    eos = set(llm.eos_token_ids) if not params.ignore_eos else set()
    capacity = tuner.max_budget
    stats.tree_budgets = stats.tree_budgets or []
    rounds = []  # (budget, tokens per row per pass, pass seconds, growth seconds)
    for start in range(0, len(requests), rows_per_pass):
        batch = requests[start:start + rows_per_pass]
        B = len(batch)
        lens = torch.tensor([len(r.prompt) for r in batch], device=device)
        longest = max(len(r.prompt) for r in batch)
        max_len = longest + params.max_new_tokens + capacity + 2
        tcache = KVCache(tcfg.n_layers, B, max_len, tcfg.n_kv_heads, tcfg.head_dim, llm.dtype, device)
        dcache = KVCache(dcfg.n_layers, B, max_len, dcfg.n_kv_heads, dcfg.head_dim, llm.dtype, device)
        ids = torch.zeros(B, longest, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, :len(r.prompt)] = torch.tensor(r.prompt)
        ids = ids.to(device)
        last = select(target.prefill(ids, lens, tcache, llm.prefill_chunk), params, generator)
        draft_ids = torch.where(ids < dcfg.vocab_size, ids, torch.zeros_like(ids))
        draft.prefill(draft_ids, lens, dcache, llm.prefill_chunk)
        stats.prefill_passes += 1
        for b, tok in enumerate(last.tolist()):  # once per batch, after prefill
            batch[b].add(tok, eos, params.max_new_tokens)
        active = [b for b in range(B) if batch[b].finish_reason is None]
        tree, prev = Tree.empty(last, capacity), None
        rows = torch.arange(B, device=device)
        while active:
            n = tuner.next_budget()
            _sync(device)  # one sync each side of the growth: it is timed per round
            t0 = time.perf_counter()
            grow(draft, dcache, last, n, vocab=tcfg.vocab_size, tree=tree, prev=prev)
            _sync(device)
            t1 = time.perf_counter()
            part = tree_part(tree, torch.arange(tree.size, device=device).expand(B, -1), tcache)
            target.run_parts([part])
            stats.decode_passes += 1
            path, accepted, nxt = accept(tree, target.head(part.h), params, generator)
            commit(tcache, path, accepted)
            commit(dcache, path, accepted)
            prev = tree.tokens[rows, path[:, -1]]
            emitted = torch.cat([tree.tokens.gather(1, path[:, 1:]), nxt[:, None]], dim=1)
            emitted = emitted.scatter(1, accepted[:, None], nxt[:, None])
            last = nxt
            nodes = (tree.logp[:, :tree.size] > NEG_INF).sum(1) - 1  # proposed, past the root
            # One sync per round.
            emitted, accepted_list, nodes = emitted.tolist(), accepted.tolist(), nodes.tolist()
            t2 = time.perf_counter()
            rounds.append((n, sum(accepted_list[b] + 1 for b in active) / len(active), t2 - t1,
                           t1 - t0))
            tuner.record(*rounds[-1])
            stats.tree_budgets.append(n)
            stats.rounds += 1
            stats.draft_seconds += t1 - t0
            stats.target_seconds += t2 - t1
            for b in active:
                stats.count_verified(nodes[b], accepted_list[b])
                for tok in emitted[b][:accepted_list[b] + 1]:
                    if batch[b].add(tok, eos, params.max_new_tokens):
                        break
            active = [b for b in active if batch[b].finish_reason is None]
            done = [b for b in range(B) if batch[b].finish_reason is not None]
            if done:  # finished rows ride along: keep their caches from growing
                gone = torch.tensor(done, device=device)
                tcache.lengths[gone] = 1
                dcache.lengths[gone] = 1
    stats.tree_curve = tree_curve(rounds)
    return tuner
