"""Draft trees (SpecExec, arXiv 2406.02532 §3): a tree per row in preallocated index arrays.

Node i of row b keeps its K/V in cache slot lengths[b] + i during a round; the arrays are
preallocated for the largest budget: token, parent, depth, cumulative log-probability, the
ancestor mask and two flags (expanded, draft K/V present). tree_part and root_part turn
nodes into the pass parts that the draft's growth and the target's verification run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..kvcache import KVCache
from ..models.attention import TreeMask
from ..models.passes import PassPart

NEG_INF = float("-inf")


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
