"""fp8 draft weights (specoff.quant): what they store, what they cost the plan, and that
speculation with them stays exact."""
import pytest
import torch
from torch import nn

import specoff
from specoff import planner
from specoff.config import ModelConfig, UnsupportedModelError
from specoff.options import KernelOptions
from specoff.planner import GiB, ModelSizes
from specoff.quant import FP8, Fp8Linear, quantize_linears

MISTRAL_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                  max_position_embeddings=32768, rope_theta=1e6)
PROMPTS = ["def add(a, b):", "Once upon a time", "import numpy as np", "x = [1, 2, 3]",
           "class Stack:", "for i in range(10):", "# a comment", "return x + 1"]


def cpu_kernels(**on) -> KernelOptions:
    """KernelOptions as the CPU runs by default (the GPU's paths off), the paths named in `on`
    through Triton's interpreter."""
    off = dict(fused_elementwise=False, skinny_products=False, chain_attention=False, tree_attention=False,
               step_kernels=False, fp8_weight_kernel=False)
    return KernelOptions(interpret=True, **{**off, **on})


@pytest.mark.parametrize("bias, dtype", [(False, torch.float32), (True, torch.float32),
                                         (False, torch.bfloat16)])
def test_fp8_linear_is_close_to_the_linear_it_replaces(bias, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight[3] *= 50  # rows of very different magnitudes: a scale per row
    q = Fp8Linear(lin)
    assert q.weight.dtype == FP8 and q.weight.shape == (40, 96) and q.scale.dtype == dtype
    x = torch.randn(7, 96, dtype=dtype)
    ref, out = lin(x).float(), q(x).float()
    # e4m3 keeps 3 mantissa bits: each weight within 1/16 of itself, errors average out
    assert (out - ref).norm() / ref.norm() < 0.05
    assert ((out - ref).norm(dim=0) / ref.norm(dim=0)).max() < 0.1  # the large row and the rest


def test_quantize_linears_takes_the_layers_not_the_embeddings_or_head(pairs):
    draft, _ = pairs(0.3)
    llm = specoff.LLM(draft, device="cpu")
    model = llm.model
    n = quantize_linears(model)
    assert n == 4 * len(model.layers)  # wqkv, wo, w13, w2
    assert all(type(m) is not nn.Linear for layer in model.layers for m in layer.modules())
    assert type(model.output) is nn.Linear


def _tree_plan(target, draft, prompt_tokens: int, context: int, budget: int = 24 * GiB):
    """The plan of up to 512 rows of 16-node trees beside `draft` within `budget` (checked)."""
    reserve = planner.weight_reserve(target, torch.bfloat16, budget, 256, draft)
    weights = planner.plan_weights(target, torch.bfloat16, budget, offload=None, reserve=reserve)
    plan = planner.plan_run(weights, target, torch.bfloat16, rows=512, context=context, max_rows=512,
                            tokens_per_row=16, prefill_tokens=prompt_tokens, draft=draft, max_logit_rows=512)
    assert plan.planned_gpu_bytes + planner.CONTEXT_MARGIN <= budget
    return plan


def test_an_fp8_draft_halves_its_layers_and_buys_rows():
    target = ModelConfig.from_dict(dict(MISTRAL_7B, model_type="mixtral", num_local_experts=8,
                                        num_experts_per_tok=2))
    draft = ModelConfig.from_dict(MISTRAL_7B)
    fp8 = ModelConfig.from_dict(MISTRAL_7B)
    fp8.weight_quant = "fp8"
    bf16, q = ModelSizes.of(draft, torch.bfloat16), ModelSizes.of(fp8, torch.bfloat16)
    assert q.outside_layers == bf16.outside_layers and q.kv_per_token == bf16.kv_per_token
    assert 0.5 < q.layer / bf16.layer < 0.51  # a byte a weight and a scale per row
    plans = [_tree_plan(target, d, prompt_tokens=340, context=389) for d in (draft, fp8)]
    assert plans[1].gpu_bytes["draft_weights"] < 0.53 * plans[0].gpu_bytes["draft_weights"]
    assert plans[1].rows_per_pass > 1.5 * plans[0].rows_per_pass


@pytest.mark.parametrize("spec, sigma, kernel", [("chain", 0.0, False), ("tree", 0.3, False),
                                                 ("chain", 0.3, False), ("tree", 0.3, True)])
def test_speculation_with_an_fp8_draft_equals_the_target(spec, sigma, kernel, pairs, monkeypatch):
    """Dequantizing, or through the float8-weight kernel (KernelOptions.fp8_weight_kernel; on
    the CPU in Triton's interpreter)."""
    from specoff import quant

    calls = []
    real = quant.fp8_linear
    monkeypatch.setattr(quant, "fp8_linear", lambda *a: (calls.append(1), real(*a))[1])
    draft, target = pairs(sigma)
    # The interpreter runs each launch's programs in numpy: fewer prompts and tokens there.
    prompts = PROMPTS[:2] if kernel else PROMPTS
    params = specoff.SamplingParams(max_new_tokens=6 if kernel else 10)
    expect = [o.token_ids for o in specoff.LLM(target, device="cpu").generate(prompts, params)]
    llm = specoff.LLM(target, draft=draft, device="cpu", spec=spec, draft_quant="fp8", max_rows=3)
    assert llm.draft_config.weight_quant == "fp8"
    llm.draft_model.use_kernels(cpu_kernels(fp8_weight_kernel=kernel))
    assert [o.token_ids for o in llm.generate(prompts, params)] == expect
    assert bool(calls) == kernel
    if sigma == 0.0:  # the draft is the target up to the weights' rounding: most accepted
        assert llm.last_stats.acceptance_rate > 0.5


def test_draft_quant_errors(pairs, tmp_path):
    draft, target = pairs(0.3)
    with pytest.raises(ValueError, match="needs a draft"):
        specoff.LLM(target, device="cpu", draft_quant="fp8")
    with pytest.raises(ValueError, match="option draft_quant takes 'fp8' or None, not 'int3'"):
        specoff.LLM(target, draft=draft, device="cpu", draft_quant="int3")
    moe = ModelConfig.from_dict(dict(MISTRAL_7B, model_type="mixtral", num_local_experts=4,
                                     num_experts_per_tok=2))
    with pytest.raises(UnsupportedModelError, match="dense drafts"):
        from specoff.quant import check_weight_quant
        check_weight_quant(moe, "fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 33, 222])
def test_gpu_fp8_products_are_close(rows):
    """Both GPU paths of Fp8Linear (dequantize then bf16; the float8-weight kernel) against
    the bf16 linear, at Mistral-7B's w13 shape."""
    torch.manual_seed(0)
    lin = nn.Linear(4096, 2 * 14336, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    ref = lin(x).float()
    for kernel in (False, True):
        out = Fp8Linear(lin, KernelOptions(fp8_weight_kernel=kernel))(x).float()
        assert (out - ref).norm() / ref.norm() < 0.06, kernel


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["chain", "tree"])
@pytest.mark.parametrize("kernel", [False, True])
def test_gpu_speculation_with_an_fp8_draft(spec, kernel, pairs):
    """On the GPU a float8 draft's steps (CUDA graphs) dequantize or run the float8-weight
    kernel inside the graphs; exact, over more prompts than rows (refills)."""
    draft, target = pairs(0.3)
    params = specoff.SamplingParams(max_new_tokens=12)
    expect = [o.token_ids for o in specoff.LLM(target, device="cuda", dtype="float32").generate(PROMPTS, params)]
    llm = specoff.LLM(target, draft=draft, device="cuda", dtype="float32", offload=True,
                      spec=spec, draft_quant="fp8", max_rows=3, kv_placement="host",
                      fp8_weight_kernel=kernel)
    assert [o.token_ids for o in llm.generate(PROMPTS * 2, params)] == expect * 2


def test_a_pair_on_the_fp8_grid_proposes_alike_in_fp8():
    """synthetic.upcycled_pair(grid="fp8"): the draft's decoder weights lie on the float8 grid
    Fp8Linear stores (its dequantized weights equal them), the target is built from them, and
    an fp8 draft then proposes exactly what the bf16 one does (the same acceptance); the
    embeddings, head, norms and router are left as drawn."""
    from specoff.bench.synthetic import (TINY_PAIRS, on_fp8_grid, pair_configs, random_source,
                                   upcycled_pair)

    draft_hf, target_hf, _ = TINY_PAIRS["mixtral"]
    dcfg, tcfg = pair_configs(draft_hf, target_hf)
    w = torch.randn(8, 64)
    once = on_fp8_grid(w, 64)
    assert torch.equal(on_fp8_grid(once, 64), once) and not torch.equal(once, w)
    lin = nn.Linear(64, 8, bias=False)
    lin.weight.data.copy_(once)
    q = Fp8Linear(lin)
    assert torch.allclose(q.weight.float() * q.scale.float()[:, None], once, rtol=1e-6, atol=0)
    params = specoff.SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = torch.randint(3, dcfg.vocab_size, (6, 9), generator=torch.Generator().manual_seed(0)).tolist()
    stats = {}
    for grid in (None, "fp8"):
        draft, target = upcycled_pair(dcfg, tcfg, 0.05, seed=3, device="cpu", grid=grid)
        expect = [o.token_ids for o in specoff.LLM(target, device="cpu").generate(prompts, params)]
        for quant in (None, "fp8"):
            llm = specoff.LLM(target, draft=draft, device="cpu", spec="chain", draft_len=4,
                              draft_quant=quant, max_rows=4)
            assert [o.token_ids for o in llm.generate(prompts, params)] == expect
            stats[grid, quant] = llm.last_stats.accepted_histogram
    assert stats["fp8", None] == stats["fp8", "fp8"]  # the same proposals, token for token
    dests = {"layers.0.attention.wqkv.weight": torch.empty(16, 64), "output.weight": torch.empty(8, 64),
             "layers.0.feed_forward.gate.weight": torch.empty(4, 64)}
    random_source(dcfg, 3, "cpu", grid="fp8")(dests)
    assert torch.equal(on_fp8_grid(dests["layers.0.attention.wqkv.weight"], 64),
                       dests["layers.0.attention.wqkv.weight"])
    assert not torch.equal(on_fp8_grid(dests["output.weight"], 64), dests["output.weight"])
    with pytest.raises(ValueError, match="grid"):
        random_source(dcfg, 3, "cpu", grid="int4")
