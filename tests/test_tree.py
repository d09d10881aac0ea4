"""SpecExec tree mode: hand-built trees, best-first growth, tree attention, the budget choice,
exact greedy and sampled output."""
import dataclasses
import heapq
import math
from types import SimpleNamespace

import pytest
import torch

import specoff
from conftest import DEVICE, gpu, same_distribution, without_tokenizers
from specoff.kvcache import KVCache
from specoff.planner import TreeBudgetTuner, choose_tree_budget, expected_tree_rates, tree_budget_ladder
from specoff.options import CacheOptions, OptionsError
from specoff.speculation import chain_scheduler, growth, tree_scheduler
from specoff.speculation.growth import AcceptanceModel, expand, grow, growth_shape
from specoff.speculation.tree import Tree, tree_part
from specoff.speculation.tree_scheduler import tree_passes
from specoff.speculation.verify import accept, commit, target_picks

PROMPTS = ["def fibonacci(n):", "Beautiful is better than", "x", "import os\nimport sys\n"]

#        0 (root, token 10)
#       / \
#  1 (11)  2 (12)
#     |      \
#  3 (13)    4 (14)
#     |
#  5 (15)
TOKENS = [[10, 11, 12, 13, 14, 15]]
PARENTS = [[-1, 0, 0, 1, 2, 3]]


def logits_picking(picks, vocab=20):
    """Target logits whose argmax after node i is picks[i]."""
    logits = torch.zeros(1, len(picks), vocab)
    logits[0, torch.arange(len(picks)), torch.tensor(picks)] = 5.0
    return logits


@pytest.mark.parametrize("picks, path, accepted, bonus", [
    ([11, 13, 0, 15, 0, 7], [0, 1, 3, 5], 3, 7),   # down the left branch to the leaf, bonus 7
    ([12, 0, 14, 0, 9, 0], [0, 2, 4], 2, 9),        # the right branch
    ([11, 19, 0, 0, 0, 0], [0, 1], 1, 19),          # node 1 has no child 19
    ([3, 0, 0, 0, 0, 0], [0], 0, 3),                # nothing accepted: the target's own token
])
def test_greedy_walk_by_hand(picks, path, accepted, bonus):
    tree = Tree.from_parents(TOKENS, PARENTS)
    assert tree.depth.tolist() == [[0, 1, 1, 2, 2, 3]]
    assert tree.ancestors[0, 5].nonzero().flatten().tolist() == [0, 1, 3, 5]
    got_path, got_accepted, got_bonus = accept(tree, logits_picking(picks),
                                               specoff.SamplingParams(), None)
    assert got_accepted.tolist() == [accepted] and got_bonus.tolist() == [bonus]
    assert got_path[0, :accepted + 1].tolist() == path


def test_sampled_walk_follows_the_target_samples():
    """With sampling, the target's own draws (fixed seed) decide the walk."""
    tree = Tree.from_parents(TOKENS, PARENTS)
    logits = torch.randn(1, 6, 20, generator=torch.Generator().manual_seed(0))
    logits[0, 0, 11] = logits[0, 1, 13] = 50.0  # near-certain: root → 11 → 13
    params = specoff.SamplingParams(temperature=1.0)
    path, accepted, bonus = accept(tree, logits, params, torch.Generator().manual_seed(3))
    assert path[0, :3].tolist() == [0, 1, 3] and accepted.item() >= 2
    expect = torch.Generator().manual_seed(3)
    from specoff.sampling import logits_to_probs, sample_from
    picks = sample_from(logits_to_probs(logits, 1.0), expect)
    walk, node = [0], 0
    while True:
        kids = [j for j in range(6) if PARENTS[0][j] == node and TOKENS[0][j] == picks[0, node]]
        if not kids:
            break
        node = kids[0]
        walk.append(node)
    assert path[0, :len(walk)].tolist() == walk and bonus.item() == picks[0, node].item()


def test_commit_moves_the_accepted_path_into_place():
    cache = KVCache(n_layers=2, rows=1, max_len=16, n_kv_heads=1, head_dim=2, dtype=torch.float32,
                    device="cpu")
    cache.advance(4)
    for node in range(6):  # node i's K/V sits in slot 4 + i
        cache.k[:, 0, :, 4 + node] = float(node)
        cache.v[:, 0, :, 4 + node] = -float(node)
    path = torch.tensor([[0, 1, 3, 5]])
    commit(cache, path, torch.tensor([3]))
    assert cache.lengths.tolist() == [8]
    assert cache.k[1, 0, 0, 4:8, 0].tolist() == [0, 1, 3, 5]
    assert cache.v[0, 0, 0, 4:8, 1].tolist() == [0, -1, -3, -5]


def test_tree_attention_equals_plain_attention_on_each_path(make_checkpoint):
    """Every node's logits in one tree pass equal the plain causal model's on root→node."""
    model = specoff.load_model(make_checkpoint("qwen3_moe"), "cpu")
    prefix = torch.tensor([[5, 9, 2, 7, 3]])
    tree = Tree.from_parents(TOKENS, PARENTS)
    cache = model.new_cache(1, 32)
    model.prefill(prefix, torch.tensor([5]), cache, chunk=4)
    part = tree_part(tree, torch.arange(6)[None], cache)
    model.run_parts([part])
    logits = model.head(part.h)[0]
    for node in range(6):
        path = tree.ancestors[0, node].nonzero().flatten()
        seq = torch.cat([prefix[0], tree.tokens[0, path]])[None]
        torch.testing.assert_close(logits[node], model(seq)[0, -1], rtol=1e-4, atol=1e-4)


def test_tree_kernel_equals_masked_attention(make_checkpoint, monkeypatch):
    """The Triton verification kernel (Triton's interpreter on the CPU) gives the tree pass
    the logits of plain masked attention: all nodes at once, and a subset of them over a tree
    whose other nodes are cached (as the draft's expansion passes run)."""
    from specoff.options import KernelOptions

    model = specoff.load_model(make_checkpoint("qwen3_moe"), DEVICE, "float32")
    prefix = torch.tensor([[5, 9, 2, 7, 3], [4, 4, 8, 1, 0]], device=DEVICE)
    tree = Tree.from_parents(TOKENS * 2, PARENTS * 2)
    tree = tree.to(DEVICE)
    cache = model.new_cache(2, 32)
    model.prefill(prefix, torch.tensor([5, 3], device=DEVICE), cache, chunk=4)
    logits = {}
    for mode in ("torch", "triton"):
        model.use_kernels(KernelOptions(interpret=True, tree_attention=mode == "triton", fused_elementwise=False,
                                        skinny_products=False))
        part = tree_part(tree, torch.arange(6, device=DEVICE).expand(2, -1), cache)
        model.run_parts([part])
        subset = tree_part(tree, torch.tensor([[5, 2, 3], [1, 4, 0]], device=DEVICE), cache)
        model.run_parts([subset])
        logits[mode] = (model.head(part.h), model.head(subset.h))
    for ref, out in zip(logits["torch"], logits["triton"]):
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(logits["torch"][1][0], logits["torch"][0][0, [5, 2, 3]],
                               rtol=1e-4, atol=1e-4)


class TableDraft:
    """A draft whose next-token log-probabilities depend on the last token only: table[token]."""

    def __init__(self, table):
        self.table = table
        self.config = SimpleNamespace(vocab_size=table.shape[0])
        self.passes = 0

    def run_parts(self, parts):
        self.passes += 1
        for p in parts:
            p.h = p.input_ids

    def head(self, h):
        return self.table[h]


def best_first(table, root, budget, children, max_depth):
    """Brute force: the `budget` most probable nodes of the tree of top-`children` proposals."""
    heap, out = [(0.0, (root,))], []
    while heap and len(out) < budget:
        neg, path = heapq.heappop(heap)
        out.append(path)
        if len(path) - 1 < max_depth:
            lp, tok = table[path[-1]].topk(children)
            for l, t in zip(lp.tolist(), tok.tolist()):
                heapq.heappush(heap, (neg - l, path + (t,)))
    return set(out)


def check_tree(tree, table, acceptance=None):
    """Invariants: real nodes hang off real parents with matching depth, ancestors, rank
    among the parent's proposals, draft log-probability and cumulative score (the draft's
    log-probability, or `acceptance`'s estimate); (parent, token) pairs are unique; returns
    the token paths."""
    paths = set()
    for b in range(tree.tokens.shape[0]):
        seen = set()
        for i in range(tree.size):
            if tree.logp[b, i] == float("-inf"):
                assert tree.parent[b, i] == -1 and tree.expanded[b, i]  # an empty slot
                continue
            p = int(tree.parent[b, i])
            path, j = [], i
            while j >= 0:
                path.append(int(tree.tokens[b, j]))
                j = int(tree.parent[b, j])
            paths.add(tuple(reversed(path)))
            if i == 0:
                continue
            assert 0 <= p < tree.size and tree.logp[b, p] > float("-inf")
            assert tree.depth[b, i] == tree.depth[b, p] + 1 and (p, int(tree.tokens[b, i])) not in seen
            seen.add((p, int(tree.tokens[b, i])))
            expect = tree.ancestors[b, p].clone()
            expect[i] = True
            assert torch.equal(tree.ancestors[b, i], expect)
            own = table[tree.tokens[b, p], tree.tokens[b, i]]
            rank = int((table[tree.tokens[b, p]] > own).sum())
            assert math.isclose(tree.own[b, i], own, abs_tol=1e-5) and tree.rank[b, i] == rank
            step = own if acceptance is None else acceptance.score(
                table[tree.tokens[b, p]].topk(rank + 1).values)[rank]
            assert math.isclose(tree.logp[b, i], tree.logp[b, p] + step, abs_tol=1e-4)
            assert not tree.expanded[b, i] or tree.has_kv[b, i]
    return paths


def table_draft(vocab=12, seed=0, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(sharp * torch.randn(vocab, vocab, generator=g), dim=-1)


@pytest.mark.parametrize("width", [1, 3, 8, 20])
def test_growth_keeps_the_best_first_top_budget_set(width):
    """Whatever the width (nodes expanded per pass), growth ends with the exact `budget`
    most probable nodes: wide passes fill the tree with poor children that later, better
    ones replace, and growth stops only once no open node could still enter."""
    table = table_draft()
    budget, children, depth = 20, 3, 4
    cache = KVCache(1, 1, 64, 1, 2, torch.float32, "cpu")
    draft = TableDraft(table)
    tree = grow(draft, cache, torch.tensor([7]), budget, width=width, children=children,
                max_depth=depth)
    assert tree.size == budget
    assert check_tree(tree, table) == best_first(table, 7, budget, children, depth)
    # The stop rule holds at the end: no open node beats the worst one kept...
    worst = tree.logp[0, :budget].min()
    open_ = ~tree.expanded[0, :budget] & (tree.depth[0, :budget] < depth)
    assert (tree.logp[0, :budget][open_] <= worst).all()
    # ... and growth stopped on it, well before the bound on passes.
    assert draft.passes < depth + 2 * math.ceil(budget / width)


def test_wide_growth_replaces_leaves():
    """Two passes fill a 12-node tree with the root's and its children's proposals; the
    remaining passes replace some of them (slots reused) to reach the best-first set."""
    table = table_draft(seed=3)
    cache = KVCache(1, 1, 64, 1, 2, torch.float32, "cpu")
    early = grow(TableDraft(table), cache, torch.tensor([2]), 12, width=12, children=4,
                 max_depth=6, max_passes=2)
    full = grow(TableDraft(table), cache, torch.tensor([2]), 12, width=12, children=4, max_depth=6)
    best = best_first(table, 2, 12, 4, 6)
    assert early.size == full.size == 12
    assert check_tree(early, table) != best and check_tree(full, table) == best


def test_growth_stops_at_the_depth_cap_and_on_a_sure_chain():
    """A draft sure of each next token: the tree is the chain, cut at the depth cap, plus the
    best siblings; with the cap far away, a budget-8 tree is the 8-node chain."""
    vocab = 10
    g = torch.Generator().manual_seed(1)
    probs = 0.01 * torch.softmax(torch.randn(vocab, vocab, generator=g), dim=-1)  # no ties
    for t in range(vocab):
        probs[t, (t + 1) % vocab] = 0.99
    table = torch.log_softmax(probs.log(), dim=-1)
    cache = KVCache(1, 1, 64, 1, 2, torch.float32, "cpu")
    draft = TableDraft(table)
    tree = grow(draft, cache, torch.tensor([0]), 8, width=1, children=2, max_depth=32)
    assert sorted(check_tree(tree, table), key=len)[-1] == tuple(range(8))
    # Seven passes expand the chain's first seven nodes, whose siblings fall out one by one;
    # then the open leaf (node 7, the worst of the 8) cannot beat the worst: no eighth pass.
    assert draft.passes == 7
    tree = grow(draft, cache, torch.tensor([0]), 8, width=4, children=2, max_depth=3)
    assert int(tree.depth[0, :8].max()) == 3
    assert check_tree(tree, table) == best_first(table, 0, 8, 2, 3)


def test_acceptance_model_counts_each_proposal_against_its_parents_pick():
    """Every proposed node is one trial of its (rank, draft log-probability) cell, a hit
    when the target's pick after its parent is its token; the estimate blends the counts
    with the draft's probability at the cell's centre."""
    tree = Tree.from_parents(TOKENS, PARENTS)
    tree.rank[0] = torch.tensor([0, 0, 1, 0, 0, 2])
    tree.own[0] = torch.tensor([0.0, -0.05, -3.5, -0.05, -0.7, -20.0])
    model = AcceptanceModel("cpu", ranks=2, prior=2.0)
    # Target picks after each node: 11 after the root (node 1 hits, node 2 misses), 13 after
    # node 1 (node 3 hits), 9 after node 2 (node 4 misses), 15 after node 3 (node 5 hits).
    picks = torch.tensor([[11, 13, 9, 15, 0, 0]])
    model.observe(tree, picks)
    bins = len(AcceptanceModel.EDGES) + 1
    cell = lambda rank, b: rank * bins + b  # noqa: E731 -- bins: -log p 0.05 → 0, 0.7 → 3, 3.5 → 7, 20 → 14
    trials, hits = torch.zeros(2 * bins), torch.zeros(2 * bins)
    for c, hit in [(cell(0, 0), 1), (cell(1, 7), 0), (cell(0, 0), 1), (cell(0, 3), 0),
                   (cell(1, 14), 1)]:  # rank 2 counts as the last rank kept
        trials[c] += 1
        hits[c] += hit
    assert torch.equal(model.trials.view(-1), trials) and torch.equal(model.hits.view(-1), hits)
    p0 = model.p0.view(-1)
    expect = ((hits + 2.0 * p0) / (trials + 2.0)).log().clamp(max=0.0)
    assert torch.allclose(model.table.view(-1), expect)
    # The scores of top-k proposals read the table by rank and draft log-probability.
    assert torch.allclose(model.score(torch.tensor([[-0.05, -3.5]])),
                          expect[[cell(0, 0), cell(1, 7)]][None])
    # An empty slot (parent -1) is not a trial; counts halve past the cap.
    tree.parent[0, 5], tree.logp[0, 5] = -1, float("-inf")
    capped = AcceptanceModel("cpu", ranks=2, cap=3.0)
    capped.observe(tree, picks)
    assert capped.trials.sum() == 2.0 and capped.hits.sum() == 1.0


def test_learned_scores_grow_the_tree_the_target_accepts():
    """A flat draft whose top token is always the target's pick: ranked by the draft's
    log-probabilities the tree is bushy and shallow; once the model has seen a few verified
    trees, growth follows the draft's top tokens deep and the walk accepts far more."""
    table = table_draft(seed=2, sharp=0.3)
    picks_of = lambda tree: table.argmax(-1)[tree.tokens]  # noqa: E731 -- the target = draft greedy
    budget, children = 16, 3
    cache = KVCache(1, 1, 64, 1, 2, torch.float32, "cpu")
    params = specoff.SamplingParams()
    bushy = grow(TableDraft(table), cache, torch.tensor([4]), budget, children=children)
    model = AcceptanceModel("cpu", ranks=children)
    for root in range(6):  # rounds: grow, verify, learn
        tree = grow(TableDraft(table), cache, torch.tensor([root]), budget, children=children,
                    acceptance=model)
        accept(tree, logits_picking(picks_of(tree)[0].tolist(), vocab=12), params, None, model)
    deep = grow(TableDraft(table), cache, torch.tensor([4]), budget, children=children,
                acceptance=model)
    check_tree(deep, table, model)
    walked = [int(accept(t, logits_picking(picks_of(t)[0].tolist(), vocab=12), params, None)[1])
              for t in (bushy, deep)]
    assert walked[0] <= 3 and walked[1] >= 12
    assert int(deep.depth[0, :budget].max()) > int(bushy.depth[0, :budget].max())


def test_growth_batches_rows_with_different_trees():
    """Rows grow independently in one set of passes (a row that stops early pads with
    empty slots or keeps its best nodes) and each gets its own best-first set."""
    table = table_draft(seed=5)
    cache = KVCache(1, 3, 64, 1, 2, torch.float32, "cpu")
    cache.advance(torch.tensor([3, 0, 7]))
    roots = [1, 4, 9]
    tree = grow(TableDraft(table), cache, torch.tensor(roots), 16, width=4, children=3,
                max_depth=3)
    for b, root in enumerate(roots):
        row = Tree(*(t[b:b + 1] for t in tree.tensors()), size=tree.size)
        assert check_tree(row, table) == best_first(table, root, 16, 3, 3)


def test_grown_draft_log_probs_match_plain_decoding(make_checkpoint):
    """A real draft: every node's cumulative log-probability, computed through tree
    attention over slots that growth fills, drops and reuses, equals the plain causal
    model's along the node's path: every ancestor's K/V was in place when it was read."""
    model = specoff.load_model(make_checkpoint("llama"), "cpu")
    prefix = [5, 9, 2, 7, 3]
    cache = model.new_cache(1, 64)
    model.prefill(torch.tensor([prefix]), torch.tensor([5]), cache, chunk=8)
    tree = grow(model, cache, torch.tensor([11]), 24, width=6, children=4, max_depth=5)
    for i in range(tree.size):
        nodes = tree.ancestors[0, i].nonzero().flatten()
        nodes = nodes[tree.depth[0, nodes].argsort()]
        seq = prefix + tree.tokens[0, nodes].tolist()
        logprobs = torch.log_softmax(model(torch.tensor([seq]))[0].float(), dim=-1)
        expect = sum(logprobs[len(prefix) + k - 1, seq[len(prefix) + k]] for k in range(1, len(nodes)))
        assert math.isclose(float(tree.logp[0, i]), float(expect), abs_tol=1e-4), i


def test_next_round_repairs_the_last_accepted_leaf(make_checkpoint):
    """After a commit that ends on a leaf the draft never expanded (its K/V never computed),
    the next round's first pass recomputes it: the draft cache then equals a fresh prefill."""
    model = specoff.load_model(make_checkpoint("llama"), "cpu")
    prefix = [5, 9, 2, 7, 3]
    cache = model.new_cache(1, 64)
    model.prefill(torch.tensor([prefix]), torch.tensor([5]), cache, chunk=8)
    tree = grow(model, cache, torch.tensor([11]), 16, width=4, children=4, max_depth=4)
    leaf = int(((~tree.has_kv[0, :16]) * (tree.depth[0, :16] + 1)).argmax())
    assert not tree.has_kv[0, leaf] and tree.depth[0, leaf] >= 2
    nodes = tree.ancestors[0, leaf].nonzero().flatten()
    path = nodes[tree.depth[0, nodes].argsort()][None]
    accepted = tree.depth[0, leaf][None]
    seq = prefix + tree.tokens[0, path[0]].tolist()
    commit(cache, path, accepted)
    grow(model, cache, torch.tensor([13]), 8, tree=tree, prev=tree.tokens[0, leaf][None])
    fresh = model.new_cache(1, 64)
    model.prefill(torch.tensor([seq + [13]]), torch.tensor([len(seq) + 1]), fresh, chunk=8)
    n = len(seq) + 1
    torch.testing.assert_close(cache.k[:, :, :, :n], fresh.k[:, :, :, :n], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.v[:, :, :, :n], fresh.v[:, :, :, :n], rtol=1e-4, atol=1e-4)


def test_growth_shape_widens_for_big_budgets():
    """Up to ~128 nodes a pass cost about one on a GPU: big trees grow in wide passes."""
    assert [growth_shape(n)[0] for n in (8, 16, 64, 128, 256, 512, 1024, 2048, 4096)] == [
        8, 16, 16, 32, 64, 64, 128, 256, 256]
    # Over many rows a pass expands at most 512 nodes in all.
    assert [growth_shape(1024, rows)[0] for rows in (1, 4, 8, 144, 1000)] == [128, 128, 64, 3, 1]


def merge_case():
    """Five slots: root 10 (expanded), 11 and 12 under it, two empty slots."""
    tree = Tree.empty(torch.tensor([10]), 5)
    tree.size = 5
    tree.logp[0, 0] = 0.0
    tree.expanded[0, 0] = True
    for slot, (tok, lp) in enumerate([(11, -1.0), (12, -2.0)], start=1):
        tree.tokens[0, slot], tree.parent[0, slot], tree.depth[0, slot] = tok, 0, 1
        tree.logp[0, slot], tree.ancestors[0, slot, [0, slot]] = lp, True
        tree.expanded[0, slot] = tree.has_kv[0, slot] = False
    return tree


def nodes_of(tree):
    """{token path: (cumulative log-probability, depth)} of the real nodes, checking ancestors."""
    out = {}
    for i in range(tree.size):
        if tree.logp[0, i] == float("-inf"):
            assert tree.parent[0, i] == -1 and tree.expanded[0, i]
            continue
        path, j = [], i
        while j >= 0:
            path.append(j)
            j = int(tree.parent[0, j])
        assert tree.ancestors[0, i, :tree.size].nonzero().flatten().tolist() == sorted(path)
        out[tuple(int(tree.tokens[0, j]) for j in reversed(path))] = (float(tree.logp[0, i]),
                                                                      int(tree.depth[0, i]))
    return out


def test_merge_fills_empty_slots_then_replaces_the_worst_leaves():
    """Fixed-shape merge: candidates take empty slots while there are some, never a dead one
    (-inf); once full the best `size` stay (whole subtrees dropped, their slots reused), and
    a child tied with its parent ranks after it."""
    tree = merge_case()
    tree.merge(torch.tensor([[-1.5, -0.5, -3.0, float("-inf")]]), torch.tensor([[1, 0, 2, 0]]),
               torch.tensor([[13, 14, 15, 16]]))
    assert nodes_of(tree) == {(10,): (0.0, 0), (10, 11): (-1.0, 1), (10, 12): (-2.0, 1),
                              (10, 11, 13): (-1.5, 2), (10, 14): (-0.5, 1)}
    assert tree.tokens[0].tolist() == [10, 11, 12, 13, 14]  # the empty slots, in order
    assert not tree.expanded[0, 3:].any() and not tree.has_kv[0, 3:].any()
    # Full: 17 under 14 (-0.75) beats 12 (-2), which goes; 18 under 13 (-1.625) does not enter.
    tree.merge(torch.tensor([[-0.75, -1.625]]), torch.tensor([[4, 3]]), torch.tensor([[17, 18]]))
    assert nodes_of(tree) == {(10,): (0.0, 0), (10, 11): (-1.0, 1), (10, 11, 13): (-1.5, 2),
                              (10, 14): (-0.5, 1), (10, 14, 17): (-0.75, 2)}
    assert tree.tokens[0, 2] == 17 and tree.depth[0, 2] == 2  # 12's slot, reused
    before = [t.clone() for t in tree.tensors()]
    # A child as probable as its parent, the worst node (-1.5): the parent stays, it does not enter.
    tree.merge(torch.tensor([[-1.5, float("-inf")]]), torch.tensor([[3, 0]]), torch.tensor([[19, 1]]))
    assert all(torch.equal(a, b) for a, b in zip(before, tree.tensors()))


def test_a_pass_with_nothing_open_leaves_the_tree_as_it_is(make_checkpoint):
    """Once growth stops, another pass (the GPU's look-ahead one) changes no array, and the
    K/V it rewrites (padding picks) is what was there: the same inputs give the same values."""
    table = table_draft(seed=2)
    cache = KVCache(1, 1, 64, 1, 2, torch.float32, "cpu")
    draft = TableDraft(table)
    tree = grow(draft, cache, torch.tensor([4]), 16, width=4, children=3, max_depth=4)
    before = [t.clone() for t in tree.tensors()]
    assert expand(draft, cache, tree, 4, 3, 4).item()
    assert all(torch.equal(a, b) for a, b in zip(before, tree.tensors()))
    model = specoff.load_model(make_checkpoint("llama"), "cpu")
    cache = model.new_cache(1, 64)
    model.prefill(torch.tensor([[5, 9, 2, 7, 3]]), torch.tensor([5]), cache, chunk=8)
    tree = grow(model, cache, torch.tensor([11]), 24, width=16, children=4, max_depth=3)
    before = [t.clone() for t in tree.tensors()]
    k = cache.k.clone()
    assert expand(model, cache, tree, 16, 4, 3).item()
    assert all(torch.equal(a, b) for a, b in zip(before, tree.tensors()))
    slots = 5 + tree.has_kv[0, :24].nonzero().flatten()
    torch.testing.assert_close(cache.k[:, :, :, slots], k[:, :, :, slots], rtol=1e-5, atol=1e-5)


def grow_rounds(model, graphs, budgets, device, learn=False):
    """Rounds of growth over two rows, each followed by the commit of the row's deepest
    path, so that later passes see new roots, prefixes and `prev` tokens. `learn`: nodes
    ranked by an AcceptanceModel that counts each tree against made-up target picks, so its
    table changes between rounds (graphs must read the current one)."""
    prefix = torch.tensor([[5, 9, 2, 7, 3], [4, 4, 8, 1, 6]], device=device)
    cache = model.new_cache(2, 256)
    model.prefill(prefix, torch.tensor([5, 4], device=device), cache, chunk=8)
    tree = Tree.empty(torch.zeros(2, dtype=torch.long, device=device), max(budgets))
    root, prev, rounds = torch.tensor([11, 12], device=device), None, []
    acceptance = AcceptanceModel(device, ranks=4) if learn else None
    for r, budget in enumerate(budgets):
        grow(model, cache, root, budget, width=8, children=4, max_depth=5, tree=tree, prev=prev,
             graphs=graphs, acceptance=acceptance)
        if learn:
            acceptance.observe(tree, (tree.tokens * 3 + r) % 7)
        rounds.append(([t.clone() for t in tree.tensors()], cache.k.clone(), cache.v.clone()))
        real = tree.logp[:, :budget] > float("-inf")
        leaf = (tree.depth[:, :budget] * real).argmax(dim=1)  # (B,)
        depth = tree.depth.gather(1, leaf[:, None])[:, 0]
        path = torch.zeros(2, int(depth.max()) + 1, dtype=torch.long, device=device)
        for b in range(2):
            nodes = tree.ancestors[b, leaf[b], :budget].nonzero().flatten()
            nodes = nodes[tree.depth[b, nodes].argsort()]
            path[b] = torch.cat([nodes, nodes[-1:].expand(path.shape[1] - len(nodes))])
        commit(cache, path, depth)
        prev = tree.tokens.gather(1, leaf[:, None])[:, 0]
        root = (prev * 7 + r) % 50 + 1
    return rounds, cache


def same_rounds(eager, captured, tol):
    for (trees, k, v), (trees_g, k_g, v_g) in zip(eager, captured):
        for name, a, b in zip(("tokens", "parent", "depth", "logp", "ancestors", "expanded",
                               "has_kv", "rank", "own"), trees, trees_g):
            if name in ("logp", "own"):
                torch.testing.assert_close(b, a, rtol=0, atol=tol)
            else:
                assert torch.equal(a, b), name
        torch.testing.assert_close(k_g, k, rtol=0, atol=tol)
        torch.testing.assert_close(v_g, v, rtol=0, atol=tol)


def test_graph_path_plumbing(make_checkpoint, monkeypatch):
    """The graph path (static tree and root/prev buffers, one runner per budget, the copy
    back) on the CPU, with a stand-in capture whose replay runs the pass again: it gives the
    eager path's trees and draft cache, round after round."""
    class Replay:
        def __init__(self, step, done):
            self.step, self.done = step, done

        def replay(self):
            self.done.copy_(self.step())

    def capture(self, step):  # runs nothing, as a capture does
        saved = [t.clone() for t in self.tree.tensors()] + [self.cache.k.clone(), self.cache.v.clone()]
        done = step()
        for t, s in zip(list(self.tree.tensors()) + [self.cache.k, self.cache.v], saved):
            t.copy_(s)
        return Replay(step, done), done

    monkeypatch.setattr(growth.GrowthGraphs, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    model = specoff.load_model(make_checkpoint("llama"), "cpu")
    budgets = [24, 24, 16, 24]
    eager, _ = grow_rounds(model, False, budgets, "cpu")
    captured, cache = grow_rounds(model, True, budgets, "cpu")
    same_rounds(eager, captured, 0.0)
    runners = [v for k, v in growth._growth_graphs[cache].items() if k != "pool"]
    assert sorted(r.tree.size for r in runners) == [16, 24]
    assert all(set(r.graphs) == {"first", "wide"} for r in runners)


@gpu
@pytest.mark.parametrize("family, dtype, learn", [("llama", "float32", False),
                                                  ("llama", "bfloat16", False),
                                                  ("qwen3_moe", "float32", False),
                                                  ("llama", "float32", True)])
def test_captured_growth_equals_eager(family, dtype, learn, make_checkpoint):
    """CUDA graphs of the growth passes (captured, then replayed over new roots, prefixes,
    budgets and learned acceptance tables) grow exactly the eager passes' trees and draft K/V."""
    model = specoff.load_model(make_checkpoint(family), "cuda", dtype)
    budgets = [64, 64, 32, 64, 64]
    eager, _ = grow_rounds(model, False, budgets, "cuda", learn)
    captured, cache = grow_rounds(model, True, budgets, "cuda", learn)
    same_rounds(eager, captured, 1e-5 if dtype == "float32" else 1e-2)
    runners = [v for k, v in growth._growth_graphs[cache].items() if k != "pool"]
    assert sorted(r.tree.size for r in runners) == [32, 64]
    assert all(set(r.graphs) == {"first", "wide"} for r in runners)


# -- the budget choice ------------------------------------------------------------------------

LADDER = [16, 32, 64, 128, 256, 512, 1024]
# Tokens per row per pass at each budget, and the tree growth time: a SpecExec-like curve.
PER_PASS = {16: 3.0, 64: 5.0, 256: 6.0, 1024: 6.4}
GROW = {16: 0.01, 64: 0.02, 256: 0.05, 1024: 0.3}


def test_copy_bound_pass_picks_a_big_tree():
    """At batch 1 an offloaded pass costs the copy whatever the tokens: the budget is set by
    the acceptance curve against the growth time."""
    flat = {n: 1.6 for n in PER_PASS}
    assert choose_tree_budget(LADDER, PER_PASS, flat, GROW) == 256
    # 3/1.61, 5/1.62, 6/1.65, 6.4/1.9 tokens/s at the budgets measured.
    rates = expected_tree_rates(list(PER_PASS), PER_PASS, flat, GROW)
    assert rates[256] == pytest.approx(6 / 1.65) and rates[1024] == pytest.approx(6.4 / 1.9)


def test_steep_pass_time_picks_a_small_tree():
    """A pass that grows with its tokens (compute-bound, e.g. a resident target) makes the
    extra accepted tokens of a bigger tree cost more than they bring."""
    steep = {n: 0.05 + 0.002 * n for n in PER_PASS}
    assert choose_tree_budget(LADDER, PER_PASS, steep, GROW) == 16
    # Milder: a budget between two measured ones (acceptance 5.5 interpolated in log(budget),
    # pass and growth in budget) beats both: 5.5 / 0.594 against 5 / 0.552 and 6 / 0.678.
    mild = {n: 0.5 + 0.0005 * n for n in PER_PASS}
    assert choose_tree_budget(LADDER, PER_PASS, mild, GROW) == 128


def test_untried_budgets_use_the_planner_prediction():
    """Between the budgets measured, acceptance is interpolated in log(budget) and the pass
    comes from the planner's prediction, scaled to the nearest measurement."""
    tokens = {16: 3.0, 256: 7.0}
    predict = lambda n: 1.0 + 0.004 * n  # noqa: E731
    measured = {n: 1.1 * predict(n) for n in tokens}  # the planner is 10% optimistic
    rates = expected_tree_rates(LADDER, tokens, measured, {}, predict)
    assert rates[64] == pytest.approx(5.0 / (1.1 * predict(64)))
    assert rates[1024] == pytest.approx(7.0 / (1.1 * predict(1024)))  # no credit past 256
    assert choose_tree_budget(LADDER, tokens, measured, {}, predict) == 64
    # A measured dip (noise) does not make a bigger tree look worse than a smaller one.
    assert expected_tree_rates([64], {16: 3.0, 64: 2.5}, {16: 1.0, 64: 1.0}, {})[64] == 3.0


def test_tuner_probes_then_settles_on_the_best_budget():
    ladder = tree_budget_ladder(1024)
    assert ladder == LADDER and tree_budget_ladder(64) == [16, 32, 64] and tree_budget_ladder(8) == [8]

    def world(n):  # tokens per pass, pass and growth seconds of a round at budget n
        return 1 + 1.25 * math.log2(n) - 0.05 * math.log2(n) ** 2, 1.6 + 4e-4 * n, 2e-4 * n

    true = {n: world(n)[0] / (world(n)[1] + world(n)[2]) for n in ladder}
    tuner = TreeBudgetTuner(ladder, revisit_every=8)
    assert tuner.probes == [16, 64, 256, 1024] and tuner.choice is None
    used = []
    for _ in range(40):
        n = tuner.next_budget()
        used.append(n)
        tuner.record(n, *world(n))
    assert used[:3] == [256, 1024, 64]  # a hill climb from the middle: 256 beats both neighbours
    assert tuner.choice == max(true, key=true.get)
    assert used.count(tuner.choice) > 20  # mostly the choice, with a neighbour now and then
    assert {c["budget"] for c in tuner.curve()} == set(used)
    # a steep pass time: the climb walks down to the small budgets
    steep = TreeBudgetTuner(ladder)
    used = []
    for _ in range(6):
        n = steep.next_budget()
        used.append(n)
        tokens, _, grow = world(n)
        steep.record(n, tokens, 1.6 + 0.02 * n, grow)
    assert used[:4] == [256, 1024, 64, 16] and steep.choice <= 32
    fixed = TreeBudgetTuner([64])
    assert [fixed.next_budget() for _ in range(3)] == [64] * 3 and fixed.choice == 64


@pytest.mark.parametrize("sigma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("budget", [1, 8, 64, "auto"])
def test_greedy_tree_equals_target(sigma, budget, pairs):
    draft, target = pairs(sigma)
    params = specoff.SamplingParams(max_new_tokens=20)
    expect = [o.token_ids for o in specoff.LLM(target, device="cpu").generate(PROMPTS, params)]
    llm = specoff.LLM(target, draft=draft, device="cpu", spec="tree", tree_budget=budget)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expect
    s = llm.last_stats
    assert s.rounds == len(s.tree_budgets) == s.decode_passes
    assert sum(c["rounds"] for c in s.tree_curve) == s.rounds and s.draft_seconds > 0
    if budget == "auto":  # on the CPU: budgets 16, 32, 64; the climb probes 64, then 16
        assert s.tree_budgets[:2] == [64, 16] and s.tree_budget in (16, 32, 64)
    else:
        assert set(s.tree_budgets) == {budget} and s.tree_budget == budget
    if budget != 1:
        assert s.tokens_per_pass >= 1
    if sigma == 0.0 and budget == 64:
        assert s.tokens_per_pass > 2.5


def test_tree_scores_learned_or_drafted(pairs):
    """Ranking by the draft's log-probabilities (tree_scores="draft") keeps exact output too;
    the learned model counts every verified tree, lives across calls, and can be reset."""
    draft, target = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=12)
    expect = [o.token_ids for o in specoff.LLM(target, device="cpu").generate(PROMPTS, params)]
    plain = specoff.LLM(target, draft=draft, device="cpu", spec="tree", tree_budget=16,
                        tree_scores="draft")
    assert [o.token_ids for o in plain.generate(PROMPTS, params)] == expect
    assert plain.tree_acceptance_model() is None
    learned = specoff.LLM(target, draft=draft, device="cpu", spec="tree", tree_budget=16)
    assert [o.token_ids for o in learned.generate(PROMPTS, params)] == expect
    model = learned.tree_acceptance_model()
    seen = float(model.trials.sum())
    assert seen >= learned.last_stats.proposed > 0  # ≥: proposals past a row's end count too
    learned.generate(PROMPTS[:1], params)
    assert learned.tree_acceptance_model() is model and float(model.trials.sum()) > seen
    learned.reset_tree_acceptance()
    assert float(learned.tree_acceptance_model().trials.sum()) == 0
    with pytest.raises(ValueError, match="tree_scores"):
        specoff.LLM(target, draft=draft, device="cpu", tree_scores="best")


MANY = PROMPTS + ["class Stack:", "for i in range(10):", "# a comment", "return x + 1", "a"]


@pytest.mark.parametrize("sigma, budget, rows", [(0.0, 8, 2), (0.3, 16, 3), (1.0, 4, 1),
                                                 (0.3, "auto", 2)])
def test_greedy_tree_refills_rows(sigma, budget, rows, pairs):
    """More prompts than rows: a finished row takes the next prompt, prefilled inside the
    next verification pass (one prefill pass in all, for the first rows); every prompt's
    output equals the target's own greedy output, whatever the lengths (EOS allowed)."""
    draft, target = pairs(sigma)
    params = specoff.SamplingParams(max_new_tokens=9)
    expect = [o.token_ids for o in specoff.LLM(target, device="cpu").generate(MANY, params)]
    llm = specoff.LLM(target, draft=draft, device="cpu", spec="tree", tree_budget=budget,
                      max_rows=rows)
    assert [o.token_ids for o in llm.generate(MANY, params)] == expect
    s = llm.last_stats
    assert s.rows_per_group == rows and s.prefill_passes == 1
    # Each pass serves `rows` rows: far fewer passes than prompts run one batch at a time.
    assert s.decode_passes < len(MANY) * params.max_new_tokens / rows
    if sigma == 0.0:
        assert s.tokens_per_pass > 3
    # steady state: the rounds with every row busy (not the tail, where rows fall idle)
    assert 0 < s.steady_tokens < s.tokens and 0 < s.steady_seconds


@pytest.mark.parametrize("budget, rows, slack, target", [(8, 3, 1.15, "off"), ("auto", 4, 1.15, "off"),
                                                          (16, 3, 0.3, "off"), (8, 3, 1.15, "on"),
                                                          (16, 3, 0.3, "on")])
def test_greedy_tree_with_the_draft_cache_in_row_segments(budget, rows, slack, target, pairs):
    """The draft's cache as a pool of row segments (SegmentKVCache), and the target's in the
    same segments (segment_target_cache): greedy output equals the target's own; a pool too
    small for the rows' mean need (slack 0.3) makes refills wait for a segment and still
    serves every prompt."""
    cache = CacheOptions(segment_draft_cache="on", segment_target_cache=target, draft_slack=slack)
    draft, target_dir = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=9)
    expect = [o.token_ids for o in specoff.LLM(target_dir, device="cpu").generate(MANY, params)]
    llm = specoff.LLM(target_dir, draft=draft, device="cpu", spec="tree", tree_budget=budget,
                      max_rows=rows, cache=cache)
    assert [o.token_ids for o in llm.generate(MANY * 2, params)] == expect * 2
    assert llm.last_stats.rows_per_group == rows
    assert (llm.last_stats.segment_waits > 0) == (slack < 1)  # a short pool makes refills wait
    sampled = llm.generate(MANY, specoff.SamplingParams(max_new_tokens=5, temperature=0.8,
                                                        seed=1, ignore_eos=True))
    assert all(len(o.token_ids) == 5 for o in sampled)


def test_draft_cache_slots_take_segments_where_they_are_smaller():
    """"auto": a segment pool where many rows' prompts differ in length (HumanEval-like:
    mean ~113 of at most 340), the dense cache for one row; the 24 GiB Mixtral 8x7B tree
    plan holds more rows with the pool."""
    from specoff import planner
    from specoff.bench.synthetic import MIXTRAL_8X7B

    def slots(rows, mode="auto"):
        return tree_scheduler.draft_cache_slots(rows, lengths, 32, 16,
                                                CacheOptions(segment_draft_cache=mode))

    lengths = [29 + (i * i * 7) % 97 + (i % 5 == 0) * (i * 13) % 214 for i in range(492)]
    assert max(lengths) <= 340 and 90 < sum(lengths) / len(lengths) < 140
    dense = 130 * (max(lengths) + 32 + 16 + 2)
    pool, segmented = slots(130)
    assert segmented and pool < 0.75 * dense
    assert slots(1) == (max(lengths) + 50, False)
    assert slots(1, "on")[1]
    assert slots(130, "off") == (dense, False)
    with pytest.raises(OptionsError, match="segment_draft_cache takes 'auto' or 'on' or 'off'"):
        specoff.options.EngineOptions.build(segment_draft_cache="maybe")
    target = specoff.ModelConfig.from_dict(MIXTRAL_8X7B)
    draft = specoff.ModelConfig.from_dict(dict(MIXTRAL_8X7B, model_type="mistral"))
    budget, bf16 = 24 * 2**30, torch.bfloat16
    weights = planner.plan_weights(target, bf16, budget, offload=None,
                                   reserve=planner.weight_reserve(target, bf16, budget, 256, draft))
    plan = lambda **kw: planner.plan_run(  # noqa: E731
        weights, target, bf16, rows=492, context=max(lengths) + 32 + 17, max_rows=256,
        tokens_per_row=16, prefill_tokens=max(lengths), draft=draft, max_logit_rows=512,
        kv_placement="host", **kw).rows_per_pass
    pooled = plan(draft_tokens=lambda r: slots(r)[0])
    assert pooled > 1.2 * plan()


@pytest.mark.parametrize("spec", ["tree", "chain", None])
def test_progress_counts_every_prompt(spec, pairs):
    """generate(progress=bar) advances the bar as prompts finish, speculative or not (the
    command line's tqdm bar)."""
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    draft, target = pairs(0.3)
    llm = specoff.LLM(target, draft=draft if spec else None, device="cpu", spec=spec, max_rows=3)
    bar = Bar()
    llm.generate(MANY, specoff.SamplingParams(max_new_tokens=5), progress=bar)
    assert bar.n == len(MANY)


@pytest.mark.parametrize("spec", ["tree", "chain"])
def test_plan_counts_the_draft_cache_the_run_allocates(spec, pairs):
    """The plan's cache bytes are the target's rows × context plus the draft's cache as the
    run allocates it (each scheduler's draft_cache_slots), pooled."""
    from specoff.planner import ModelSizes

    draft, target = pairs(0.3)
    cache = CacheOptions(segment_draft_cache="on")
    llm = specoff.LLM(target, draft=draft, device="cpu", spec=spec, max_rows=6, cache=cache)
    lengths = [3, 17, 5, 30, 2, 9, 11, 4]
    plan = llm.plan(len(lengths), max(lengths), 7, lengths)
    rows = plan.rows_per_pass
    extra = llm.tree_capacity_for(len(lengths))
    slots = (tree_scheduler.draft_cache_slots(rows, lengths, 7, extra, cache) if spec == "tree"
             else chain_scheduler.draft_cache_slots(rows, lengths, 7, cache))[0]
    target_kv = rows * (max(lengths) + 7 + plan.tokens_per_row + 1) * ModelSizes.of(
        llm.config, llm.dtype).kv_per_token
    draft_kv = slots * ModelSizes.of(llm.draft_config, llm.dtype).kv_per_token
    assert plan.gpu_bytes["kv_cache"] == target_kv + draft_kv


def test_tree_prefill_parts_hold_what_the_plan_counts(pairs, monkeypatch):
    """Tree mode prefills in the plan's chunk (prompt tokens a row a part), not the LLM's
    default: the first prompts', the refills' (target and draft) and no part over chunk ×
    rows tokens. (A 24 GiB run had prefilled 26k tokens in one part, 0.5 GiB over the
    budget, while the plan counted 10 a row.)"""
    from specoff.models import decoder, passes

    draft, target = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=5)
    expect = [o.token_ids for o in specoff.LLM(target, device="cpu").generate(MANY, params)]
    llm = specoff.LLM(target, draft=draft, device="cpu", spec="tree", tree_budget=4, max_rows=3)
    plan_of = llm.plan
    monkeypatch.setattr(llm, "plan", lambda *a, **k: dataclasses.replace(
        plan_of(*a, **k), prefill_chunk=2))
    sizes = []
    batch = passes.PrefillBatch

    class Spy(batch):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            sizes.append(max(p.input_ids.shape[1] for p in self.parts))

    monkeypatch.setattr(decoder, "PrefillBatch", Spy)
    monkeypatch.setattr(tree_scheduler, "PrefillBatch", Spy)
    assert [o.token_ids for o in llm.generate(MANY, params)] == expect
    assert len(sizes) > 3 and max(sizes) <= 2 * 3


def test_tree_refill_with_one_token_answers_and_sampling(pairs):
    """Answers of one token (each row frees right after its prompt's pass) and sampled
    output: every prompt is served, the right number of tokens each."""
    draft, target = pairs(0.3)
    llm = specoff.LLM(target, draft=draft, device="cpu", spec="tree", tree_budget=8, max_rows=2)
    one = llm.generate(MANY, specoff.SamplingParams(max_new_tokens=1, ignore_eos=True))
    plain = specoff.LLM(target, device="cpu").generate(
        MANY, specoff.SamplingParams(max_new_tokens=1, ignore_eos=True))
    assert [o.token_ids for o in one] == [o.token_ids for o in plain]
    sampled = llm.generate(MANY, specoff.SamplingParams(max_new_tokens=7, temperature=0.8,
                                                        seed=3, ignore_eos=True))
    assert all(len(o.token_ids) == 7 for o in sampled)


def test_spec_none_picks_tree_for_small_batches(pairs):
    draft, target = pairs(0.3)
    llm = specoff.LLM(target, draft=draft, device="cpu")
    assert llm.spec_mode(1) == "tree" and llm.spec_mode(64) == "chain"


@pytest.mark.parametrize("rows", [2000, 250])
def test_tree_sampling_is_lossless(rows, pairs, tmp_path):
    """Sampled tree output has the target's own distribution, with every prompt in one batch
    and with rows refilled from the queue (first tokens sampled from the refill's prefill)."""
    draft, target = without_tokenizers(pairs(0.5, vocab_size=12), tmp_path)
    n = 2000
    params = specoff.SamplingParams(max_new_tokens=3, temperature=1.0, top_k=6, seed=5,
                                    ignore_eos=True)
    prompts = [[3, 5, 7]] * n
    plain = specoff.LLM(target, device="cpu", max_rows=n).generate(prompts, params)
    tree = specoff.LLM(target, draft=draft, device="cpu", max_rows=rows, spec="tree", tree_budget=8)
    sampled = tree.generate(prompts, params)
    assert tree.last_stats.accepted > 0 and tree.last_stats.rows_per_group == rows
    assert same_distribution(plain, sampled) > 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("budget, kv", [(8, None), (64, None), ("auto", None), (64, "host")])
def test_gpu_tree_over_an_offloaded_target(budget, kv, pairs):
    draft, target = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=20, ignore_eos=True)
    expect = [o.token_ids for o in specoff.LLM(target, device="cuda", dtype="float32").generate(PROMPTS, params)]
    llm = specoff.LLM(target, draft=draft, device="cuda", dtype="float32", offload=True,
                      spec="tree", tree_budget=budget, kv_placement=kv)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expect
    assert llm.last_stats.plan["kv_on_gpu"] == (kv != "host")


@pytest.mark.gpu
@pytest.mark.parametrize("kv, overlap", [(None, False), ("host", False), (None, True),
                                         ("host", True)])
def test_gpu_tree_refills_rows_over_an_offloaded_target(kv, overlap, pairs):
    """Refills on the GPU: new prompts prefilled (packed) in the verification pass, into a
    device cache or one in pinned host memory; growth replayed as CUDA graphs; the draft's
    prefill of the new prompts after the pass or on its own stream under it."""
    draft, target = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=12)
    expect = [o.token_ids for o in specoff.LLM(target, device="cuda", dtype="float32").generate(MANY, params)]
    llm = specoff.LLM(target, draft=draft, device="cuda", dtype="float32", offload=True,
                      spec="tree", tree_budget=16, kv_placement=kv, max_rows=3,
                      draft_prefill_stream=overlap)
    assert [o.token_ids for o in llm.generate(MANY, params)] == expect
    assert llm.last_stats.prefill_passes == 1 and llm.last_stats.rows_per_group == 3


@pytest.mark.gpu
@pytest.mark.parametrize("segments, target", [("on", "off"), ("off", "off"), ("on", "on")])
def test_gpu_tree_draft_cache_in_row_segments(segments, target, pairs):
    """The draft's cache in row segments on the GPU: growth graphs and kernels read each
    row's own segment (verify_attention(row_start=)); the target's host cache in the same
    segments, streamed as a pool (models.host_cache.streamed_segments); greedy exact with refills."""
    cache = CacheOptions(segment_draft_cache=segments, segment_target_cache=target)
    draft, target = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=12)
    expect = [o.token_ids for o in specoff.LLM(target, device="cuda", dtype="float32").generate(MANY, params)]
    llm = specoff.LLM(target, draft=draft, device="cuda", dtype="float32", offload=True,
                      spec="tree", tree_budget=16, kv_placement="host", max_rows=4, cache=cache)
    assert [o.token_ids for o in llm.generate(MANY * 2, params)] == expect * 2


@pytest.mark.gpu
def test_gpu_spec_none_runs_trees_for_many_prompts_over_a_streamed_target(pairs):
    """spec=None with more prompts than an interactive batch, target streamed: tree mode
    with "auto" trees sized for the rows, the cache in host memory; greedy exact."""
    draft, target = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=10)
    expect = [o.token_ids for o in specoff.LLM(target, device="cuda", dtype="float32").generate(MANY, params)]
    llm = specoff.LLM(target, draft=draft, device="cuda", dtype="float32", offload=True,
                      kv_placement="host", max_rows=6)
    assert [o.token_ids for o in llm.generate(MANY, params)] == expect
    s = llm.last_stats
    assert s.rows_per_group == 6 and s.tree_budget in llm.tree_ladder(len(MANY))


def test_spec_none_picks_tree_where_the_target_streams(pairs):
    """Above the interactive batches spec=None picks tree mode where the target streams from
    host memory to a GPU (its pass is copy-bound), chain where chain settings were asked
    for; "auto" trees there shrink as rows grow (the plan sized for the largest)."""
    from specoff.planner import tree_budget_ladder
    from specoff.speculation.chain import MAX_DRAFT_LEN

    draft, target = pairs(0.3)
    llm = specoff.LLM(target, draft=draft, device="cpu", offload=True)
    spec = llm.options.spec
    assert llm.spec_mode(64) == "chain"  # on the CPU a pass costs its tokens
    llm.device = torch.device("cuda")  # the choice only: nothing runs
    assert llm.spec_mode(1) == llm.spec_mode(64) == "tree"
    llm.reconfigure(draft_len=4)
    assert llm.spec_mode(64) == "chain" and llm.spec_mode(spec.interactive_rows) == "tree"
    llm.reconfigure(draft_len=None, interleave=True)
    assert llm.spec_mode(64) == "chain"
    llm.device = torch.device("cpu")
    # auto trees keep a pass's tree tokens under tree_pass_tokens, down to 16 nodes a row
    assert llm.tree_ladder(spec.interactive_rows) == tree_budget_ladder(llm.tree_budget_max)
    llm.tree_budget_max = 1024
    tops = {rows: llm.tree_ladder(rows)[-1] for rows in (5, 8, 16, 64, 100, 128, 130, 500)}
    assert tops == {5: 512, 8: 256, 16: 128, 64: 32, 100: 32, 128: 16, 130: 16, 500: 16}
    assert all(rows * top < spec.tree_pass_tokens for rows, top in tops.items() if top > 16)
    assert llm.tree_ladder(130) == [spec.throughput_tree_budget] and llm.tree_ladder(64) == [16, 32]
    assert llm.plan(130, 10, 8).tokens_per_row == 1 + MAX_DRAFT_LEN  # chain: spec_mode(130)
    llm.reconfigure(spec="tree")
    assert llm.plan(130, 10, 8).tokens_per_row == spec.throughput_tree_budget
    assert llm.plan(8, 10, 8).tokens_per_row == 256
    assert llm.plan(2, 10, 8).tokens_per_row == 1024
    llm.reconfigure(tree_budget=8)
    assert llm.tree_ladder(64) == llm.tree_ladder(1) == [8]


def test_target_picks_in_chunks():
    """The target's picks over a tree pass, computed a few rows × nodes at a time: greedy
    the same as over all logits at once; sampled with top-k 1 too (every chunk written)."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=gen)
    head = torch.nn.Linear(16, 50)
    whole = head(h).argmax(-1)
    greedy = specoff.SamplingParams()
    for chunk in (1, 5, 21, 64):
        assert torch.equal(target_picks(head, h, greedy, None, chunk=chunk), whole)
    top1 = specoff.SamplingParams(temperature=0.7, top_k=1)
    assert torch.equal(target_picks(head, h, top1, torch.Generator().manual_seed(1), chunk=4), whole)
    sampled = target_picks(head, h, specoff.SamplingParams(temperature=1.0),
                           torch.Generator().manual_seed(2), chunk=4)
    assert sampled.shape == (3, 7) and int(sampled.min()) >= 0 and int(sampled.max()) < 50


def test_tree_prediction_counts_the_workloads_passes(pairs):
    """With a hardware profile, a tree run predicts its tokens/s over the passes tree_passes
    counts (first prefill, predicted pass plus measured growth each), refilled or one wave
    (whose slowest row sets its end, which the steady state alone overestimates by half)."""
    from specoff.planner import HardwareProfile

    draft, target = pairs(0.3)
    llm = specoff.LLM(target, draft=draft, device="cpu", spec="tree", tree_budget=8, max_rows=3)
    llm.profile = HardwareProfile("slow", copy_gbps=1.0, gemm_tflops=1e-3, moe_tflops=1e-3,
                                  hbm_gbps=10.0)
    prompts = MANY * 2
    llm.generate(prompts, specoff.SamplingParams(max_new_tokens=9, ignore_eos=True))
    s = llm.last_stats
    assert s.predicted_passes == tree_passes(len(prompts), 3, 9, s.accepted_histogram, llm.options.seed,
                                             request_histograms=s.request_histograms)
    assert len(s.request_histograms) == len(prompts)
    assert sum(map(sum, s.request_histograms)) == sum(s.accepted_histogram)
    grow = s.tree_curve[0]["grow_seconds"]
    seconds = s.plan["predicted_prefill_seconds"] + s.predicted_passes * (s.predicted_pass_seconds + grow)
    assert s.predicted_tokens_per_second == pytest.approx(len(prompts) * 9 / seconds)
    llm.generate(MANY[:3], specoff.SamplingParams(max_new_tokens=9, ignore_eos=True))
    s = llm.last_stats
    assert s.predicted_passes == tree_passes(3, 3, 9, s.accepted_histogram, llm.options.seed,
                                             request_histograms=s.request_histograms) >= 2


def test_tree_passes_counts_what_generate_tree_runs(pairs):
    """The workload model: simple schedules exactly, and the passes of real refilled runs
    from their own accepted histograms."""
    assert tree_passes(3, 4, 1, [1]) == 0  # the prefill pass gives every answer
    assert tree_passes(10, 4, 1, [1]) == 2  # 6 refills over 4 rows: two passes
    assert tree_passes(1, 1, 9, [0, 0, 0, 0, 1]) == 2  # 8 tokens at 5 a pass
    assert tree_passes(5, 1, 3, [1]) == 2 + 4 * 3  # a refill's first pass gives one token
    with pytest.raises(ValueError, match="histogram"):
        tree_passes(3, 2, 4, [])
    prompts = MANY * 3
    for sigma in (1.0, 0.3):
        draft, target = pairs(sigma)
        llm = specoff.LLM(target, draft=draft, device="cpu", spec="tree", tree_budget=8,
                          max_rows=3)
        llm.generate(prompts, specoff.SamplingParams(max_new_tokens=9, ignore_eos=True))
        s = llm.last_stats
        model = sum(tree_passes(len(prompts), 3, 9, s.accepted_histogram, seed)
                    for seed in range(5)) / 5
        # Draws from one histogram: exact where acceptance is alike across prompts (σ=1, as
        # on the real-size pair); the tiny pair at σ=0.3 accepts far more on some prompts
        # than others, and the slow prompts' extra passes are what an i.i.d. model misses.
        assert abs(model - s.decode_passes) <= (2 if sigma == 1.0 else 0.15 * s.decode_passes)
        # Each prompt at its own request's pace (measured 54 passes at σ=0.3: 50.6 against
        # the pooled 49.0): no further off than the pooled model.
        rows_model = sum(tree_passes(len(prompts), 3, 9, s.accepted_histogram, seed,
                                     request_histograms=s.request_histograms)
                         for seed in range(5)) / 5
        assert abs(rows_model - s.decode_passes) <= abs(model - s.decode_passes) + 1


def test_tree_passes_keeps_slow_requests_slow():
    """One wave where a few requests accept nothing: drawn from the pooled histogram every row
    finishes in about the fast rows' passes; each row at its own request's pace, the slow
    ones set the end (a token a pass: 31 passes for 32 tokens), as a real run's slow rows do."""
    fast, slow = [0, 0, 0, 1], [1]  # 4 tokens a pass, 1 token a pass
    per_request = [fast] * 160 + [slow] * 4
    pooled = [4, 0, 0, 160]
    assert tree_passes(164, 164, 32, pooled) <= 10
    assert tree_passes(164, 164, 32, pooled, request_histograms=per_request) == 31
    # refilled: the slow requests come back in every round of the shuffled order
    assert tree_passes(328, 164, 32, pooled, request_histograms=per_request) >= 31
    # a request's histogram gives its pace, not fresh luck: 164 requests that each took 13
    # passes at 2.5 tokens a pass (31 tokens after the prefill's) take 13, where drawing each
    # pass from [1, 0, 0, 1] again would leave the unluckiest of 164 rows well past it
    assert tree_passes(164, 164, 32, [1, 0, 0, 1], request_histograms=[[1, 0, 0, 1]] * 164) == 13
    assert tree_passes(164, 164, 32, [1, 0, 0, 1]) > 13


def test_planner_runs_the_target_alone_where_it_outserves_speculation(pairs):
    """generate(speculate=None) with spec=None and a hardware profile: speculation unless the
    target alone's plan serves more tokens a second (prior_tokens_per_pass tokens a row a
    pass for speculation), the reason in last_stats; spec set, speculate=True, a batch of at
    most interactive_rows or no profile keep speculating. Outputs equal the target's either way."""
    from specoff.planner import HardwareProfile

    draft, target = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=6, ignore_eos=True)
    expect = [o.token_ids for o in specoff.LLM(target, device="cpu").generate(MANY, params)]
    # Passes bound by reading the weights (as a streamed target's are by the copy): a
    # speculative pass costs about what a plain one does.
    profile = HardwareProfile("weight-bound", copy_gbps=1.0, gemm_tflops=1e3, moe_tflops=1e3,
                              hbm_gbps=0.01)
    llm = specoff.LLM(target, draft=draft, device="cpu", max_rows=4)
    assert [o.token_ids for o in llm.generate(MANY, params)] == expect
    assert llm.last_stats.speculated and llm.last_stats.speculation_note is None  # no profile

    llm.profile = profile
    llm._spec_tokens_per_pass = None  # the prior, not the first call's figure
    assert [o.token_ids for o in llm.generate(MANY, params)] == expect
    assert llm.last_stats.speculated, llm.last_stats.speculation_note
    # A speculative pass worth a tenth of a token a row: the target alone serves more.
    llm.reconfigure(prior_tokens_per_pass=0.1)
    llm._spec_tokens_per_pass = None
    assert [o.token_ids for o in llm.generate(MANY, params)] == expect
    s = llm.last_stats
    assert not s.speculated and s.speculation_note.startswith("the target alone")
    assert s.accepted_histogram is None and s.tokens == len(MANY) * 6
    assert llm.generate(MANY, params, speculate=True) and llm.last_stats.speculated
    assert llm.generate(MANY[:4], params) and llm.last_stats.speculated  # interactive batch
    llm._spec_tokens_per_pass = None
    llm.reconfigure(spec="chain")  # asked for: the planner does not overrule it
    assert llm.generate(MANY, params) and llm.last_stats.speculated
    llm.reconfigure(spec=None, draft_len=3)  # chain settings asked for: the same
    assert llm.generate(MANY, params) and llm.last_stats.speculated
    llm.reconfigure(draft_len=None)
    # The last speculative call's tokens a row a pass replace the prior.
    llm._spec_tokens_per_pass = 10.0
    assert llm.generate(MANY, params) and llm.last_stats.speculated
