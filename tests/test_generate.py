"""LLM.generate: greedy parity with transformers, sampling controls, EOS and lengths."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import specoff
from conftest import FAMILIES

PROMPTS = ["def fibonacci(n):", "Beautiful is better than", "x",
           "class Stack:\n    def push(self, item):\n        self.items"]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(family, make_checkpoint):
    path = make_checkpoint(family)
    llm = specoff.LLM(path, device="cpu")
    outs = llm.generate(PROMPTS, specoff.SamplingParams(max_new_tokens=24))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert len({len(o.prompt_token_ids) for o in outs}) == len(PROMPTS)  # all lengths differ
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        expect = ref.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out.token_ids == expect
        assert out.finish_reason == ("stop" if expect[-1] in llm.eos_token_ids else "length")
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    stats = llm.last_stats
    assert stats.rows == len(PROMPTS)
    assert stats.tokens == sum(len(o.token_ids) for o in outs)
    assert stats.tokens_per_second > 0 and stats.prefill_seconds > 0 and stats.decode_seconds > 0


def test_token_id_prompts_and_chunked_prefill(make_checkpoint):
    """Token-id prompts; a prefill cut in chunks gives the same tokens as one pass."""
    path = make_checkpoint("mistral")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (40, 7, 23)]
    params = specoff.SamplingParams(max_new_tokens=12, ignore_eos=True)
    whole = specoff.LLM(path, device="cpu").generate(prompts, params)
    llm = specoff.LLM(path, device="cpu", prefill_chunk=8, max_rows=2)
    chunked = llm.generate(prompts, params)
    assert [o.token_ids for o in whole] == [o.token_ids for o in chunked]
    s = llm.last_stats  # steady state: the full batch of 2 rows, not the last one's batch
    assert s.steady_tokens == 2 * 12 and 0 < s.steady_seconds < s.prefill_seconds + s.decode_seconds
    assert [o.prompt_token_ids for o in whole] == prompts
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in whole)


def test_eos_stops_each_row_and_ignore_eos(make_checkpoint):
    path = make_checkpoint("llama")
    llm = specoff.LLM(path, device="cpu")
    free = llm.generate(PROMPTS, specoff.SamplingParams(max_new_tokens=16, ignore_eos=True))
    # Declare the 3rd token of row 0 an end-of-sequence token: row 0 must stop there.
    stop = free[0].token_ids[2]
    llm.eos_token_ids = {stop}
    outs = llm.generate(PROMPTS, specoff.SamplingParams(max_new_tokens=16))
    for f, o in zip(free, outs):
        cut = f.token_ids.index(stop) + 1 if stop in f.token_ids else len(f.token_ids)
        assert o.token_ids == f.token_ids[:cut]
        assert o.finish_reason == ("stop" if stop in f.token_ids else "length")
    assert outs[0].finish_reason == "stop" and len(outs[0].token_ids) <= 3
    assert llm.last_stats.tokens == sum(len(o.token_ids) for o in outs)


def test_sampling_controls(make_checkpoint):
    llm = specoff.LLM(make_checkpoint("qwen3"), device="cpu")
    greedy = llm.generate(PROMPTS, specoff.SamplingParams(max_new_tokens=10, ignore_eos=True))
    top1 = llm.generate(PROMPTS, specoff.SamplingParams(max_new_tokens=10, temperature=1.5,
                                                        top_k=1, ignore_eos=True))
    tiny_p = llm.generate(PROMPTS, specoff.SamplingParams(max_new_tokens=10, temperature=1.5,
                                                          top_p=1e-6, ignore_eos=True))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]
    assert [o.token_ids for o in tiny_p] == [o.token_ids for o in greedy]
    hot = specoff.SamplingParams(max_new_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    a, b = llm.generate(PROMPTS, hot), llm.generate(PROMPTS, hot)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]  # seeded: reproducible
    other = llm.generate(PROMPTS, specoff.SamplingParams(max_new_tokens=10, temperature=1.0,
                                                         seed=6, ignore_eos=True))
    assert [o.token_ids for o in a] != [o.token_ids for o in other]
    assert [o.token_ids for o in a] != [o.token_ids for o in greedy]


@pytest.mark.parametrize("bad, message", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k")])
def test_bad_sampling_params(bad, message):
    with pytest.raises(ValueError, match=message):
        specoff.SamplingParams(**bad)


def test_bad_requests_are_refused(make_checkpoint):
    llm = specoff.LLM(make_checkpoint("llama", max_positions=64), device="cpu")
    with pytest.raises(ValueError, match="non-empty list"):
        llm.generate([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.generate([[5], []], specoff.SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 99999]])
    with pytest.raises(ValueError, match="prompt 0 .*max_position_embeddings=64"):
        llm.generate([[5] * 60], specoff.SamplingParams(max_new_tokens=10))


@pytest.mark.parametrize("kw, message", [
    (dict(draft="/no/such/draft"), "no config.json in"), (dict(spec="tree"), "needs a draft model"),
    (dict(spec="chain"), "needs a draft model"),
    (dict(gpu_memory="24GiB"), "gpu_memory applies to a CUDA device"),
    (dict(kv_placement="disk"), "option kv_placement takes 'gpu' or 'host' or None, not 'disk'"),
    (dict(dtype="int8"), "dtype 'int8' is not supported")])
def test_llm_refuses_what_is_not_there(kw, message, make_checkpoint):
    with pytest.raises((ValueError, NotImplementedError, FileNotFoundError), match=message):
        specoff.LLM(make_checkpoint("llama"), device="cpu", **kw)


def test_half_precision_loads_and_runs(make_checkpoint):
    for dtype in ("float16", torch.bfloat16):
        llm = specoff.LLM(make_checkpoint("mixtral"), device="cpu", dtype=dtype)
        assert llm.model.output.weight.dtype == specoff.weights.parse_dtype(dtype)
        outs = llm.generate(PROMPTS[:2], specoff.SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert all(len(o.token_ids) == 4 for o in outs)


@pytest.mark.gpu
def test_greedy_on_gpu_matches_cpu_fp32(make_checkpoint):
    path = make_checkpoint("mixtral")
    params = specoff.SamplingParams(max_new_tokens=16, ignore_eos=True)
    cpu = specoff.LLM(path, device="cpu").generate(PROMPTS, params)
    gpu = specoff.LLM(path, device="cuda", dtype="float32").generate(PROMPTS, params)
    assert [o.token_ids for o in cpu] == [o.token_ids for o in gpu]
