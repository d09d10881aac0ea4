"""SpecExec tree mode: hand-built trees, tree attention, exact greedy and sampled output."""
import pytest
import torch

import specoff
from conftest import same_distribution, without_tokenizers
from specoff.kvcache import KVCache
from specoff.spec.tree import Tree, accept, commit, tree_part

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


@pytest.mark.parametrize("sigma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("budget", [1, 8, 64])
def test_greedy_tree_equals_target(sigma, budget, pairs):
    draft, target = pairs(sigma)
    params = specoff.SamplingParams(max_new_tokens=20)
    expect = [o.token_ids for o in specoff.LLM(target, device="cpu").generate(PROMPTS, params)]
    llm = specoff.LLM(target, draft=draft, device="cpu", spec="tree", tree_budget=budget)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expect
    s = llm.last_stats
    if budget > 1:
        assert s.tokens_per_pass >= 1 and s.tree_budget == budget
    if sigma == 0.0 and budget == 64:
        assert s.tokens_per_pass > 2.5


def test_spec_none_picks_tree_for_small_batches(pairs):
    draft, target = pairs(0.3)
    llm = specoff.LLM(target, draft=draft, device="cpu")
    assert llm.spec_mode(1) == "tree" and llm.spec_mode(64) == "chain"


def test_tree_sampling_is_lossless(pairs, tmp_path):
    draft, target = without_tokenizers(pairs(0.5, vocab_size=12), tmp_path)
    n = 2000
    params = specoff.SamplingParams(max_new_tokens=3, temperature=1.0, top_k=6, seed=5,
                                    ignore_eos=True)
    prompts = [[3, 5, 7]] * n
    plain = specoff.LLM(target, device="cpu", max_rows=n).generate(prompts, params)
    tree = specoff.LLM(target, draft=draft, device="cpu", max_rows=n, spec="tree", tree_budget=8)
    sampled = tree.generate(prompts, params)
    assert tree.last_stats.accepted > 0
    assert same_distribution(plain, sampled) > 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [8, 64])
def test_gpu_tree_over_an_offloaded_target(budget, pairs):
    draft, target = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=20, ignore_eos=True)
    expect = [o.token_ids for o in specoff.LLM(target, device="cuda", dtype="float32").generate(PROMPTS, params)]
    llm = specoff.LLM(target, draft=draft, device="cuda", dtype="float32", offload=True,
                      spec="tree", tree_budget=budget)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expect
