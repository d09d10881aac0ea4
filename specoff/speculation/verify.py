"""Tree verification (SpecExec §3.3): the target's pick after every node, the walk down the
tree that accepts each child equal to its parent's pick, and the commit of the accepted
path into the caches.

The tree is a cache of target distributions: a child is accepted iff it equals the token
the target picked at its parent (argmax, or a sample from its own distribution), and the
target's pick at the first node with no such child is the bonus token. Exact for greedy
and for sampling, whatever the tree's shape.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kvcache import KVCache, SegmentKVCache
from ..options import KernelOptions
from ..sampling import SamplingParams, select
from .growth import AcceptanceModel
from .tree import Tree

COMMIT_SCRATCH_BYTES = 64 << 20  # commit moves K/V through at most this much scratch at once


def target_picks(head, h: torch.Tensor, params: SamplingParams,
                 generator: Optional[torch.Generator], chunk: int = 512,
                 kernels: KernelOptions = KernelOptions()) -> torch.Tensor:
    """What the target picks after each node, (B, N): its head over the final hidden states
    h (B, N, D), greedy or sampled, `chunk` rows × nodes at a time, so a throughput
    pass's logits (130 rows × 17 nodes × 32k vocabulary: 1.1 GiB in fp32 with top-p's sort)
    never sit in memory at once (planner.plan_run's max_logit_rows)."""
    B, N, D = h.shape
    flat = h.reshape(B * N, D)
    if B * N <= chunk:
        return select(head(h), params, generator, kernels)
    picks = torch.empty(B * N, dtype=torch.long, device=h.device)
    for lo in range(0, B * N, chunk):
        picks[lo:lo + chunk] = select(head(flat[lo:lo + chunk][None])[0], params, generator, kernels)
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
    (models.host_cache.streamed_attention) is moved by the same kernels through its device alias
    (KVCache.mapped), only the path's nodes crossing the bus (gathering it on the CPU takes
    seconds a round at a throughput batch)."""
    if cache.row_start is not None:  # rows of a shared pool (SegmentKVCache)
        _commit_segments(cache, path)
        cache.advance(accepted + 1)
        return
    L_, B, KV, S, hd = cache.k.shape
    P = path.shape[1]
    src = (cache.lengths[:, None] + path).clamp(max=S - 1)  # (B, P)
    dst = (cache.lengths[:, None] + torch.arange(P, device=path.device)).clamp(max=S - 1)
    bufs = (cache.k, cache.v)
    if cache.k.device != src.device:  # a cache in host memory (models.host_cache)
        if src.is_cuda:
            bufs = cache.mapped()
        else:
            src, dst = src.to(cache.k.device), dst.to(cache.k.device)
    step = max(1, COMMIT_SCRATCH_BYTES // (B * KV * P * hd * cache.k.element_size()))
    for lo in range(0, L_, step):
        n = min(step, L_ - lo)
        index = lambda i: i[None, :, None, :, None].expand(n, B, KV, P, hd)  # noqa: E731
        for buf in bufs:
            part = buf[lo:lo + n]
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
            part = pool[lo:lo + n]
            part.scatter_(2, index(dst), part.gather(2, index(src)))
