"""Chain speculation: exact greedy output, lossless sampling, refill, tokenizer checks."""
import json
import shutil

import pytest
import torch
from scipy.stats import chisquare

import specoff
from conftest import same_distribution, without_tokenizers
from specoff.options import CacheOptions, OptionsError
from specoff.planner import expected_tokens_per_pass
from specoff.speculation import chain_scheduler
from specoff.speculation.chain import (chain_passes, choose_draft_len, emitted_tokens, greedy_accept,
                                       sample_accept)
from specoff.kvcache import SegmentKVCache
from specoff.bench.synthetic import make_tiny_checkpoint, make_tokenizer

PROMPTS = ["def fibonacci(n):", "Beautiful is better than", "x", "import os\nimport sys\n",
           "class Stack:", "    return", "Errors should never", "y = [i * i for i in"]


def target_only(target, params, prompts=PROMPTS, **kw):
    return [o.token_ids for o in specoff.LLM(target, device="cpu", **kw).generate(prompts, params)]


# -- acceptance rules, by hand ------------------------------------------------------------------

def test_greedy_accept_by_hand():
    logits = torch.full((3, 4, 10), -1.0)
    argmax = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4], [9, 9, 9, 9]])
    logits.scatter_(2, argmax[..., None], 1.0)
    draft = torch.tensor([[5, 6, 7], [1, 0, 3], [0, 9, 9]])
    accepted, nxt = greedy_accept(draft, logits)
    assert accepted.tolist() == [3, 1, 0] and nxt.tolist() == [8, 2, 9]
    out = emitted_tokens(draft, accepted, nxt)
    assert out[0].tolist() == [5, 6, 7, 8] and out[1, :2].tolist() == [1, 2] and out[2, 0] == 9


def expected(p, total):
    p = p.double().numpy()
    return p / p.sum() * total


def test_sample_accept_is_exact():
    """First emitted token ~ p0 whatever q is; after accepting d1, the next ~ p1."""
    g = torch.Generator().manual_seed(0)
    V, B, gamma = 6, 60000, 2
    p = torch.softmax(torch.randn(gamma + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(gamma, V, generator=g) * 1.5, -1)
    draft = torch.stack([torch.multinomial(q[i], B, replacement=True, generator=g) for i in range(gamma)], 1)
    accepted, nxt = sample_accept(draft, q.expand(B, -1, -1), p.expand(B, -1, -1), g)
    out = emitted_tokens(draft, accepted, nxt)
    first = torch.bincount(out[:, 0], minlength=V).numpy()
    assert chisquare(first, expected(p[0], first.sum())).pvalue > 0.01
    went_on = accepted >= 1
    second = torch.bincount(out[went_on, 1], minlength=V).numpy()
    assert chisquare(second, expected(p[1], second.sum())).pvalue > 0.01
    assert 0 < went_on.float().mean() < 1  # both branches exercised


def test_expected_tokens_and_draft_length():
    assert expected_tokens_per_pass(0.0, 4) == 1.0
    assert expected_tokens_per_pass(1.0, 4) == 5.0
    assert abs(expected_tokens_per_pass(0.7, 4) - (1 - 0.7 ** 5) / 0.3) < 1e-12
    # a draft that hides under the pass: draft as long as it stays hidden and still pays
    assert choose_draft_len(0.9, 1.0, 0.01, interleaved=True) == 8
    assert choose_draft_len(0.2, 1.0, 0.01, interleaved=True) >= 1
    # serial and a slow draft: short drafts
    assert choose_draft_len(0.7, 1.0, 0.5, interleaved=False) <= 2


def record_pipelines(monkeypatch) -> list:
    """Every ChainScheduler built from here on, to look at its caches after a run."""
    made, init = [], chain_scheduler.ChainScheduler.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(chain_scheduler.ChainScheduler, "__init__", recording)
    return made


# -- end to end ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma, draft_len, interleave", [
    (0.0, 4, True), (0.3, 3, True), (0.3, None, False), (1.0, 2, True)])
def test_greedy_speculation_equals_target(sigma, draft_len, interleave, pairs):
    draft, target = pairs(sigma)
    params = specoff.SamplingParams(max_new_tokens=24, ignore_eos=True)
    expect = target_only(target, params)
    llm = specoff.LLM(target, draft=draft, device="cpu", max_rows=4, draft_len=draft_len,
                      interleave=interleave)  # 8 prompts through 4 rows: refills
    got = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert got == expect
    s = llm.last_stats
    assert s.tokens == 8 * 24 and s.groups == (2 if interleave else 1)
    assert s.tail_merges == (1 if interleave else 0)  # the last rows finish in one group
    if sigma == 0.0:
        assert s.acceptance_rate > 0.95 and s.tokens_per_pass > 4
    if sigma == 1.0:
        assert s.acceptance_rate < 0.5
    assert s.tokens_per_pass == pytest.approx((s.accepted + s.row_passes) / s.row_passes)
    # steady state: the passes with every row busy (the first wave and refills), not the tail
    assert 0 < s.steady_tokens <= s.tokens and 0 < s.steady_seconds <= s.decode_seconds
    assert s.steady_tokens_per_second == s.steady_tokens / s.steady_seconds
    # the planner's model of this workload's passes, at the α the run measured
    assert abs(s.predicted_passes - s.decode_passes) <= max(2, 0.2 * s.decode_passes)


@pytest.mark.parametrize("interleave, slack, sampled, target_segments", [
    (True, 1.15, False, "off"), (False, 0.3, False, "off"), (True, 0.3, True, "off"),
    (True, 1.15, False, "on"), (True, 0.3, False, "on"), (False, 0.3, False, "on")])
def test_chain_with_the_draft_cache_in_row_segments(interleave, slack, sampled, target_segments,
                                                    pairs, monkeypatch):
    """The draft's cache as row segments of one pool shared by the groups (SegmentKVCache),
    and the target's in segments of a pool per group (segment_target_cache): greedy output
    equals the target's own, with refills (waiting for room when the pools are short: slack
    0.3) and the two groups merged at the tail by handing the draft's segments over and
    moving the target's into the merged group's pool; sampled runs finish every prompt."""
    made = record_pipelines(monkeypatch)
    cache = CacheOptions(segment_draft_cache="on", segment_target_cache=target_segments,
                         draft_slack=slack, target_slack=slack)
    draft, target = pairs(0.3)
    prompts = PROMPTS + [[5] * 23, [7, 9], [11] * 17]
    llm = specoff.LLM(target, draft=draft, device="cpu", max_rows=4, draft_len=3,
                      interleave=interleave, cache=cache)
    if sampled:
        out = llm.generate(prompts, specoff.SamplingParams(max_new_tokens=9, temperature=0.9,
                                                           seed=2, ignore_eos=True))
        assert all(len(o.token_ids) == 9 for o in out)
        return
    params = specoff.SamplingParams(max_new_tokens=12, ignore_eos=True)
    expect = [o.token_ids for o in specoff.LLM(target, device="cpu").generate(prompts, params)]
    assert [o.token_ids for o in llm.generate(prompts, params)] == expect
    s = llm.last_stats
    assert s.groups == (2 if interleave else 1) and s.tail_merges == (1 if interleave else 0)
    assert (s.segment_waits > 0) == (slack < 1)  # a short pool makes refills wait
    caches = [g.target_cache for g in made[-1].groups]
    assert all(isinstance(c, SegmentKVCache) == (target_segments == "on") for c in caches)


def test_chain_plan_counts_the_segment_pool():
    """The chain plan's draft cache is the pool ChainScheduler allocates."""
    lengths, gamma = [3, 40, 5, 7, 9, 2, 60, 4], chain_scheduler.MAX_DRAFT_LEN
    off = CacheOptions(segment_draft_cache="off")
    assert chain_scheduler.draft_cache_slots(4, lengths, 8, off) == (4 * (60 + 8 + gamma + 2), False)
    pool, segmented = chain_scheduler.draft_cache_slots(64, lengths * 8, 8, CacheOptions())
    assert segmented and pool < 64 * (60 + 8 + gamma + 2)


@pytest.mark.parametrize("interleave", [False, True])
def test_new_prompts_are_verified_in_their_first_pass(interleave, pairs):
    """A prompt's first target pass prefills it with its drafts appended and verifies them:
    with a draft the target always agrees with, γ+1 tokens from that pass on; one-token
    prompts (nothing for the draft to cache before its first step) included."""
    draft, target = pairs(0.0)
    prompts = [[7], [3, 9, 12, 40], [11, 5], [8] * 9, [21], [30, 31, 32]]
    params = specoff.SamplingParams(max_new_tokens=5, ignore_eos=True)
    expect = target_only(target, params, prompts)
    rows = 3 if interleave else 2  # per group: six prompts need three rounds of each group
    llm = specoff.LLM(target, draft=draft, device="cpu", max_rows=2 * rows if interleave else rows,
                      draft_len=4, interleave=interleave)
    assert [o.token_ids for o in llm.generate(prompts, params)] == expect
    s = llm.last_stats
    assert s.acceptance_rate == 1.0
    assert s.decode_passes == (2 if interleave else 3)  # every prompt done in one pass


@pytest.mark.parametrize("sampled", [False, True])
def test_joint_tail_passes_verify_both_groups(sampled, pairs):
    """SpecOptions.joint_tail: once no prompt waits, each pass verifies both groups' rows (a
    part each), their drafts run before it; greedy output stays the target's, and the run
    takes no more passes than with a pass per group; chain_passes models it."""
    draft, target = pairs(0.3)
    params = (specoff.SamplingParams(max_new_tokens=20, temperature=0.8, seed=5, ignore_eos=True)
              if sampled else specoff.SamplingParams(max_new_tokens=20, ignore_eos=True))
    prompts = PROMPTS + PROMPTS[:4]  # 12 prompts through 2 × 3 rows
    expect = None if sampled else target_only(target, params, prompts)
    passes = {}
    for joint in ("off", "on"):
        llm = specoff.LLM(target, draft=draft, device="cpu", max_rows=6, draft_len=3,
                          interleave=True, joint_tail=joint)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        s = llm.last_stats
        assert len(got) == 12 and all(len(t) == 20 for t in got)
        if expect is not None:
            assert got == expect
        assert s.groups == 2 and (s.joint_passes > 0) == (joint == "on")
        # the draft time no pass hid, by the kind of pass it was timed with (all of it here,
        # off a GPU): the first, the groups' turns, the joint tail, one group after the merge
        exposed = s.draft_exposed_seconds
        assert {"first", "interleaved"} <= set(exposed) <= {"first", "interleaved", "joint", "serial"}
        assert ("joint" in exposed) == (joint == "on")
        assert sum(exposed.values()) <= s.draft_seconds + 1e-9
        assert abs(s.predicted_passes - s.decode_passes) <= max(2, 0.2 * s.decode_passes)
        passes[joint] = s.decode_passes
    if not sampled:  # the same acceptance row by row: only the schedule differs
        assert passes["on"] < passes["off"]
    with pytest.raises(OptionsError, match="joint_tail takes 'auto' or 'on' or 'off'"):
        specoff.LLM(target, draft=draft, device="cpu", max_rows=6, interleave=True,
                    joint_tail="sometimes")


def test_chain_passes_counts_refills_and_the_tail():
    assert chain_passes(4, 4, 1, 32, 0.0, 4) == 32  # one token a pass
    # γ+1 a pass from the first (the prompt is prefilled with its drafts): ⌈32 / 5⌉
    assert chain_passes(4, 4, 1, 32, 1.0, 4) == 7
    assert chain_passes(8, 4, 2, 32, 1.0, 4) == 2 * 7  # 7 rounds a group
    # 2 rows, 4 prompts of 6 tokens: 5 + 1 tokens, then the refills' 5 + 1
    assert chain_passes(4, 2, 1, 6, 1.0, 4) == 4
    # a finite workload pays more than the steady state's N·M / (R·E) passes
    steady = 492 * 32 / (144 * expected_tokens_per_pass(0.7, 4))
    assert steady < chain_passes(492, 144, 1, 32, 0.7, 4) < 1.5 * steady
    assert chain_passes(492, 144, 1, 32, 0.7, 4) == chain_passes(492, 144, 1, 32, 0.7, 4, seed=0)
    # two groups at the tail: a pass for both instead of one each
    two = chain_passes(492, 123, 2, 32, 0.7, 4)
    assert chain_passes(492, 123, 2, 32, 0.7, 4, joint=True) < two
    # 2 groups of 2 rows, 4 prompts of 6 tokens, all accepted: each group's first pass (5
    # tokens), then the last token a pass each, or in one joint pass
    assert chain_passes(4, 2, 2, 6, 1.0, 4) == 4 and chain_passes(4, 2, 2, 6, 1.0, 4, joint=True) == 3


def test_unrelated_draft_and_eos(pairs, tokenizer, tmp_path):
    _, target = pairs(0.3)
    draft = make_tiny_checkpoint("llama", tmp_path / "other", seed=7, tokenizer=tokenizer,
                                 layers=1, dim=32, heads=2, kv_heads=1)
    params = specoff.SamplingParams(max_new_tokens=30)  # EOS ends rows early
    expect = target_only(target, params)
    llm = specoff.LLM(target, draft=draft, device="cpu", max_rows=3, draft_len=3)
    outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == expect
    assert llm.last_stats.acceptance_rate < 0.3
    assert llm.last_stats.tokens == sum(len(t) for t in expect)


@pytest.mark.parametrize("pieces", [1, 2])
def test_speculation_over_an_offloaded_target(pairs, pieces):
    draft, target = pairs(0.3, family="qwen3", layers=4)
    params = specoff.SamplingParams(max_new_tokens=16, ignore_eos=True)
    expect = target_only(target, params)
    llm = specoff.LLM(target, draft=draft, device="cpu", offload=True, ring_slots=2, max_rows=4,
                      draft_len=3, ring_pieces=pieces)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expect
    s = llm.last_stats
    layer_bytes = llm.model.ring.unit_numel * 4  # every streamed element, once a pass
    assert s.bytes_streamed == layer_bytes * llm.config.n_layers * s.decode_passes


def test_sampling_is_lossless(pairs, tmp_path):
    """Joint distribution of the first three generated tokens, with and without a draft."""
    draft, target = without_tokenizers(pairs(0.5, vocab_size=12), tmp_path)
    n = 3000
    params = specoff.SamplingParams(max_new_tokens=3, temperature=1.0, top_p=0.9, seed=11,
                                    ignore_eos=True)
    prompts = [[3, 5, 7]] * n
    plain = specoff.LLM(target, device="cpu", max_rows=n).generate(prompts, params)
    spec = specoff.LLM(target, draft=draft, device="cpu", max_rows=n, draft_len=2)
    sampled = spec.generate(prompts, params)
    assert 0.2 < spec.last_stats.acceptance_rate < 0.95

    assert same_distribution(plain, sampled) > 0.01


def test_tokenizer_mismatch_is_refused_before_loading(pairs, tmp_path, monkeypatch):
    _, target = pairs(0.3)
    other = tmp_path / "other"
    shutil.copytree(target, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["Ġreturn"], vocab["Ġself"] = vocab["Ġself"], vocab["Ġreturn"]  # two tokens swap ids
    (other / "tokenizer.json").write_text(json.dumps(spec))
    monkeypatch.setattr(specoff.engine, "load_model", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(ValueError, match=r"the target and draft tokenizers differ: token '(Ġreturn|Ġself)' "
                                         r"is id \d+ in the draft but id \d+ in the target"):
        specoff.LLM(target, draft=other, device="cpu")


@pytest.mark.parametrize("draft_vocab", ["padded", "prefix"])
def test_draft_vocabulary_padded_or_a_prefix(draft_vocab, pairs, tokenizer, tmp_path):
    """A draft whose embeddings are padded past the tokenizer, or whose tokenizer is a prefix
    of the target's (fewer BPE merges, same ids)."""
    _, target = pairs(0.3)
    if draft_vocab == "padded":
        draft = make_tiny_checkpoint("mistral", tmp_path / "d", tokenizer=tokenizer,
                                     vocab_size=len(tokenizer) + 64)
    else:
        draft = make_tiny_checkpoint("mistral", tmp_path / "d", tokenizer=make_tokenizer(320))
    params = specoff.SamplingParams(max_new_tokens=12, ignore_eos=True)
    llm = specoff.LLM(target, draft=draft, device="cpu", max_rows=8, draft_len=2)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == target_only(target, params)


@pytest.mark.parametrize("kw, message", [
    (dict(spec="tree", tree_budget=0), "tree_budget must be between"), (dict(spec="beam"), "spec.mode takes 'chain' or 'tree' or None, not 'beam'"),
    (dict(draft_len=9), "draft_len must be between 1 and 8")])
def test_bad_speculation_arguments(kw, message, pairs):
    draft, target = pairs(0.3)
    with pytest.raises((ValueError, NotImplementedError), match=message):
        specoff.LLM(target, draft=draft, device="cpu", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("interleave, segments, kv, joint", [
    (True, "off", None, "off"), (False, "off", None, "off"), (True, "on", None, "off"),
    (False, "on", None, "off"), (True, "on", "host", "off"), (False, "on", "host", "off"),
    (True, "off", None, "on"), (True, "on", "host", "on")])
def test_gpu_speculation_equals_target(interleave, segments, kv, joint, pairs, monkeypatch):
    """On the GPU (draft steps replayed as CUDA graphs), with the draft's cache dense or in
    row segments (the kernels' row offsets inside the graphs); with the target's cache in
    pinned host memory, in segments of a pool per group streamed each pass; with the two
    groups verified in one pass at the tail (joint_tail); segment_target_cache "auto": in
    segments where kv is "host"."""
    made = record_pipelines(monkeypatch)
    draft, target = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=24, ignore_eos=True)
    expect = [o.token_ids for o in specoff.LLM(target, device="cuda", dtype="float32").generate(PROMPTS, params)]
    llm = specoff.LLM(target, draft=draft, device="cuda", dtype="float32", offload=True,
                      max_rows=4, draft_len=3, interleave=interleave, kv_placement=kv,
                      joint_tail=joint, cache=CacheOptions(segment_draft_cache=segments))
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expect
    hidden = llm.last_stats.draft_hidden_fraction  # device-time overlap with the target's passes
    assert (0.0 <= hidden <= 1.0) if interleave else hidden == 0.0
    s = llm.last_stats  # the rest of the draft's time, by the kind of pass it was timed with
    assert set(s.draft_exposed_seconds) <= {"first", "interleaved", "joint", "serial"}
    assert sum(s.draft_exposed_seconds.values()) == pytest.approx(
        s.draft_seconds - s.draft_hidden_seconds, rel=1e-6, abs=1e-9)
    if kv == "host":
        assert all(isinstance(g.target_cache, SegmentKVCache) for g in made[-1].groups)
    assert (llm.last_stats.joint_passes > 0) == (joint == "on")


def test_in_memory_upcycled_pair():
    """The in-memory pair (as built at full size for benchmarks): σ = 0 accepts everything."""
    from specoff.bench.synthetic import upcycled_pair

    base = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, rope_theta=1e4, rms_norm_eps=1e-5)
    draft_cfg = specoff.ModelConfig.from_dict(dict(base, model_type="mistral"))
    target_cfg = specoff.ModelConfig.from_dict(dict(base, model_type="mixtral", num_local_experts=4,
                                                    num_experts_per_tok=2))
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    params = specoff.SamplingParams(max_new_tokens=10, ignore_eos=True)
    rates = {}
    for sigma in (0.0, 0.5):
        draft, target = upcycled_pair(draft_cfg, target_cfg, sigma, device="cpu", std=0.2)
        llm = specoff.LLM(target, draft=draft, device="cpu", draft_len=3, offload=True, spec="chain")
        got = [o.token_ids for o in llm.generate(prompts, params)]
        plain = specoff.LLM(target, device="cpu")
        assert got == [o.token_ids for o in plain.generate(prompts, params)]
        rates[sigma] = llm.last_stats.acceptance_rate
        assert torch.equal(llm.model.layers[1].attention.wqkv.weight,
                           llm.draft_model.layers[1].attention.wqkv.weight)
    assert rates[0.0] > 0.95 and rates[0.5] < rates[0.0]
    with pytest.raises(ValueError, match="needs equal dim"):
        upcycled_pair(specoff.ModelConfig.from_dict(dict(base, model_type="mistral", hidden_size=32)),
                      target_cfg, 0.1)


def test_token_acceptance_counts_only_the_first_rejection():
    """α per position (E(α, γ)'s): drafts after a row's first rejection are never judged."""
    from specoff.outputs import GenerationStats

    s = GenerationStats()
    s.count_verified(4, 4)  # all kept
    s.count_verified(4, 1)  # one kept, then a rejection
    s.count_verified(4, 0)  # rejected at once
    s.finalize()
    assert s.acceptance_rate == 5 / 12 and s.token_acceptance == 5 / 7
    assert s.accepted_histogram == [1, 1, 0, 0, 1] and s.tokens_per_pass == 8 / 3


def test_chain_prediction_counts_the_drafts_prefill(pairs):
    """The planner's figure for a chain run: the workload's passes, each costing the predicted
    pass plus (one group) the draft's round: its γ+1 steps and its share of prefilling the
    new prompts, predicted from its FLOPs (a profile set by hand: the CPU has none)."""
    from specoff.planner import HardwareProfile, predict_draft_prefill

    draft, target = pairs(0.3)
    prompts = [[5, 6, 7, 8], [9, 10], [11] * 7, [12, 13, 14], [15], [16, 17, 18, 19, 20]]
    params = specoff.SamplingParams(max_new_tokens=6, ignore_eos=True)
    llm = specoff.LLM(target, draft=draft, device="cpu", max_rows=2, draft_len=3, interleave=False)
    llm.profile = profile = HardwareProfile("slow", copy_gbps=1.0, gemm_tflops=1e-4, moe_tflops=1e-4,
                                            hbm_gbps=1.0)
    llm.generate(prompts, params)
    s = llm.last_stats
    prefill = predict_draft_prefill(llm.draft_config, llm.dtype, profile, sum(len(p) - 1 for p in prompts),
                                    parts=s.predicted_passes) / s.predicted_passes
    assert prefill > 0 and s.predicted_draft_seconds > prefill
    assert s.predicted_tokens_per_second == pytest.approx(
        len(prompts) * 6 / (s.predicted_passes * (s.predicted_pass_seconds + s.predicted_draft_seconds)))


def test_a_run_without_speculation_plans_the_target_alone(pairs):
    """generate(speculate=False) beside a loaded draft: the plan is the target's (a token a
    row a pass, no draft cache), the draft's weights still counted; the tokens the target's."""
    draft, target = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=6)
    prompts = ["def add(a, b):", "Once upon a time", "import numpy as np"]
    expect = [o.token_ids for o in specoff.LLM(target, device="cpu").generate(prompts, params)]
    llm = specoff.LLM(target, draft=draft, device="cpu")
    assert [o.token_ids for o in llm.generate(prompts, params, speculate=False)] == expect
    plain, spec = llm.last_stats.plan, llm.plan(3, 4, 6, [4, 4, 3]).to_dict()
    assert plain["tokens_per_row"] == 1 and spec["tokens_per_row"] > 1
    assert plain["gpu_bytes"].get("draft_weights") == spec["gpu_bytes"].get("draft_weights")
    assert llm.last_stats.proposed == 0


def test_a_speculative_run_reports_the_plain_prediction(pairs):
    """With a hardware profile, a speculative run over a queue also gets the planner's figure
    for the target alone batching the same prompts (what the command line compares)."""
    from specoff.planner import HardwareProfile

    draft, target = pairs(0.3)
    llm = specoff.LLM(target, draft=draft, device="cpu", spec="tree", tree_budget=4, max_rows=3)
    llm.profile = HardwareProfile("test", copy_gbps=10.0, gemm_tflops=1.0, moe_tflops=1.0,
                                  hbm_gbps=100.0)
    prompts = ["def add(a, b):", "Once upon a time", "import numpy as np", "x = [1, 2, 3]",
               "class Stack:", "# a comment"]
    llm.generate(prompts, specoff.SamplingParams(max_new_tokens=5, ignore_eos=True))
    s = llm.last_stats
    lengths = [len(p) for p in llm.encode(prompts)]
    plain = llm.plan(6, max(lengths), 5, lengths, speculate=False)
    batches = -(-6 // plain.rows_per_pass)
    expect = 30 / (batches * (plain.predicted_prefill_seconds + 4 * plain.predicted_pass_seconds))
    assert s.predicted_plain_tokens_per_second == pytest.approx(expect)
    llm.generate(prompts[:2], specoff.SamplingParams(max_new_tokens=5))  # an interactive batch
    assert llm.last_stats.predicted_plain_tokens_per_second is None
