"""Fused RMSNorm (alone and after a residual add), rotary embedding and SwiGLU kernels against
their plain-torch references.

On the CPU the kernels run in Triton's interpreter (fp32/fp16); bf16, model-sized shapes,
bit-equality with torch's CUDA kernels, Inductor and CUDA-graph capture run under the
`gpu` marker. Outputs start as NaN, so an element a kernel never writes fails.
"""
import zlib

import pytest
import torch
from conftest import DEVICE, TOL, dtype_cases, gpu, rel_err

from specoff.kernels.fused import (add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref, rope, rope_ref, rope_write,
                                   silu_mul, silu_mul_ref)
from specoff.models import decoder

from kernel_options import kernel_options

# Last-place distance allowed where the fp32 sum of squares runs in another order than torch's
# (16-bit: the normalised x off by one ulp can be two after the product with the weight).
RMS_NORM_ULPS = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 2}


def generator(*case):
    return torch.Generator(device=DEVICE).manual_seed(zlib.crc32(repr(case).encode()))


def ulps(out, ref):
    """Element-wise distance in units in the last place of the dtype."""
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[out.dtype]
    magnitude = torch.iinfo(bits).max

    def ordered(x):  # sign-magnitude bit patterns onto one increasing integer line
        i = x.contiguous().view(bits).to(torch.int64)
        return torch.where(i < 0, -(i & magnitude), i)
    return (ordered(out) - ordered(ref)).abs()


def nan_like(x):
    return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------
# rms_norm

RMS_CPU = [(1, 128), (33, 511), (222, 128)]
RMS_GPU = [(1, 4096), (16, 4096), (33, 511), (222, 128), (5, 14336)]


@pytest.mark.parametrize("rows,hidden,dtype", list(dtype_cases(RMS_CPU, RMS_GPU)))
def test_rms_norm_matches_ref(rows, hidden, dtype):
    gen = generator(rows, hidden, dtype)
    x = (3 * torch.randn(rows, hidden, device=DEVICE, generator=gen)).to(dtype)
    weight = (1 + 0.2 * torch.randn(hidden, device=DEVICE, generator=gen)).to(dtype)
    ref = rms_norm_ref(x, weight, 1e-5)
    out = nan_like(x)
    rms_norm(x, weight, 1e-5, out=out)
    assert rel_err(out, ref) < TOL[dtype]
    diff = ulps(out, ref)
    assert diff.max() <= RMS_NORM_ULPS[dtype], f"{diff.max()} ulps"
    if dtype != torch.float32:  # a last-bit difference only next to a rounding boundary
        assert (diff > 0).sum() <= max(2, 1e-3 * diff.numel())
    assert torch.equal(rms_norm(x, weight, 1e-5), out)  # the allocating path


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_over_heads_of_a_qkv_view(head_dim, dtype):
    """Qwen3's q_norm: rows are the heads of q split from the fused projection (no copy)."""
    B, T, H, KV = 2, 5, 4, 2
    gen = generator(head_dim, dtype)
    qkv = torch.randn(B, T, (H + 2 * KV) * head_dim, device=DEVICE, generator=gen).to(dtype)
    q = qkv[..., :H * head_dim].view(B, T, H, head_dim)
    weight = (1 + 0.2 * torch.randn(head_dim, device=DEVICE, generator=gen)).to(dtype)
    out = nan_like(q)
    rms_norm(q, weight, 1e-6, out=out)
    assert ulps(out, rms_norm_ref(q, weight, 1e-6)).max() <= RMS_NORM_ULPS[dtype]


def test_rms_norm_promotes_to_the_weight_dtype():
    """fp16 x with an fp32 weight: normalised and rounded to fp16, then scaled in fp32, as torch promotes."""
    x = torch.randn(7, 96, device=DEVICE, generator=generator("promote")).half()
    weight = 1 + 0.2 * torch.randn(96, device=DEVICE, generator=generator("weight"))
    out = rms_norm(x, weight, 1e-5)
    ref = rms_norm_ref(x, weight, 1e-5)
    assert out.dtype == ref.dtype == torch.float32
    # x_normed may differ in its last fp16 bit: up to 2**-11 relative after the exact fp32 scaling.
    assert ((out - ref).abs() <= 2**-10 * ref.abs()).all()


# ---------------------------------------------------------------------------------------
# add_rms_norm

ADD_RMS_GPU = [(1, 4096), (4, 4096), (16, 4096), (33, 511), (222, 128)]


def add_rms_norm_inputs(rows, hidden, dtype, *case):
    """x like an attention output; the residual over a wide range of magnitudes, so that many
    sums round (and some cancel)."""
    gen = generator("add", rows, hidden, dtype, *case)
    x = (3 * torch.randn(rows, hidden, device=DEVICE, generator=gen)).to(dtype)
    scale = torch.exp2(torch.randint(-16, 8, (rows, hidden), device=DEVICE, generator=gen).float())
    residual = (scale * torch.randn(rows, hidden, device=DEVICE, generator=gen)).to(dtype)
    weight = (1 + 0.2 * torch.randn(hidden, device=DEVICE, generator=gen)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("rows,hidden,dtype", list(dtype_cases(RMS_CPU, ADD_RMS_GPU)))
def test_add_rms_norm_matches_ref(rows, hidden, dtype):
    """h bit-equal to torch's x + residual; the norm of h as rms_norm's, to the bit."""
    x, residual, weight = add_rms_norm_inputs(rows, hidden, dtype)
    ref, h_ref = add_rms_norm_ref(x, residual, weight, 1e-5)
    out, h = nan_like(x), nan_like(x)
    add_rms_norm(x, residual, weight, 1e-5, out=out, residual_out=h)
    assert torch.equal(h, h_ref)
    assert rel_err(out, ref) < TOL[dtype]
    assert ulps(out, ref).max() <= RMS_NORM_ULPS[dtype]
    assert torch.equal(out, rms_norm(h_ref, weight, 1e-5))  # one normalisation code for both kernels
    out_alloc, h_alloc = add_rms_norm(x, residual, weight, 1e-5)  # the allocating path
    assert torch.equal(out_alloc, out) and torch.equal(h_alloc, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_keeps_leading_dims_and_strides(dtype):
    """(B, T, D) in, contiguous (B, T, D) out, from an x whose rows are padded."""
    B, T, D = 2, 3, 96
    x, residual, weight = add_rms_norm_inputs(B * T, D, dtype, "strided")
    padded = torch.cat([x, torch.zeros_like(x[:, :8])], dim=1).view(B, T, D + 8)
    x, residual = padded[..., :D], residual.view(B, T, D)
    out, h = add_rms_norm(x, residual, weight, 1e-6)
    ref, h_ref = add_rms_norm_ref(x, residual, weight, 1e-6)
    assert out.shape == h.shape == (B, T, D) and out.is_contiguous() and h.is_contiguous()
    assert torch.equal(h, h_ref) and ulps(out, ref).max() <= RMS_NORM_ULPS[dtype]


# ---------------------------------------------------------------------------------------
# rope

# (B, T, H, KV, head_dim): B * T = 1, 33, 222 tokens
ROPE_CPU = [(1, 1, 4, 2, 64), (3, 11, 4, 2, 128), (2, 111, 4, 1, 64)]
ROPE_GPU = [(1, 1, 32, 8, 128), (16, 1, 32, 8, 128), (3, 11, 4, 2, 128), (2, 111, 28, 4, 128), (4, 5, 16, 16, 64)]


def rope_inputs(B, T, H, KV, hd, dtype, split=True):
    """q, k as views of one fused QKV projection (or contiguous), cos and sin as Transformer.rope makes them."""
    gen = generator(B, T, H, KV, hd, dtype)
    if split:
        qkv = torch.randn(B, T, (H + 2 * KV) * hd, device=DEVICE, generator=gen).to(dtype)
        q = qkv[..., :H * hd].view(B, T, H, hd)
        k = qkv[..., H * hd:(H + KV) * hd].view(B, T, KV, hd)
    else:
        q = torch.randn(B, T, H, hd, device=DEVICE, generator=gen).to(dtype)
        k = torch.randn(B, T, KV, hd, device=DEVICE, generator=gen).to(dtype)
    positions = torch.randint(0, 4096, (B, T), device=DEVICE, generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=DEVICE).float() / hd))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, hd)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("B,T,H,KV,hd,dtype", list(dtype_cases(ROPE_CPU, ROPE_GPU)))
def test_rope_bit_equal_to_torch(B, T, H, KV, hd, dtype):
    """Each product and the sum rounded to the dtype, as torch's three kernels: equal to the last bit."""
    q, k, cos, sin = rope_inputs(B, T, H, KV, hd, dtype)
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    q_out, k_out = nan_like(q), nan_like(k)
    rope(q, k, cos, sin, out=(q_out, k_out))
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    q_alloc, k_alloc = rope(q, k, cos, sin)
    assert q_alloc.is_contiguous() and torch.equal(q_alloc, q_ref) and torch.equal(k_alloc, k_ref)


@pytest.mark.parametrize("B,T,H,KV,hd,dtype", list(dtype_cases(ROPE_CPU, ROPE_GPU)))
def test_rope_write_is_rope_then_cache_write(B, T, H, KV, hd, dtype):
    """rope_write: q as rope's (returned), k as rope's and v as given, stored in one layer of
    a KVCache at the rows' positions (one past the end clamped to the last slot, as
    KVCache.write clamps it), every other slot untouched: bit-equal to rope then write."""
    from specoff.kvcache import KVCache

    q, k, cos, sin = rope_inputs(B, T, H, KV, hd, dtype)
    v = torch.randn(B, T, KV, hd, device=DEVICE, generator=generator("v", B, T)).to(dtype)
    S = T + 6
    positions = torch.arange(T, device=DEVICE)[None, :] + torch.arange(B, device=DEVICE)[:, None] % 7
    positions[-1, -1] = S  # past the end: the last slot
    caches = [KVCache(2, B, S, KV, hd, dtype, DEVICE) for _ in range(2)]
    for c in caches:
        c.k.normal_(generator=generator("k", B)), c.v.normal_(generator=generator("v", B))
    caches[1].k.copy_(caches[0].k), caches[1].v.copy_(caches[0].v)
    q_ref, k_ref = rope_ref(q, k, cos, sin)
    caches[0].write(1, k_ref.transpose(1, 2), v.transpose(1, 2), positions)
    q_out = rope_write(q, k, v, cos, sin, caches[1].k[1], caches[1].v[1], positions)
    assert q_out.is_contiguous() and torch.equal(q_out, q_ref)
    assert torch.equal(caches[1].k, caches[0].k) and torch.equal(caches[1].v, caches[0].v)


def test_rope_write_refuses_a_cache_in_another_dtype():
    from specoff.kvcache import KVCache

    q, k, cos, sin = rope_inputs(1, 2, 4, 2, 64, torch.float32)
    cache = KVCache(1, 1, 4, 2, 64, torch.float16, DEVICE)
    with pytest.raises(AssertionError, match="activations' dtype"):
        rope_write(q, k, k, cos, sin, cache.k[0], cache.v[0], torch.zeros(1, 2, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_q_alone_and_broadcast_cos(dtype):
    """k None (one tensor a launch), contiguous q, cos and sin shared by the rows: (1, T, 1, hd)."""
    q, _, cos, sin = rope_inputs(1, 9, 4, 2, 64, dtype, split=False)
    q = q.expand(3, -1, -1, -1)
    q_out, k_out = rope(q, None, cos, sin)
    assert k_out is None and torch.equal(q_out, rope_ref(q, None, cos, sin)[0])


# ---------------------------------------------------------------------------------------
# silu_mul

SILU_CPU = [(1, 128), (33, 511), (222, 128)]
SILU_GPU = [(1, 14336), (16, 14336), (33, 511), (222, 128), (7, 1000)]


@pytest.mark.parametrize("rows,inter,dtype", list(dtype_cases(SILU_CPU, SILU_GPU)))
def test_silu_mul_matches_ref(rows, inter, dtype):
    gen = generator(rows, inter, dtype)
    gate_up = (4 * torch.randn(rows, 2 * inter, device=DEVICE, generator=gen)).to(dtype)
    ref = silu_mul_ref(gate_up)
    out = nan_like(ref)
    silu_mul(gate_up, out=out)
    assert rel_err(out, ref) < TOL[dtype]
    # The interpreter's numpy exp may differ from torch's in a last fp32 bit (two 16-bit ulps after
    # the product with up); on a GPU both use CUDA's expf.
    assert ulps(out, ref).max() <= (0 if DEVICE == "cuda" else 8 if dtype == torch.float32 else 2)
    assert torch.equal(silu_mul(gate_up), out)


def test_silu_mul_keeps_leading_dims_and_strides():
    """(B, T, 2I) in, (B, T, I) out, from a gate_up view with padded rows."""
    padded = torch.randn(2, 3, 2 * 40 + 8, device=DEVICE, generator=generator("padded"))
    gate_up = padded[..., :80]
    out = silu_mul(gate_up)
    assert out.shape == (2, 3, 40)
    assert rel_err(out, silu_mul_ref(gate_up)) < TOL[torch.float32]


# ---------------------------------------------------------------------------------------
# Tracing, graphs and the decoder


def elementwise_block(x, weight, q, k, cos, sin, gate_up, residual):
    q, k = rope(q, k, cos, sin)
    return (rms_norm(x, weight, 1e-5), q, k, silu_mul(gate_up)) + add_rms_norm(x, residual, weight, 1e-5)


def block_inputs(dtype):
    gen = generator("block", dtype)
    x = torch.randn(6, 256, device=DEVICE, generator=gen).to(dtype)
    weight = (1 + 0.2 * torch.randn(256, device=DEVICE, generator=gen)).to(dtype)
    q, k, cos, sin = rope_inputs(2, 3, 4, 2, 64, dtype)
    gate_up = torch.randn(6, 384, device=DEVICE, generator=gen).to(dtype)
    residual = torch.randn(6, 256, device=DEVICE, generator=gen).to(dtype)
    return x, weight, q, k, cos, sin, gate_up, residual


def test_compile_fullgraph_traces_the_ops():
    """Dynamo traces the four ops without a graph break (opaque ops on the CPU)."""
    args = block_inputs(torch.float32)
    compiled = torch.compile(elementwise_block, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), elementwise_block(*args)):
        assert torch.equal(got, want)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compile_inductor_matches_eager(dtype):
    torch._dynamo.reset()
    args = block_inputs(dtype)
    compiled = torch.compile(elementwise_block, fullgraph=True)
    for got, want in zip(compiled(*args), elementwise_block(*args)):
        assert torch.equal(got, want)


@gpu
def test_cuda_graph_replay():
    dtype = torch.bfloat16
    static_in = block_inputs(dtype)
    outs = None

    def step():
        nonlocal outs
        outs = elementwise_block(*static_in)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for scale in (2.0, -0.5):
        for buf in static_in:
            buf.mul_(scale)
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        x, weight, q, k, cos, sin, gate_up, residual = static_in
        q_ref, k_ref = rope_ref(q, k, cos, sin)
        assert ulps(outs[0], rms_norm_ref(x, weight, 1e-5)).max() <= RMS_NORM_ULPS[dtype]
        assert torch.equal(outs[1], q_ref) and torch.equal(outs[2], k_ref)
        assert torch.equal(outs[3], silu_mul_ref(gate_up))
        normed_ref, h_ref = add_rms_norm_ref(x, residual, weight, 1e-5)
        assert torch.equal(outs[5], h_ref) and ulps(outs[4], normed_ref).max() <= RMS_NORM_ULPS[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=gpu)])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decoder_fused_matches_torch(family, dtype, make_checkpoint):
    """The decoder with the fused kernels on (the interpreter on the CPU) against its torch path:
    full-sequence logits and cached decode steps (qwen3: q/k norms on the QKV views)."""
    import specoff

    model = specoff.load_model(make_checkpoint(family), device=DEVICE, dtype=dtype)
    ids = torch.randint(3, model.config.vocab_size, (3, 13), device=DEVICE, generator=generator(family))

    def run():
        with torch.inference_mode():
            full = model(ids)
            cache = model.new_cache(3, 16)
            first = model(ids[:, :11], cache)
            cache.advance(11)
            step = model(ids[:, 11:12], cache)
        return full, first, step

    model.use_kernels(kernel_options(fused_elementwise=False))
    expected = run()
    model.use_kernels(kernel_options(fused_elementwise=True))
    for got, want in zip(run(), expected):  # RMSNorm's rare last-bit differences, carried through
        assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else TOL[dtype])


def assert_same_run(run, expected, cache_ref):
    """run() gives the expected logits and cache, bit for bit."""
    got, cache = run()
    for g, want in zip(got, expected):
        assert torch.equal(g, want)
    assert torch.equal(cache.k, cache_ref.k) and torch.equal(cache.v, cache_ref.v)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=gpu)])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decoder_cache_write_in_the_rotary_launch(family, dtype, make_checkpoint, monkeypatch):
    """KernelOptions.fused_cache_write (rope_write: the rotary launch stores k and v) gives
    the same logits and the same cache, bit for bit, as rope then KVCache.write: a prompt, a
    decode step and a 4-token verification of 3 rows (qwen3: q/k norms before the rotary);
    and .fused_rope_attention (the chain's attention in that launch too) the same again."""
    import specoff

    model = specoff.load_model(make_checkpoint(family), device=DEVICE, dtype=dtype)
    ids = torch.randint(3, model.config.vocab_size, (3, 16), device=DEVICE, generator=generator(family, "write"))
    used = []
    real = decoder.rope_write
    monkeypatch.setattr(decoder, "rope_write", lambda *a, **k: (used.append(1), real(*a, **k))[1])

    def run():
        with torch.inference_mode():
            cache = model.new_cache(3, 20)
            out = [model(ids[:, :11], cache)]
            cache.advance(11)
            out.append(model(ids[:, 11:12], cache))
            cache.advance(1)
            out.append(model(ids[:, 12:16], cache))
        return out, cache

    model.use_kernels(kernel_options(fused_elementwise=True, fused_cache_write=False))
    expected, cache_ref = run()
    assert not used
    model.use_kernels(kernel_options(fused_elementwise=True, fused_rope_attention=False))
    assert_same_run(run, expected, cache_ref)
    assert used
    # the rotary, the write and the chain's attention as one launch (the chain kernel on,
    # in the interpreter on the CPU; qwen3's q/k norms keep the two launches): the same bits
    # as the two launches
    model.use_kernels(kernel_options(fused_elementwise=True, chain_attention=True, fused_rope_attention=False))
    expected, cache_ref = run()
    fused = []
    real_rva = decoder.rope_verify_attention
    monkeypatch.setattr(decoder, "rope_verify_attention",
                        lambda *a, **k: (fused.append(1), real_rva(*a, **k))[1])
    model.use_kernels(kernel_options(fused_elementwise=True, chain_attention=True))
    assert_same_run(run, expected, cache_ref)
    assert bool(fused) == (family != "qwen3")
