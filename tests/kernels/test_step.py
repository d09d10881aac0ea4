"""The decode step's two ends (specoff/kernels/step.py): the embedding gather and the greedy
argmax, against torch's embedding and argmax, which they must equal exactly. On the CPU in
Triton's interpreter (`interpret`); on the GPU (`gpu` marker) bf16 too, vocabularies
of Mistral (32000) and Qwen (151936: a loop of tiles), and replayed from a CUDA graph.
"""
import zlib

import pytest
import torch
from conftest import DEVICE, dtype_cases, gpu

from specoff.kernels import step
from specoff.kernels.step import argmax_rows_ref, embed_rows_ref
from specoff.options import KernelOptions

INTERPRET = DEVICE == "cpu"  # the kernels on CPU tensors too: Triton's interpreter


def argmax_rows(x):
    return step.argmax_rows(x, interpret=INTERPRET)


def embed_rows(ids, weight):
    return step.embed_rows(ids, weight, interpret=INTERPRET)


def _gen(key):
    return torch.Generator(device=DEVICE).manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("shape,dtype", list(dtype_cases([((1, 1000),), ((3, 2, 4099),), ((2, 40000),)],
                                                         [((1, 32000),), ((16, 32000),), ((4, 151936),),
                                                          ((2, 5, 32000),)])))
def test_argmax_is_torchs(shape, dtype):
    """The first index of each row's maximum, as torch.argmax: random rows, a row of ties
    (two equal maxima, the first taken, one in a later tile past 32768 where the row is that
    wide), a row of -inf (index 0), a row whose maximum is its last element; poisoned output."""
    x = torch.randn(*shape, device=DEVICE, generator=_gen(("argmax", shape, dtype))).to(dtype)
    rows = x.view(-1, shape[-1])
    V = shape[-1]
    rows[0, V // 3] = rows[0, V - 1] = 60.0  # a tie: the first wins
    if rows.shape[0] > 1:
        rows[1] = float("-inf")
    if rows.shape[0] > 2:
        rows[2, -1] = 70.0
    got = argmax_rows(x)
    assert got.dtype == torch.int64 and got.shape == shape[:-1]
    assert torch.equal(got, argmax_rows_ref(x))
    assert int(got.view(-1)[0]) == V // 3


@pytest.mark.parametrize("V,D,dtype", list(dtype_cases([(50, 96), (1000, 1500)], [(32000, 4096), (151936, 2048)])))
def test_embed_rows_is_the_tables_rows(V, D, dtype, monkeypatch):
    """weight[ids] bit for bit, ids of any shape (repeats, 0 and V - 1) and a column of a wider
    tensor (strided); an id outside the table gives a row of NaN, never another tensor's bytes."""
    gen = _gen(("embed", V, D, dtype))
    w = torch.nn.Parameter(torch.randn(V, D, device=DEVICE, generator=gen).to(dtype), requires_grad=False)
    ids = torch.randint(0, V, (3, 5), device=DEVICE, generator=gen)
    launched = []
    real = step._launcher
    monkeypatch.setattr(step, "_launcher", lambda *a: (launched.append(1), real(*a))[1])
    ids[0, 0], ids[0, 1], ids[1, 2] = 0, V - 1, ids[1, 3]
    got = embed_rows(ids, w)
    assert got.shape == (3, 5, D) and torch.equal(got, embed_rows_ref(ids, w))
    column = ids[:, 3:4]  # (3, 1), rows 5 apart: a decode step's ids sliced from a wider tensor
    assert torch.equal(embed_rows(column, w), embed_rows_ref(column, w))
    bad = torch.tensor([1, V, -1], device=DEVICE)
    out = embed_rows(bad, w)
    assert torch.equal(out[0], w[1]) and bool(out[1:].isnan().all())
    assert len(launched) == 3  # an nn.Parameter's table (an embedding's) takes the kernel


def test_step_kernels_off_a_gpu_only_when_asked(monkeypatch):
    """Off a GPU the kernels run only under `interpret` (the interpreter is never taken
    unasked: prefills and every argmax would crawl)."""
    x = torch.randn(2, 10)
    launched = []
    real = step._launcher
    monkeypatch.setattr(step, "_launcher", lambda *a: (launched.append(1), real(*a))[1])
    assert torch.equal(step.argmax_rows(x), x.argmax(-1))
    assert torch.equal(step.embed_rows(torch.tensor([1, 0]), x), x[[1, 0]])
    step.rope_tables(torch.zeros(1, 2, dtype=torch.long), torch.ones(4), torch.float32)
    assert not launched
    assert torch.equal(step.argmax_rows(x, interpret=True), x.argmax(-1)) and len(launched) == 1


def test_greedy_picks_take_the_argmax_kernel_as_the_options_say(monkeypatch):
    """sampling.select and chain's greedy_accept: kernels.step's argmax where
    KernelOptions.step_kernels runs (here in the interpreter), torch's argmax where it is
    off; the same picks."""
    from specoff.sampling import SamplingParams, select
    from specoff.speculation.chain import greedy_accept

    logits = torch.randn(3, 4, 50)
    drafts = logits[:, :3].argmax(-1)
    launched = []
    real = step._launcher
    monkeypatch.setattr(step, "_launcher", lambda *a: (launched.append(1), real(*a))[1])
    for on in (False, True):
        kernels = KernelOptions(interpret=True, step_kernels=on)
        launched.clear()
        assert torch.equal(select(logits, SamplingParams(), None, kernels), logits.argmax(-1))
        accepted, nxt = greedy_accept(drafts, logits, kernels)
        assert accepted.tolist() == [3, 3, 3] and torch.equal(nxt, logits[:, 3].argmax(-1))
        assert len(launched) == (2 if on else 0)


def test_model_takes_the_step_kernels_as_its_options_say(make_checkpoint, monkeypatch):
    """Transformer.embed and .rope: kernels.step's launches where KernelOptions.step_kernels
    (and the fused element-wise kernels) run, torch's ops where it is off; the same values."""
    import specoff

    model = specoff.load_model(make_checkpoint("llama"), device="cpu", dtype=torch.float32)
    launched = []
    real = step._launcher
    monkeypatch.setattr(step, "_launcher", lambda *a: (launched.append(1), real(*a))[1])
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    positions = torch.arange(5).expand(2, 5)
    outs = {}
    for on in (False, True):
        model.use_kernels(KernelOptions(interpret=True, step_kernels=on, skinny_products=False))
        launched.clear()
        outs[on] = model.embed(ids), *model.rope(positions, torch.float32)
        assert len(launched) == (2 if on else 0)
    assert torch.equal(outs[True][0], outs[False][0])
    for got, want in zip(outs[True][1:], outs[False][1:]):
        assert (got - want).abs().max() <= 1e-6  # numpy's cos / sin in the interpreter: an fp32 ulp


@gpu
def test_gpu_step_ends_in_a_cuda_graph():
    """Both kernels captured in a graph: replays follow new ids and new logits."""
    gen = _gen("graph")
    w = torch.randn(32000, 4096, device=DEVICE, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, 32000, (16,), device=DEVICE, generator=gen)
    logits = torch.randn(16, 32000, device=DEVICE, generator=gen).to(torch.bfloat16)
    embed_rows(ids, w), argmax_rows(logits)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, top = embed_rows(ids, w), argmax_rows(logits)
    for _ in range(3):
        ids.copy_(torch.randint(0, 32000, (16,), device=DEVICE, generator=gen))
        logits.copy_(torch.randn(16, 32000, device=DEVICE, generator=gen))
        h.fill_(float("nan"))
        top.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(h, w[ids]) and torch.equal(top, logits.argmax(-1))


@pytest.mark.parametrize("B,T,hd,dtype", list(dtype_cases([(1, 1, 64), (3, 5, 128), (2, 7, 96)],
                                                          [(16, 1, 128), (4, 5, 128), (2, 300, 64)])))
def test_rope_tables_are_the_decoders(B, T, hd, dtype):
    """cos and sin of position × inverse frequency, [f, f] along the head, in the dtype: on
    the GPU bit for bit the decoder's torch ops (libdevice's cosf / sinf are torch's); in the
    interpreter (numpy's functions) within an fp32 rounding or two. Positions up to 40000."""
    from specoff.config import ModelConfig
    from specoff.config import rope_inv_freq

    cfg = ModelConfig.from_dict(dict(model_type="llama", hidden_size=hd * 4, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64, num_hidden_layers=1,
                                     vocab_size=32, rope_theta=500000.0))
    inv = rope_inv_freq(cfg).to(DEVICE)
    pos = torch.randint(0, 40000, (B, T), device=DEVICE, generator=_gen(("rope", B, T, hd)))
    cos, sin = step.rope_tables(pos, inv, dtype, interpret=INTERPRET)
    want_cos, want_sin = step.rope_tables_ref(pos, inv, dtype)
    assert cos.shape == sin.shape == (B, T, 1, hd) and cos.dtype == dtype
    if DEVICE == "cpu":
        tol = 1e-6 if dtype == torch.float32 else 1e-3  # an fp32 ulp, or the ulp of fp16 near 1
        assert (cos.float() - want_cos.float()).abs().max() <= tol and (sin.float() - want_sin.float()).abs().max() <= tol
    else:
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
