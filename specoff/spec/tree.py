"""SpecExec tree mode (arXiv 2406.02532): a best-first draft tree verified in one pass.

The draft grows, per row, a tree of likely continuations of the row's pending token (the
root) under a node budget: each draft call expands the most probable unexpanded nodes at
once (attention over the row's cached prefix plus the node's ancestors, positions = prefix
length + depth) and adds the best children by cumulative log-probability. The target then
scores every node in one pass with the same ancestor mask. Acceptance treats the tree as a
cache of target distributions: the target picks a token at the root (argmax, or a sample
from its own distribution); the child carrying that token is accepted and the walk goes on
from it; at the first node with no such child the target's pick is the bonus token. Exact
for greedy and for sampling, whatever the tree's shape.

Node i of row b keeps its K/V in cache slot lengths[b] + i during a round; commit gathers
the accepted path into positions lengths[b] + depth, in the target's cache and the
draft's. Arrays are preallocated for the budget: token, parent, depth, cumulative
log-probability, and the ancestor mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..kvcache import KVCache
from ..models.decoder import PassPart
from ..sampling import SamplingParams, logits_to_probs, sample_from


@dataclass
class Tree:
    tokens: torch.Tensor  # (B, N) long
    parent: torch.Tensor  # (B, N) long, -1 at the root
    depth: torch.Tensor  # (B, N) long
    logp: torch.Tensor  # (B, N) float, cumulative draft log-probability
    ancestors: torch.Tensor  # (B, N, N) bool: ancestors[b, i, j] iff j is i or an ancestor of i
    expanded: torch.Tensor  # (B, N) bool: the draft has produced this node's children
    size: int  # nodes in use (the same in every row)

    @classmethod
    def empty(cls, root: torch.Tensor, budget: int) -> "Tree":
        B, device = root.shape[0], root.device
        tree = cls(tokens=torch.zeros(B, budget, dtype=torch.long, device=device),
                   parent=torch.full((B, budget), -1, dtype=torch.long, device=device),
                   depth=torch.zeros(B, budget, dtype=torch.long, device=device),
                   logp=torch.full((B, budget), float("-inf"), device=device),
                   ancestors=torch.zeros(B, budget, budget, dtype=torch.bool, device=device),
                   expanded=torch.zeros(B, budget, dtype=torch.bool, device=device), size=1)
        tree.tokens[:, 0] = root
        tree.logp[:, 0] = 0.0
        tree.ancestors[:, 0, 0] = True
        return tree

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
        return tree

    def add(self, parents: torch.Tensor, tokens: torch.Tensor, logp: torch.Tensor) -> None:
        """Append one child per column to every row: parents, tokens, logp are (B, m)."""
        B, m = tokens.shape
        new = torch.arange(self.size, self.size + m, device=tokens.device)
        self.tokens[:, new] = tokens
        self.parent[:, new] = parents
        self.logp[:, new] = logp
        self.depth[:, new] = self.depth.gather(1, parents) + 1
        rows = torch.arange(B, device=tokens.device)[:, None]
        self.ancestors[:, new] = self.ancestors[rows, parents]  # (B, m, N): the parents' sets
        self.ancestors[:, new, new] = True
        self.size += m


def tree_mask(lengths: torch.Tensor, ancestors: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B, 1, T, kv_len) from ancestor rows (B, T, N): a node sees the row's cached prefix
    and the slots lengths + j of its ancestors j (itself included)."""
    B, T, N = ancestors.shape
    keys = torch.arange(kv_len, device=lengths.device)
    prefix = (keys[None, None, :] < lengths[:, None, None]).expand(B, T, kv_len)
    slots = (lengths[:, None] + torch.arange(N, device=lengths.device))[:, None, :]
    nodes = torch.zeros(B, T, kv_len, dtype=torch.bool, device=lengths.device)
    nodes.scatter_(2, slots.expand(B, T, N), ancestors)
    return (prefix | nodes)[:, None]


def tree_part(tree: Tree, nodes: torch.Tensor, cache: KVCache,
              vocab_size: Optional[int] = None) -> PassPart:
    """The pass over `nodes` (B, T) of the tree, with K/V written to their node slots.
    Tokens at or past `vocab_size` (a draft with a smaller vocabulary) become token 0."""
    lengths = cache.lengths
    ancestors = tree.ancestors.gather(1, nodes[..., None].expand(-1, -1, tree.ancestors.shape[2]))
    tokens = tree.tokens.gather(1, nodes)
    if vocab_size is not None:
        tokens = torch.where(tokens < vocab_size, tokens, torch.zeros_like(tokens))
    return PassPart(tokens, cache,
                    positions=lengths[:, None] + tree.depth.gather(1, nodes), kv_len=cache.max_len,
                    slots=lengths[:, None] + nodes,
                    mask=tree_mask(lengths, ancestors, cache.max_len))


@torch.inference_mode()
def grow(draft, cache: KVCache, root: torch.Tensor, budget: int, *, width: int = 8,
         children: int = 4, max_depth: int = 32, vocab: Optional[int] = None) -> Tree:
    """Best-first growth: expand the `width` most probable unexpanded nodes per draft call,
    add the best of their top-`children` children by cumulative log-probability, until the
    budget is full, then give every leaf its draft K/V (so any accepted path is complete in
    the draft's cache)."""
    tree = Tree.empty(root, budget)
    B, device = root.shape[0], root.device
    rows = torch.arange(B, device=device)[:, None]
    while tree.size < budget:
        # Unexpanded nodes of usable depth, most probable first (the same count in every row).
        score = tree.logp[:, :tree.size].masked_fill(
            tree.expanded[:, :tree.size] | (tree.depth[:, :tree.size] >= max_depth), float("-inf"))
        w = min(width, tree.size)
        best, nodes = score.topk(w, dim=1)
        if bool((best == float("-inf")).all()):
            break  # nothing left to expand
        part = tree_part(tree, nodes, cache, draft.config.vocab_size)
        draft.run_parts([part])
        logprobs = torch.log_softmax(draft.head(part.h).float(), dim=-1)  # (B, w, V)
        if vocab is not None:
            logprobs = logprobs[..., :vocab]
        tree.expanded[rows, nodes] = True
        top_lp, top_tok = logprobs.topk(min(children, logprobs.shape[-1]), dim=-1)  # (B, w, c)
        cand = (best[..., None] + top_lp).reshape(B, -1)
        cand_parent = nodes[..., None].expand_as(top_tok).reshape(B, -1)
        take = min(budget - tree.size, cand.shape[1])
        lp, pick = cand.topk(take, dim=1)
        # A row whose frontier is exhausted (-inf) still gets nodes: harmless, never accepted
        # unless the target picks them, which is exact either way.
        tree.add(cand_parent.gather(1, pick), top_tok.reshape(B, -1).gather(1, pick), lp)
    leaves = (~tree.expanded[:, :tree.size]).nonzero()  # host sync once per round
    if leaves.numel():
        count = (~tree.expanded[:, :tree.size]).sum(1)
        if bool((count == count[0]).all()):
            nodes = leaves[:, 1].view(B, -1)
            draft.run_parts([tree_part(tree, nodes, cache, draft.config.vocab_size)])
        else:
            every = torch.arange(tree.size, device=device).expand(B, -1)
            draft.run_parts([tree_part(tree, every, cache, draft.config.vocab_size)])
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


@torch.inference_mode()
def generate_tree(llm, requests, params: SamplingParams, generator, stats, rows_per_pass: int,
                  budget: int) -> None:
    """Tree-mode generation for `requests` (spec.pipeline.Request), `rows_per_pass` at a time."""
    target, draft = llm.model, llm.draft_model
    tcfg, dcfg, device = llm.config, llm.draft_config, llm.device
    eos = set(llm.eos_token_ids) if not params.ignore_eos else set()
    for start in range(0, len(requests), rows_per_pass):
        batch = requests[start:start + rows_per_pass]
        B = len(batch)
        lens = torch.tensor([len(r.prompt) for r in batch], device=device)
        longest = max(len(r.prompt) for r in batch)
        max_len = longest + params.max_new_tokens + budget + 2
        tcache = KVCache(tcfg.n_layers, B, max_len, tcfg.n_kv_heads, tcfg.head_dim, llm.dtype, device)
        dcache = KVCache(dcfg.n_layers, B, max_len, dcfg.n_kv_heads, dcfg.head_dim, llm.dtype, device)
        ids = torch.zeros(B, longest, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, :len(r.prompt)] = torch.tensor(r.prompt)
        ids = ids.to(device)
        from ..sampling import select

        last = select(target.prefill(ids, lens, tcache, llm.prefill_chunk), params, generator)
        draft_ids = torch.where(ids < dcfg.vocab_size, ids, torch.zeros_like(ids))
        draft.prefill(draft_ids, lens, dcache, llm.prefill_chunk)
        stats.prefill_passes += 1
        active = list(range(B))
        for b, tok in enumerate(last.tolist()):  # once per batch, after prefill
            batch[b].add(tok, eos, params.max_new_tokens)
        active = [b for b in active if batch[b].finish_reason is None]
        while active:
            tree = grow(draft, dcache, last, budget, vocab=tcfg.vocab_size)
            part = tree_part(tree, torch.arange(tree.size, device=device).expand(B, -1), tcache)
            target.run_parts([part])
            stats.decode_passes += 1
            path, accepted, nxt = accept(tree, target.head(part.h), params, generator)
            commit(tcache, path, accepted)
            commit(dcache, path, accepted)
            emitted = torch.cat([tree.tokens.gather(1, path[:, 1:]), nxt[:, None]], dim=1)
            emitted = emitted.scatter(1, accepted[:, None], nxt[:, None])
            last = nxt
            emitted, accepted_list = emitted.tolist(), accepted.tolist()  # one sync per round
            for b in active:
                stats.proposed += tree.size - 1
                stats.accepted += accepted_list[b]
                stats.row_passes += 1
                for tok in emitted[b][:accepted_list[b] + 1]:
                    if batch[b].add(tok, eos, params.max_new_tokens):
                        break
            done = [b for b in active if batch[b].finish_reason is not None]
            if done:  # finished rows ride along: keep their caches from growing
                rows = torch.tensor(done, device=device)
                tcache.lengths[rows] = 0
                dcache.lengths[rows] = 0
            active = [b for b in active if batch[b].finish_reason is None]

