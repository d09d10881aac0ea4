"""The few-rows product (specoff/kernels/skinny.py) against its plain-torch reference, and
the decoder's projections through it (KernelOptions.skinny_products).

On the CPU the kernel runs in Triton's interpreter (fp32/fp16), which runs the programs one
after another, so the last K slice of a tile to arrive is the last one launched; on the GPU
(bf16 too, Mistral-7B shapes, CUDA-graph capture, `gpu` marker) they race for it. Outputs
start as NaN, so an element the kernel never writes fails.
"""
import zlib

import pytest
import torch
from conftest import DEVICE, TOL, dtype_cases, gpu, rel_err

from specoff.kernels import skinny
from specoff.kernels.skinny import _skinny_into, config, skinny_linear, skinny_linear_ref

from kernel_options import kernel_options

CPU_CASES = [(1, 64, 128), (5, 100, 511), (16, 300, 1030)]  # rows, N, K
GPU_CASES = [(1, 4096, 4096), (4, 6144, 4096), (16, 28672, 4096), (1, 4096, 14336), (7, 511, 200)]


def prompt_step_verify(model, ids):
    """Logits of 3 rows: an 11-token prompt, a decode step, a 5-token verification."""
    with torch.inference_mode():
        cache = model.new_cache(3, 20)
        first = model(ids[:, :11], cache)
        cache.advance(11)
        step = model(ids[:, 11:12], cache)
        cache.advance(1)
        return first, step, model(ids[:, 12:17], cache)


def inputs(rows, N, K, dtype, key):
    gen = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(repr(key).encode()))
    w = (torch.randn(N, K, device=DEVICE, generator=gen) * K**-0.5).to(dtype)
    x = torch.randn(rows, K, device=DEVICE, generator=gen).to(dtype)
    b = torch.randn(N, device=DEVICE, generator=gen).to(dtype)
    return x, w, b


@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("rows,N,K,dtype", list(dtype_cases(CPU_CASES, GPU_CASES)))
def test_skinny_matches_ref_whole_and_split(rows, N, K, dtype, split):
    """K whole or in slices (forced here: the launch picks them by the SMs); the per-tile
    counts are back at zero afterwards, so the next launch starts clean."""
    x, w, b = inputs(rows, N, K, dtype, (rows, N, K, dtype, split))
    for bias in (None, b):
        out = torch.full((rows, N), float("nan"), dtype=dtype, device=DEVICE)
        _skinny_into(x, w, bias, out, dict(config(rows, N, K, 4), SPLIT_K=split, BLOCK_K=64))
        assert rel_err(out, skinny_linear_ref(x, w, bias)) < TOL[dtype]
    counts = skinny._COUNTS.get((str(w.device), w.data_ptr()))
    assert split == 1 or (counts is not None and int(counts.abs().sum()) == 0)


@pytest.mark.parametrize("block_n", [32, 64])
@pytest.mark.parametrize("rows,N,K,dtype", list(dtype_cases([(3, 96, 200), (16, 70, 130)],
                                                          [(1, 14336, 4096), (16, 14336, 4096)])))
def test_swiglu_output_is_silu_mul(rows, N, K, dtype, block_n):
    """swiglu: W = [gate; up] (2N, K), the result silu(x·gateᵀ) · (x·upᵀ): on the GPU
    bit for bit fused silu_mul of the plain kernel's [gate | up] (the same roundings), near
    the reference; K slices asked for are ignored (the epilogue needs both products whole).
    A program's block_n gate rows and block_n up rows are one tile and one product (the
    launch's own config: 32 each)."""
    from specoff.kernels.fused import silu_mul

    x, w, b = inputs(rows, 2 * N, K, dtype, ("swiglu", rows, N, K, dtype))
    plain = dict(config(rows, 2 * N, K, 4), SPLIT_K=1, BLOCK_K=64)
    cfg = dict(plain, BLOCK_N=block_n)
    for bias in (None, b):
        got = skinny_linear(x, w, bias, cfg=cfg, swiglu=True)
        assert got.shape == (rows, N)
        apart = silu_mul(skinny_linear(x, w, bias, cfg=plain))
        if DEVICE == "cpu":  # the interpreter's numpy products may sum a tile's rows in another
            # order: fp32 sums a last bit apart, now and then one rounding to a neighbouring fp16
            assert rel_err(got, apart) < (1e-6 if dtype == torch.float32 else 1e-3)
            assert dtype == torch.float32 or (got != apart).float().mean() < 0.01
        else:
            assert torch.equal(got, apart)
        assert rel_err(got, skinny_linear_ref(x, w, bias, swiglu=True)) < 2 * TOL[dtype]
    assert torch.equal(skinny_linear(x, w, b, cfg=dict(cfg, SPLIT_K=3), swiglu=True), got)
    assert rel_err(skinny_linear(x, w, b, swiglu=True), skinny_linear_ref(x, w, b, swiglu=True)) < 2 * TOL[dtype]
    with pytest.raises(AssertionError, match="gate"):
        skinny_linear(x, w[:-1], swiglu=True)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("rows,N,K,dtype", list(dtype_cases([(3, 96, 200)], [(1, 4096, 14336), (16, 4096, 14336)])))
def test_residual_is_added_after_the_rounding(rows, N, K, dtype, split):
    """residual: the block's skip added in the launch, as torch's add after the product
    (whole K or the last slice's sum); a residual of another shape is refused."""
    x, w, b = inputs(rows, N, K, dtype, ("residual", rows, N, K, dtype))
    cfg = dict(config(rows, N, K, 4), SPLIT_K=split, BLOCK_K=64)
    h = torch.randn(rows, N, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1)).to(dtype)
    assert torch.equal(skinny_linear(x, w, b, cfg=cfg, residual=h), h + skinny_linear(x, w, b, cfg=cfg))
    with pytest.raises(AssertionError, match="residual"):
        skinny_linear(x, w, b, residual=h[:, :-1])
    with pytest.raises(AssertionError, match="features"):
        skinny_linear(x[:, :-1], w)


@pytest.mark.parametrize("swiglu,split,narrow", [(False, 1, False), (False, 2, False), (True, 1, False),
                                                  (True, 1, True)])
@pytest.mark.parametrize("rows,N,K,dtype", list(dtype_cases([(3, 96, 200), (16, 64, 130)],
                                                          [(1, 6144, 4096), (16, 28672, 4096)])))
def test_rms_normalises_the_rows_first(rows, N, K, dtype, swiglu, split, narrow):
    """rms_eps: each row of x RMS-normalised (a weight of ones) before the product, the scale
    applied to the fp32 sums, the bias after it; in K slices too (the rows re-read whole),
    and with the SwiGLU (64 or, `narrow`, 32 gate and up rows a program)."""
    x, w, b = inputs(rows, N, K, dtype, ("rms", rows, N, K, dtype, swiglu, split))
    x = x * torch.linspace(0.1, 30.0, rows, device=DEVICE, dtype=dtype)[:, None]  # rows of unlike scales
    cfg = dict(config(rows, N, K, 4), SPLIT_K=split, BLOCK_K=64)
    if narrow:
        cfg.update(BLOCK_N=32)
    for bias in (None, b):
        got = skinny_linear(x, w, bias, cfg=cfg, swiglu=swiglu, rms_eps=1e-5)
        want = skinny_linear_ref(x, w, bias, swiglu=swiglu, rms_eps=1e-5)
        assert rel_err(got, want) < 2 * TOL[dtype]
        # the plain product of the normalised rows (rounded to the dtype once more)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        assert rel_err(got, skinny_linear_ref(normed, w, bias, swiglu=swiglu)) < 4 * TOL[dtype]


@pytest.mark.parametrize("consumer", ["plain", "split", "swiglu", "swiglu-narrow"])
@pytest.mark.parametrize("producer_split", [1, 2])
@pytest.mark.parametrize("rows,N,K,dtype", list(dtype_cases([(3, 200, 96), (16, 130, 64)],
                                                          [(1, 4096, 4096), (16, 4096, 14336)])))
def test_rms_sums_the_squares_the_product_before_left(rows, N, K, dtype, producer_split, consumer):
    """squares=True: a product with the block's skip add also leaves its output rows' sums of
    squares (a column tile each; K slices: the last slice's); a folded norm's product of that
    output (rms_eps) sums those instead of squaring its input: the same values as squaring
    (a clone of the output, whose squares nobody left, does that), and it does read them
    (partials scaled change the result). A later product with the producer's weight takes
    the claim away from the first output; an output changed in place loses it."""
    x, w, _ = inputs(rows, N, K, dtype, ("squares", rows, N, K, dtype))
    r = torch.randn(rows, N, device=DEVICE, dtype=torch.float32).to(dtype) * 3
    pcfg = dict(config(rows, N, K, 4), SPLIT_K=producer_split, BLOCK_K=32)
    h = skinny_linear(x, w, residual=r, squares=True, cfg=pcfg)
    partials = skinny.row_squares(h)
    assert partials is not None and partials.shape == (triton_cdiv(N, pcfg["BLOCK_N"]), 16)
    want_sq = h.float().pow(2).sum(-1)
    assert rel_err(partials.sum(0)[:rows], want_sq) < 1e-5
    assert skinny.row_squares(h.clone()) is None and skinny.row_squares(x) is None
    swiglu = consumer in ("swiglu", "swiglu-narrow")
    _, w2, b2 = inputs(rows, 2 * 96 if swiglu else 96, N, dtype, ("consumer", consumer, rows, N))
    cfg = dict(config(rows, 96, N, 4), SPLIT_K=2 if consumer == "split" else 1, BLOCK_K=32)
    if consumer == "swiglu-narrow":
        cfg.update(BLOCK_N=32)
    got = skinny_linear(h, w2, b2, cfg=cfg, swiglu=swiglu, rms_eps=1e-5)
    squared = skinny_linear(h.clone(), w2, b2, cfg=cfg, swiglu=swiglu, rms_eps=1e-5)
    want = skinny_linear_ref(h, w2, b2, swiglu=swiglu, rms_eps=1e-5)
    assert rel_err(got, want) < 2 * TOL[dtype] and rel_err(got, squared) < 2 * TOL[dtype]
    partials.mul_(4)  # read: each row's scale halves
    assert rel_err(skinny_linear(h, w2, b2, cfg=cfg, swiglu=swiglu, rms_eps=1e-5), want) > 0.2
    h2 = skinny_linear(x, w, residual=r, squares=True, cfg=pcfg)
    assert skinny.row_squares(h) is None and skinny.row_squares(h2) is not None
    h2.mul_(2)  # changed in place since: its squares are stale
    assert skinny.row_squares(h2) is None


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("linear,handoff,tiles", [(False, True, None), (True, False, None), (True, True, None),
                                                  (True, True, dict(BLOCK_N=32, SPLIT_K=2))])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_folded_norms_give_the_same_model(family, linear, handoff, tiles, make_checkpoint, monkeypatch):
    """Transformer.fold_norms: the norms' weights in wqkv's and w13's columns, the norms at
    ones. Through torch's ops (linear off: the norms as before, weight ones) or the few-rows
    path (on, fused kernels: the blocks' norms inside the products, the skips in them; with
    KernelOptions.squares_from_products each norm's sums of squares left by the product
    before, but the first layer's), fp32 logits of a prompt, a decode step and a 5-token
    verification match the unfolded model; also with every product's tiles replaced
    (KernelOptions.skinny_tiles: 32-row tiles in two K slices, the partial squares then in
    more column tiles and the folded norms' products split)."""
    import specoff

    path = make_checkpoint(family)
    plain = specoff.load_model(path, device=DEVICE, dtype=torch.float32)
    folded = specoff.load_model(path, device=DEVICE, dtype=torch.float32)
    with torch.no_grad():  # norms of unlike weights, so folding them matters
        for model in (plain, folded):
            for i, layer in enumerate(model.layers):
                for norm in (layer.attention_norm, layer.ffn_norm):
                    norm.weight.copy_(torch.linspace(0.5, 2.0 + i, norm.weight.numel()))
    assert folded.fold_norms() == len(folded.layers) and folded.fold_norms() == len(folded.layers)
    first = folded.layers[0]
    replaced = tuple((tuple(m.weight.shape), tuple(tiles.items())) for m in (
        first.attention.wqkv, first.attention.wo, first.feed_forward.w13, first.feed_forward.w2)) if tiles else ()
    for model in (plain, folded):
        model.use_kernels(kernel_options(fused_elementwise=linear, skinny_products=linear,
                                         squares_from_products=handoff, skinny_tiles=replaced))
    assert all(bool((layer.ffn_norm.weight == 1).all()) for layer in folded.layers)
    gen = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(family.encode()))
    ids = torch.randint(3, plain.config.vocab_size, (3, 17), device=DEVICE, generator=gen)
    steps = []
    real = skinny._skinny_into
    handed = []
    monkeypatch.setattr(skinny, "_skinny_into",
                        lambda *a, **k: (steps.append(a[7]), handed.append(a[9] is not None), real(*a, **k))[2])

    for got, want in zip(prompt_step_verify(folded, ids), prompt_step_verify(plain, ids)):
        assert rel_err(got, want) < 1e-5
    assert (1e-5 in steps or plain.config.rms_norm_eps in steps) == linear
    # a folded layer's two norms a step: the first layer's wqkv squares its own input
    n = len(folded.layers)
    assert sum(handed) == (2 * (2 * n - 1) if linear and handoff else 0)


def test_skinny_takes_leading_dims_and_strided_rows():
    """(B, T, K) input, a strided view (a slice of a wider tensor), 128-row weight tiles."""
    x, w, b = inputs(6, 96, 200, torch.float32, "views")
    wide = torch.randn(2, 3, 208, device=DEVICE)
    view = wide[..., 4:204]
    got = skinny_linear(view, w, b, cfg=dict(config(6, 96, 200, 4), BLOCK_N=128, BLOCK_K=32, SPLIT_K=2))
    assert got.shape == (2, 3, 96)
    assert rel_err(got, skinny_linear_ref(view, w, b)) < TOL[torch.float32]


def test_config_splits_only_narrow_short_products():
    """On 132 SMs: a small draft's wo (Qwen2.5-0.5B: 896 columns, 14 tiles) in two K slices;
    Mistral-7B's wo (64 tiles, timed whole in the step), wqkv (96 tiles), w13, the head and
    w2 (K 14336) whole; 256-wide K steps where the tiles are under one wave (wo, wqkv, w2),
    128 else; five stages for w2's long K, four else."""
    assert config(1, 896, 896, 132)["SPLIT_K"] == 2 and config(1, 896, 896, 132)["BLOCK_K"] == 256
    for N, K, block_k in ((4096, 4096, 256), (6144, 4096, 256), (28672, 4096, 128), (32000, 4096, 128),
                          (4096, 14336, 256)):
        assert config(16, N, K, 132)["SPLIT_K"] == 1 and config(16, N, K, 132)["BLOCK_K"] == block_k
        assert config(16, N, K, 132)["num_stages"] == (5 if K == 14336 else 4)


def test_config_fits_the_shared_memory():
    """The stages' tiles fit the device's shared memory: fp32's 256-wide K steps (320 KB at 4
    stages) go to 128 on Hopper's 227 KB; 99 KB (consumer GPUs) keeps bf16's 128-wide
    steps at 4 stages, fp32 at 64-wide; the SwiGLU's two-product tiles (128 weight rows)
    as well."""
    HOPPER = 227 * 1024
    def need(c, rows=64, size=2):
        return c["num_stages"] * (rows + c["BLOCK_M"]) * c["BLOCK_K"] * size

    assert config(1, 4096, 4096, 132, 4, HOPPER)["BLOCK_K"] == 128
    assert config(1, 4096, 4096, 132, 2, HOPPER)["BLOCK_K"] == 256
    for size, shared in ((2, HOPPER), (4, HOPPER), (2, 99 * 1024), (4, 99 * 1024), (4, 48 * 1024)):
        for N, K in ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)):
            c = config(4, N, K, 132, size, shared)
            assert need(c, size=size) <= shared and c["num_stages"] >= 2
    c = skinny._fit(dict(config(4, 28672, 4096, 132), BLOCK_N=64), 128, 4, 99 * 1024)
    assert need(c, 128, 4) <= 99 * 1024 and c["BLOCK_K"] == 64 and c["num_stages"] == 2


def test_skinny_refuses_what_it_cannot_take():
    x, w, _ = inputs(2, 8, 16, torch.float32, "refuse")
    with pytest.raises(AssertionError, match="features"):
        skinny_linear(x[:, :12], w)
    with pytest.raises(AssertionError, match="one float dtype"):
        skinny_linear(x, w.half())
    with pytest.raises(AssertionError, match="at most 16 rows"):
        skinny_linear(torch.randn(17, 16, device=DEVICE), w)


def test_usable_follows_rows_and_dtype():
    """Up to MAX_ROWS rows of one float dtype with W, on W's device (which devices run it is
    KernelOptions.runs's choice: the decoder asks both)."""
    x, w, _ = inputs(16, 8, 16, torch.float32, "usable")
    assert skinny.usable(x, w) and skinny.usable(x[:1], w) and not skinny.usable(x[:0], w)
    assert not skinny.usable(torch.randn(skinny.MAX_ROWS + 1, 16, device=DEVICE), w)
    assert not skinny.usable(x.half(), w)
    assert not skinny.usable(x, w[None])  # W a matrix
    if DEVICE == "cuda":
        assert not skinny.usable(x.cpu(), w)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=gpu)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_projections_through_the_kernel(family, dtype, fused, make_checkpoint, monkeypatch):
    """The decoder's projections with KernelOptions.skinny_products on (the interpreter on the
    CPU) against torch's products: the prompt (3 rows x 11, more than MAX_ROWS: torch's), a
    decode step (3 rows) and a 5-token verification (15 rows) through the kernel; qwen2 has
    q/k/v biases. With the fused element-wise kernels the FFN's gate-up launch forms silu ·
    up itself (swiglu) and the down projection's adds the block's skip."""
    import specoff

    model = specoff.load_model(make_checkpoint(family), device=DEVICE, dtype=dtype)
    gen = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(family.encode()))
    ids = torch.randint(3, model.config.vocab_size, (3, 17), device=DEVICE, generator=gen)
    calls, swiglu = [], []
    real = skinny._skinny_into

    def spy(*a, **k):
        calls.append(a[0].shape[0])
        swiglu.append(bool(a[5] if len(a) > 5 else k.get("swiglu")))
        return real(*a, **k)

    monkeypatch.setattr(skinny, "_skinny_into", spy)

    model.use_kernels(kernel_options(fused_elementwise=fused, skinny_products=False))
    expected = prompt_step_verify(model, ids)
    assert not calls
    model.use_kernels(kernel_options(fused_elementwise=fused, skinny_products=True))
    got = prompt_step_verify(model, ids)
    assert calls and set(calls) == {3, 15}  # the decode step's and the verification's rows
    assert any(swiglu) == fused
    for g, want in zip(got, expected):
        assert rel_err(g, want) < (1e-5 if dtype == torch.float32 else TOL[dtype])


@gpu
def test_gpu_split_slices_race_to_one_exact_sum():
    """Many launches of a 4096-wide product in 8 K slices: whichever slice arrives last adds
    them in slice order, so every launch gives the same bits, within bf16 of the reference."""
    x, w, _ = inputs(4, 4096, 14336, torch.bfloat16, "race")
    cfg = dict(config(4, 4096, 14336, 132), SPLIT_K=8)  # forced: the config keeps this K whole
    first = skinny_linear(x, w, cfg=cfg)
    assert rel_err(first, skinny_linear_ref(x, w)) < TOL[torch.bfloat16]
    for _ in range(50):
        assert torch.equal(skinny_linear(x, w, cfg=cfg), first)


@gpu
def test_gpu_skinny_in_a_cuda_graph():
    """Captured and replayed, K split (the partials' buffer and the counts inside the graph):
    each replay equals the eager product, replays leave the counts at zero."""
    x, w, b = inputs(8, 4096, 4096, torch.bfloat16, "graph")
    expect = skinny_linear(x, w, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_linear(x, w, b)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect)
    assert int(skinny._COUNTS[(str(w.device), w.data_ptr())].abs().sum()) == 0


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("spec", ["chain", "tree"])
def test_speculation_with_the_decode_fusions_equals_target(spec, fold, pairs, monkeypatch):
    """The few-rows products and the cache write in the rotary launch on (with the fused
    element-wise kernels: the interpreter on the CPU; fp32, so every path rounds alike):
    greedy speculation, chain or tree, one row at a time (the draft's decode steps at 1 row,
    verification at ≤ 16 through the kernels), gives the target's own greedy tokens; `fold`:
    the draft's norms folded into its products (KernelOptions.fold_draft_norms), normalised
    inside the kernel, and the rotary, cache write and chain attention as one launch
    (.fused_rope_attention, the chain kernel on)."""
    import specoff
    from specoff.models import decoder

    options = kernel_options(fused_elementwise=True, skinny_products=True, chain_attention=fold or DEVICE == "cuda",
                             fused_rope_attention=fold, fold_draft_norms=fold)
    fused_steps = []
    real_rva = decoder.rope_verify_attention
    monkeypatch.setattr(decoder, "rope_verify_attention",
                        lambda *a, **k: (fused_steps.append(1), real_rva(*a, **k))[1])
    calls = []
    real = skinny._skinny_into
    monkeypatch.setattr(skinny, "_skinny_into",
                        lambda *a, **k: (calls.append(len(a) > 7 and a[7] is not None), real(*a, **k))[1])
    draft, target = pairs(0.3)
    prompts = ["def fibonacci(n):"] if DEVICE == "cpu" else ["def fibonacci(n):", "Beautiful is better than"]
    params = specoff.SamplingParams(max_new_tokens=12 if DEVICE == "cpu" else 24, ignore_eos=True)
    expect = [o.token_ids for o in specoff.LLM(target, device=DEVICE, dtype="float32").generate(prompts, params)]
    kw = dict(spec="tree", tree_budget=8) if spec == "tree" else dict(draft_len=3)
    llm = specoff.LLM(target, draft=draft, device=DEVICE, dtype="float32", max_rows=1,
                      kernels=options, **kw)
    assert all(layer.folded == fold for layer in llm.draft_model.layers)
    assert llm.model.kernels is options and llm.draft_model.layers[0].attention.kernels is options
    assert [o.token_ids for o in llm.generate(prompts, params)] == expect
    assert calls and any(calls) == fold  # the kernel ran; normalising rows only in the folded draft
    assert bool(fused_steps) == fold
