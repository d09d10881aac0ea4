"""Planner v1: plans within the budget, the too-small error, the profile cache."""
import json

import pytest
import torch

from specoff import planner
from specoff.config import ModelConfig
from specoff.planner import BudgetError, GiB, HardwareProfile, ModelSizes, parse_bytes

MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                    rope_theta=1e6)
QWEN3_30B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                 moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                 max_position_embeddings=40960)
LLAMA_70B = dict(model_type="llama", vocab_size=128256, hidden_size=8192, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                 max_position_embeddings=131072)
PROFILE = HardwareProfile("test-gpu", copy_gbps=55.4, gemm_tflops=700, moe_tflops=350, hbm_gbps=4000)


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * GiB and parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes(1000) == 1000
    with pytest.raises(ValueError, match="cannot read a memory size"):
        parse_bytes("lots")


def test_mixtral_sizes_match_the_published_parameter_count():
    sizes = ModelSizes.of(ModelConfig.from_dict(MIXTRAL_8X7B), torch.bfloat16)
    assert abs(sizes.total / 2 / 1e9 - 46.7) < 0.1  # Mixtral 8x7B: 46.7 B parameters
    assert abs(32 * sizes.layer_ffn / 1e9 - 90.2) < 0.1  # docs/design.md: 90.2 GB of experts


@pytest.mark.parametrize("hf", [MIXTRAL_8X7B, QWEN3_30B, LLAMA_70B], ids=["mixtral", "qwen3moe", "llama70b"])
@pytest.mark.parametrize("budget_gib", [8, 12, 16, 24, 48, 80])
@pytest.mark.parametrize("rows, prompt", [(1, 128), (64, 512), (256, 128)])
def test_plans_respect_the_budget(hf, budget_gib, rows, prompt):
    cfg = ModelConfig.from_dict(hf)
    budget = budget_gib * GiB
    try:
        weights = planner.plan_weights(cfg, torch.bfloat16, budget, offload=None, reserve=budget // 4)
        plan = planner.plan_run(weights, cfg, torch.bfloat16, rows=rows, context=prompt + 32,
                                max_rows=256, prefill_tokens=prompt, profile=PROFILE)
    except BudgetError as e:
        assert "too small" in str(e) or "too little" in str(e)
        return
    assert plan.planned_gpu_bytes + planner.CONTEXT_MARGIN <= budget
    sizes = ModelSizes.of(cfg, torch.bfloat16)
    assert plan.offload == (sizes.total > budget)
    if plan.offload:
        assert plan.ring_slots >= 2
        stream_copy = plan.stream_bytes_per_pass / (PROFILE.copy_gbps * 1e9)
        assert plan.predicted_pass_seconds >= stream_copy  # never faster than the copy
        assert 1 <= plan.rows_per_pass <= rows


def test_mixtral_under_24gib_streams_the_experts_at_copy_speed():
    cfg = ModelConfig.from_dict(MIXTRAL_8X7B)
    weights = planner.plan_weights(cfg, torch.bfloat16, 24 * GiB, offload=None, reserve=6 * GiB)
    plan = planner.plan_run(weights, cfg, torch.bfloat16, rows=256, context=160, max_rows=256,
                            prefill_tokens=128, profile=PROFILE)
    assert plan.offload and plan.resident_attention and plan.kv_on_gpu and plan.rows_per_pass == 256
    # One-expert ring slots (0.7 GB) leave room for whole resident layers that three
    # whole-layer slots (8.5 GB) would take: fewer bytes stream each pass.
    sizes = ModelSizes.of(cfg, torch.bfloat16)
    assert weights.ring_pieces == 8 and weights.resident_layers >= 4
    assert plan.stream_bytes_per_pass == (cfg.n_layers - weights.resident_layers) * sizes.layer_ffn
    whole = planner.plan_weights(cfg, torch.bfloat16, 24 * GiB, offload=None, reserve=6 * GiB,
                                 ring_pieces=1)
    assert whole.resident_layers < weights.resident_layers
    assert whole.stream_bytes_per_pass > plan.stream_bytes_per_pass
    # docs/design.md: ~1.6 s per pass when every expert streams at 55.4 GB/s; the pass is the copy
    # of what streams, plus a little
    copy = plan.stream_bytes_per_pass / (PROFILE.copy_gbps * 1e9)
    assert copy <= plan.predicted_pass_seconds < 1.1 * copy and 1.2 < copy < 1.5
    # streaming every layer (offload=True) keeps the whole-layer slots: pieces save no bytes
    every = planner.plan_weights(cfg, torch.bfloat16, 24 * GiB, offload=True, reserve=6 * GiB)
    assert every.ring_pieces == 1 and every.resident_layers == 0 and every.resident_attention


def test_too_small_a_budget_names_the_smallest_that_works():
    cfg = ModelConfig.from_dict(MIXTRAL_8X7B)
    with pytest.raises(BudgetError, match=r"gpu_memory=2\.00 GiB is too small for any plan: the "
                                          r"smallest .* needs (\d+\.\d+) GiB") as e:
        planner.plan_weights(cfg, torch.bfloat16, 2 * GiB, offload=True, reserve=512 << 20)
    smallest = float(str(e.value).split("needs ")[1].split(" GiB")[0])
    planner.plan_weights(cfg, torch.bfloat16, int((smallest + 0.01) * GiB), offload=True,
                         reserve=512 << 20)  # the named budget works
    with pytest.raises(BudgetError, match="use offload=True"):
        planner.plan_weights(cfg, torch.bfloat16, 48 * GiB, offload=False, reserve=0)


def test_host_kv_when_the_cache_does_not_fit():
    cfg = ModelConfig.from_dict(MIXTRAL_8X7B)
    weights = planner.plan_weights(cfg, torch.bfloat16, 12 * GiB, offload=True, reserve=2 * GiB)
    plan = planner.plan_run(weights, cfg, torch.bfloat16, rows=256, context=4096, max_rows=256,
                            prefill_tokens=4000, profile=PROFILE)
    assert not plan.kv_on_gpu
    forced = planner.plan_run(weights, cfg, torch.bfloat16, rows=4, context=64, max_rows=256,
                              kv_placement="host")
    assert not forced.kv_on_gpu


def test_a_host_cache_takes_only_the_host_memory_that_is_free():
    """Long prompts at 24 GiB on a 128 GiB host beside Mixtral's 93 GB store: 164 rows of
    2080 tokens would pin 44.7 GB (a host's kernel kills such a run), so the plan
    keeps the rows whose cache fits; when not even one row's does, the error says so."""
    cfg = ModelConfig.from_dict(MIXTRAL_8X7B)
    weights = planner.plan_weights(cfg, torch.bfloat16, 24 * GiB, offload=True, reserve=2 * GiB)
    kv = planner.ModelSizes.of(cfg, torch.bfloat16).kv_per_token
    common = dict(rows=164, context=2080, max_rows=256, prefill_tokens=2048, profile=PROFILE,
                  kv_placement="host")
    free = planner.plan_run(weights, cfg, torch.bfloat16, **common)
    assert free.rows_per_pass == 164 and free.host_cache_bytes == 164 * 2080 * kv
    tight = planner.plan_run(weights, cfg, torch.bfloat16, **common, host_budget=30 * GiB)
    assert tight.rows_per_pass == 30 * GiB // (2080 * kv) and tight.host_cache_bytes <= 30 * GiB
    assert tight.predicted_pass_seconds < free.predicted_pass_seconds  # less cache streamed
    segmented = planner.plan_run(weights, cfg, torch.bfloat16, **common, host_budget=30 * GiB,
                                 host_kv_tokens=lambda r: r * 1000)
    assert segmented.rows_per_pass == 164  # its pool holds rows' own tokens: they all fit
    on_gpu = planner.plan_run(weights, cfg, torch.bfloat16, **dict(common, kv_placement=None,
                              rows=2, context=256), host_budget=0)
    assert on_gpu.kv_on_gpu and on_gpu.host_cache_bytes == 0  # the host limit is not asked
    with pytest.raises(BudgetError, match="host memory.*one row's cache of 2080 tokens"):
        planner.plan_run(weights, cfg, torch.bfloat16, **common, host_budget=100 << 20)


def test_available_host_bytes_counts_reusable_pinned_blocks(monkeypatch):
    from specoff import hostmem

    base = hostmem.available_host_bytes()
    assert base is None or base > -hostmem.HOST_MARGIN
    if base is None:
        return
    block = [torch.zeros(1 << 20, dtype=torch.uint8), False, torch.uint8]
    monkeypatch.setattr(hostmem.HOST_BLOCKS, "_blocks", [block])
    assert hostmem.available_host_bytes() == pytest.approx(base + (1 << 20), abs=64 << 20)
    block[1] = True  # leased: a cache holds it
    assert hostmem.available_host_bytes() == pytest.approx(base, abs=64 << 20)


def test_host_segments_and_packed_prompts_in_the_prediction():
    """A plain batch of prompts of many lengths: its host cache in row segments streams each
    row's own need (not rows × the longest) and its prefill runs the prompts packed; the
    predictions follow."""
    cfg = ModelConfig.from_dict(MIXTRAL_8X7B)
    weights = planner.plan_weights(cfg, torch.bfloat16, 12 * GiB, offload=True, reserve=2 * GiB)
    prompts = [40 + (i * 37) % 300 for i in range(256)]
    common = dict(rows=256, context=max(prompts) + 32, max_rows=256, prefill_tokens=max(prompts),
                  profile=PROFILE, kv_placement="host")
    dense = planner.plan_run(weights, cfg, torch.bfloat16, **common)
    seg = planner.plan_run(weights, cfg, torch.bfloat16, **common,
                           host_kv_tokens=lambda r: sum(prompts[:r]) + r * 33,
                           prompt_tokens=lambda r: sum(prompts[:r]))
    kv = planner.ModelSizes.of(cfg, torch.bfloat16).kv_per_token
    saved = (256 * (max(prompts) + 32) - (sum(prompts) + 256 * 33)) * kv / (PROFILE.copy_gbps * 1e9)
    assert dense.predicted_pass_seconds - seg.predicted_pass_seconds == pytest.approx(saved, rel=1e-6)
    assert seg.predicted_prefill_seconds < 0.7 * dense.predicted_prefill_seconds
    # packed prompts hold their own tokens' hidden states and K/V scratch, not the longest's;
    # the segments' layer in flight is what they hold
    elt, L = torch.empty(0, dtype=torch.bfloat16).element_size(), cfg.n_layers

    def memory(prompt, streamed):
        return prompt * cfg.dim * elt + prompt * kv // L + 2 * streamed * kv // L

    assert dense.gpu_bytes["activations"] - seg.gpu_bytes["activations"] == (
        memory(256 * max(prompts), 256 * (max(prompts) + 32))
        - memory(sum(prompts), sum(prompts) + 256 * 33))


def test_profile_cache_round_trips(tmp_path, monkeypatch):
    calls = []

    def fake_measure(device, dtype):
        calls.append(device)
        return PROFILE

    monkeypatch.setattr(planner, "measure_profile", fake_measure)
    first = planner.load_profile("cpu", cache_dir=tmp_path)
    second = planner.load_profile("cpu", cache_dir=tmp_path)
    assert first == second == PROFILE and len(calls) == 1
    saved = json.loads((tmp_path / "profile-cpu-bfloat16.json").read_text())
    assert saved["copy_gbps"] == 55.4
    (tmp_path / "profile-cpu-bfloat16.json").write_text("{broken")
    planner.load_profile("cpu", cache_dir=tmp_path)
    assert len(calls) == 2  # a damaged entry is measured again


def test_measured_profile_is_plausible():
    p = planner.measure_profile("cpu", torch.float32)
    assert p.device_name == "cpu"
    assert all(v > 0 for v in (p.copy_gbps, p.gemm_tflops, p.moe_tflops, p.hbm_gbps))


def test_a_resident_draft_counts_against_the_budget():
    target = ModelConfig.from_dict(MIXTRAL_8X7B)
    draft = ModelConfig.from_dict(dict(MIXTRAL_8X7B, model_type="mistral"))
    draft_bytes = ModelSizes.of(draft, torch.bfloat16).total
    weights = planner.plan_weights(target, torch.bfloat16, 64 * GiB, offload=True,
                                   reserve=draft_bytes + 12 * GiB)
    plain = planner.plan_run(weights, target, torch.bfloat16, rows=256, context=170, max_rows=256)
    spec = planner.plan_run(weights, target, torch.bfloat16, rows=256, context=170, max_rows=256,
                            tokens_per_row=9, draft=draft)
    assert spec.gpu_bytes["draft_weights"] == draft_bytes
    assert spec.planned_gpu_bytes + planner.CONTEXT_MARGIN <= 64 * GiB
    assert spec.gpu_bytes["kv_cache"] > plain.gpu_bytes["kv_cache"]  # the draft's cache too
    # A run without speculation (generate(speculate=False)) beside a loaded draft: its
    # weights stay in the budget, its cache and steps do not.
    idle = planner.plan_run(weights, target, torch.bfloat16, rows=256, context=170, max_rows=256,
                            draft=draft, draft_idle=True)
    assert idle.gpu_bytes["draft_weights"] == draft_bytes
    assert idle.gpu_bytes["kv_cache"] == plain.gpu_bytes["kv_cache"]
    assert idle.gpu_bytes["activations"] == plain.gpu_bytes["activations"]


def test_a_mistral_draft_beside_mixtral_in_24_gib():
    """SpecOffload's setting: rows come first, so the target streams its attention too,
    through two ring slots of single-expert pieces, with its KV on the host; the draft's
    cache gets the rest."""
    target = ModelConfig.from_dict(MIXTRAL_8X7B)
    draft = ModelConfig.from_dict(dict(MIXTRAL_8X7B, model_type="mistral"))
    budget = 24 * GiB
    reserve = planner.weight_reserve(target, torch.bfloat16, budget, 256, draft)
    weights = planner.plan_weights(target, torch.bfloat16, budget, offload=None, reserve=reserve)
    assert weights.offload and not weights.resident_attention and weights.ring_slots == 2
    assert weights.ring_pieces == 8  # one expert a slot
    assert weights.gpu_bytes["ring"] < ModelSizes.of(target, torch.bfloat16).layer / 3
    plan = planner.plan_run(weights, target, torch.bfloat16, rows=256, context=379, max_rows=256,
                            tokens_per_row=6, prefill_tokens=340, draft=draft, profile=PROFILE)
    assert plan.planned_gpu_bytes + planner.CONTEXT_MARGIN <= budget
    # whole-layer slots left room for 72 rows of this workload
    assert not plan.kv_on_gpu and plan.rows_per_pass >= 140
    # without a draft the same budget keeps whole layers resident: less streams a pass
    plain = planner.plan_weights(target, torch.bfloat16, budget, offload=None,
                                 reserve=planner.weight_reserve(target, torch.bfloat16, budget, 256))
    assert plain.resident_layers >= 3 and plain.stream_bytes_per_pass < weights.stream_bytes_per_pass
    # 16 GiB holds the 13.5 GiB draft beside the smallest ring (few rows); 14 GiB cannot
    reserve16 = planner.weight_reserve(target, torch.bfloat16, 16 * GiB, 256, draft)
    small = planner.plan_run(
        planner.plan_weights(target, torch.bfloat16, 16 * GiB, offload=None, reserve=reserve16),
        target, torch.bfloat16, rows=256, context=379, max_rows=256, tokens_per_row=6,
        prefill_tokens=340, draft=draft)
    assert 1 <= small.rows_per_pass < 64
    with pytest.raises(BudgetError, match="too small for any plan"):
        planner.plan_weights(target, torch.bfloat16, 14 * GiB, offload=None,
                             reserve=planner.weight_reserve(target, torch.bfloat16, 14 * GiB, 256, draft))


def test_a_few_rows_leave_the_budget_to_the_weights():
    """The weights are placed for the rows a run can use (the CLI passes its prompt count):
    an interactive run keeps attention resident in larger slots, a throughput run gives the
    memory to rows."""
    target = ModelConfig.from_dict(MIXTRAL_8X7B)
    draft = ModelConfig.from_dict(dict(MIXTRAL_8X7B, model_type="mistral"))
    plans = {rows: planner.plan_weights(target, torch.bfloat16, 24 * GiB, offload=None,
                                        reserve=planner.weight_reserve(target, torch.bfloat16,
                                                                       24 * GiB, rows, draft))
             for rows in (1, 256)}
    assert plans[1].stream_bytes_per_pass < plans[256].stream_bytes_per_pass
    assert plans[1].resident_layers > plans[256].resident_layers == 0
    assert sum(plans[1].gpu_bytes.values()) > 4 * sum(plans[256].gpu_bytes.values())


def test_tree_rows_keep_room_for_their_verification_pass():
    """Built for 4 rows of 1024-node trees, the weights leave room for a pass over 4100
    tokens (activations, logits, K/V): all four rows in one pass with the cache on the
    GPU. Without that room the run plan had to drop a row and move the cache to the host,
    which halved the tokens a second."""
    target = ModelConfig.from_dict(MIXTRAL_8X7B)
    draft = ModelConfig.from_dict(dict(MIXTRAL_8X7B, model_type="mistral"))
    bf16, budget = torch.bfloat16, 24 * GiB

    def run(rows, tree_rows, max_rows=None):
        reserve = planner.weight_reserve(target, bf16, budget, max_rows or rows, draft,
                                         tree_rows=tree_rows, tree_nodes=1025)
        weights = planner.plan_weights(target, bf16, budget, offload=True, reserve=reserve)
        return weights, planner.plan_run(weights, target, bf16, rows=rows, context=1454,
                                         max_rows=rows, tokens_per_row=1024, prefill_tokens=300,
                                         draft=draft)

    _, squeezed = run(4, 0)
    assert squeezed.rows_per_pass < 4 or not squeezed.kv_on_gpu
    weights, plan = run(4, 4)
    assert plan.rows_per_pass == 4 and plan.kv_on_gpu
    assert plan.planned_gpu_bytes + planner.CONTEXT_MARGIN <= budget
    # One row's tree fits what the weights leave anyway: the same weights as without it.
    assert run(1, 1)[0].gpu_bytes == run(1, 0)[0].gpu_bytes
    # A throughput build (164 rows; tree mode would run 4 of them at most) is not squeezed.
    assert run(164, 4)[0].gpu_bytes == run(164, 0)[0].gpu_bytes


def test_forced_ring_pieces_must_split_the_experts():
    target = ModelConfig.from_dict(MIXTRAL_8X7B)
    plan = planner.plan_weights(target, torch.bfloat16, 24 * GiB, offload=True, reserve=GiB,
                                ring_pieces=4)
    assert plan.ring_pieces == 4
    with pytest.raises(ValueError, match="ring_pieces=3 does not split"):
        planner.plan_weights(target, torch.bfloat16, 24 * GiB, offload=True, reserve=GiB,
                             ring_pieces=3)
    dense = ModelConfig.from_dict(LLAMA_70B)
    with pytest.raises(ValueError, match=r"takes one of \[1\]"):
        planner.plan_weights(dense, torch.bfloat16, 24 * GiB, offload=True, reserve=GiB,
                             ring_pieces=2)


def test_chain_groups_interleave_only_where_the_draft_is_a_good_part_of_a_pass():
    target = ModelConfig.from_dict(MIXTRAL_8X7B)
    draft = ModelConfig.from_dict(dict(MIXTRAL_8X7B, model_type="mistral"))
    bf16 = torch.bfloat16
    # Offloaded: a 1.7 s copy-bound pass dwarfs drafting, so one group with every row wins.
    weights = planner.plan_weights(target, bf16, 24 * GiB, offload=True,
                                   reserve=planner.weight_reserve(target, bf16, 24 * GiB, 256, draft))
    plan = planner.plan_run(weights, target, bf16, rows=76, context=400, max_rows=76,
                            tokens_per_row=5, draft=draft, profile=PROFILE)
    assert planner.chain_groups(plan, target, draft, bf16, PROFILE, 76, 4, 400) == 1
    # A weak GPU (slow matrix products) drafting for many rows: drafting takes longer than
    # the copy-bound pass, and hiding it under the other group's pass pays.
    slow = HardwareProfile("weak-gpu", copy_gbps=55.4, gemm_tflops=5, moe_tflops=350, hbm_gbps=4000)
    plan = planner.plan_run(weights, target, bf16, rows=256, context=400, max_rows=256,
                            tokens_per_row=5, draft=draft, profile=slow)
    assert planner.chain_groups(plan, target, draft, bf16, slow, 256, 4, 400) == 2
    assert planner.chain_groups(plan, target, draft, bf16, slow, 1, 4, 400) == 1


def test_draft_prefill_prediction_is_its_flops_and_launches():
    """A Mistral-7B-shaped draft prefilling 1,356 tokens (~12 HumanEval prompts, a refill
    round) in one part: 2 FLOPs a layer weight a token at the GEMM rate, plus a launch floor
    per layer; the embeddings and head are left out (a lookup; the head sees one token)."""
    draft = ModelConfig.from_dict(dict(MIXTRAL_8X7B, model_type="mistral"))
    bf16 = torch.bfloat16
    sizes = ModelSizes.of(draft, bf16)
    weights = sizes.n_layers * sizes.layer / 2
    assert 6.9e9 < weights < 7.0e9  # Mistral 7B without its 0.26 B embedding and head
    t = planner.predict_draft_prefill(draft, bf16, PROFILE, 1356)
    assert t == pytest.approx(2 * 1356 * weights / 700e12 + 32 * 0.3e-3)
    assert 0.03 < t < 0.05
    # more parts, more launches; twice the tokens, twice the products
    assert planner.predict_draft_prefill(draft, bf16, PROFILE, 1356, parts=3) == pytest.approx(t + 2 * 32 * 0.3e-3)
    assert planner.predict_draft_prefill(draft, bf16, PROFILE, 2712) - t == pytest.approx(t - 32 * 0.3e-3)
