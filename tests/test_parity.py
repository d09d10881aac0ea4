"""Our decoder against transformers' own model classes, on tiny random checkpoints."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import specoff
from conftest import FAMILIES

VARIANTS = [(f, {}) for f in FAMILIES] + [
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    ("qwen3", {"tie": True}),
    ("llama", {"tie": True, "attention_bias": True}),
    ("qwen3_moe", {"norm_topk_prob": False, "experts": 8, "top_k": 3}),
]
IDS = [f + ("-" + "-".join(kw) if kw else "") for f, kw in VARIANTS]


def reference(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def close(ours, ref):
    scale = ref.abs().max()
    err = (ours - ref).abs().max()
    assert err <= 1e-4 * scale, f"max abs error {err:.3g} for logit scale {scale:.3g}"


@pytest.fixture(params=VARIANTS, ids=IDS)
def pair(request, make_checkpoint):
    family, kw = request.param
    path = make_checkpoint(family, **kw)
    return specoff.load_model(path, device="cpu", dtype=torch.float32), reference(path)


@torch.inference_mode()
def test_logits_without_cache(pair):
    ours, ref = pair
    ids = torch.randint(0, ours.config.vocab_size, (3, 29), generator=torch.Generator().manual_seed(0))
    close(ours(ids), ref(ids).logits)


@torch.inference_mode()
def test_ragged_prefill_then_steps_through_the_cache(pair):
    """Rows of different lengths prefilled together, then decoded one token at a time."""
    ours, ref = pair
    g = torch.Generator().manual_seed(1)
    lengths, steps = [5, 17, 1, 11], 6
    rows = [torch.randint(0, ours.config.vocab_size, (n + steps,), generator=g) for n in lengths]
    cache = ours.new_cache(len(rows), max(lengths) + steps)
    prompt = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for b, r in enumerate(rows):
        prompt[b, :lengths[b]] = r[:lengths[b]]
    prefill = ours(prompt, cache)
    cache.advance(torch.tensor(lengths))
    stepped = []
    for s in range(steps):
        step_ids = torch.stack([r[lengths[b] + s] for b, r in enumerate(rows)])[:, None]
        stepped.append(ours(step_ids, cache)[:, 0])
        cache.advance(1)
    for b, r in enumerate(rows):
        expect = ref(r[None]).logits[0]
        close(prefill[b, :lengths[b]], expect[:lengths[b]])
        close(torch.stack([s[b] for s in stepped]), expect[lengths[b]:])


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
@torch.inference_mode()
def test_chain_attention_kernel_matches_transformers(family, make_checkpoint):
    """Passes over the cache with the Triton verification kernel (KernelOptions.chain_attention;
    Triton's interpreter here, the default on CUDA): a ragged prefill, single-token steps and
    a 3-token verification step give transformers' logits."""
    from specoff.options import KernelOptions

    path = make_checkpoint(family)
    ours, ref = specoff.load_model(path, device="cpu", dtype=torch.float32), reference(path)
    ours.use_kernels(KernelOptions(interpret=True, fused_elementwise=False, skinny_products=False))
    g = torch.Generator().manual_seed(2)
    lengths, steps = [4, 9, 1], [1, 1, 3]
    rows = [torch.randint(0, ours.config.vocab_size, (n + sum(steps),), generator=g) for n in lengths]
    cache = ours.new_cache(len(rows), max(lengths) + sum(steps))
    prompt = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for b, r in enumerate(rows):
        prompt[b, :lengths[b]] = r[:lengths[b]]
    got = [ours(prompt, cache)]
    cache.advance(torch.tensor(lengths))
    done = 0
    for T in steps:
        ids = torch.stack([r[lengths[b] + done:lengths[b] + done + T] for b, r in enumerate(rows)])
        got.append(ours(ids, cache))
        cache.advance(T)
        done += T
    for b, r in enumerate(rows):
        expect = ref(r[None]).logits[0]
        close(got[0][b, :lengths[b]], expect[:lengths[b]])
        close(torch.cat([s[b] for s in got[1:]]), expect[lengths[b]:])


@torch.inference_mode()
def test_logits_at_picks_positions(make_checkpoint):
    model = specoff.load_model(make_checkpoint("llama"), device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    full = model(ids)
    at = torch.tensor([[3, 8], [0, 5]])
    picked = model(ids, model.new_cache(2, 9), logits_at=at)
    torch.testing.assert_close(picked, full.gather(1, at[..., None].expand(-1, -1, full.shape[-1])),
                               rtol=1e-5, atol=1e-5)
