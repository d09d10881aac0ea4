"""pytest-benchmark timings of the Triton kernels vs their references and plain torch (GPU only).

Shapes: Mixtral-8x7B and Qwen3-30B-A3B. Each timed call ends with a CUDA synchronize; TFLOP/s
and GB/s go to benchmark.extra_info. Cases and baselines come from tools/bench_kernels.py.
"""
import importlib.util
import os

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "bench_kernels", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "bench_kernels.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

pytestmark = pytest.mark.gpu

MOE_IMPLS = ("triton", "torch_grouped", "ref")
ATTN_IMPLS = ("triton", "sdpa_masked", "ref")


def run_timed(benchmark, fn, flops, bytes_):
    def timed():
        fn()
        torch.cuda.synchronize()

    timed()  # compile and warm up outside the timing
    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(tflops=flops / seconds / 1e12, gbps=bytes_ / seconds / 1e9)


@pytest.fixture(scope="module")
def moe_weights():
    cache = {}

    def get(shape):
        if shape not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            _, w13, w2, _, _ = bench.moe_inputs(shape, 1)
            cache[shape] = (w13, w2)
        return cache[shape]
    yield get
    cache.clear()


@pytest.mark.parametrize("impl", MOE_IMPLS)
@pytest.mark.parametrize("tokens", bench.MOE_TOKENS)
@pytest.mark.parametrize("shape", list(bench.MOE_SHAPES))
def test_bench_fused_moe(benchmark, moe_weights, shape, tokens, impl):
    x, w13, w2, topk_weights, topk_ids = bench.moe_inputs(shape, tokens, weights=moe_weights(shape), seed=tokens)
    flops, bytes_ = bench.moe_cost(x, w13, w2, topk_ids)
    out = torch.empty_like(x)
    fn = {
        "triton": lambda: bench.fused_moe(x, w13, w2, topk_weights, topk_ids, out=out),
        "torch_grouped": lambda: bench.moe_torch_grouped(x, w13, w2, topk_weights, topk_ids),
        "ref": lambda: bench.fused_moe_ref(x, w13, w2, topk_weights, topk_ids),
    }[impl]
    benchmark.group = f"fused_moe {shape} tokens={tokens}"
    run_timed(benchmark, fn, flops, bytes_)
    assert torch.isfinite(fn()).all()


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("B,T,prefix,tree", bench.ATTN_CASES)
@pytest.mark.parametrize("shape", list(bench.ATTN_SHAPES))
def test_bench_verify_attention(benchmark, shape, B, T, prefix, tree, impl):
    q, k_cache, v_cache, lengths, tree_mask = bench.attention_inputs(shape, B, T, prefix, tree)
    S = k_cache.shape[2]
    flops, bytes_ = bench.attention_cost(q, k_cache, lengths)
    mask = bench.attention_mask(lengths, T, S, tree_mask)[:, None]  # (B, 1, T, S)
    out = torch.empty_like(q)
    fn = {
        "triton": lambda: bench.verify_attention(q, k_cache, v_cache, lengths, tree_mask, kv_len=S, out=out),
        "sdpa_masked": lambda: bench.attention_sdpa(q, k_cache, v_cache, mask),
        "ref": lambda: bench.verify_attention_ref(q, k_cache, v_cache, lengths, tree_mask),
    }[impl]
    benchmark.group = f"verify_attention {shape} B={B} T={T} prefix={prefix} tree={tree}"
    run_timed(benchmark, fn, flops, bytes_)
    assert torch.isfinite(fn()).all()


@pytest.mark.parametrize("impl", ("triton", "sdpa_padded"))
@pytest.mark.parametrize("prompts", bench.PREFILL_PROMPTS)
@pytest.mark.parametrize("shape", list(bench.ATTN_SHAPES))
def test_bench_packed_prefill_attention(benchmark, shape, prompts, impl):
    q, k, v, seg_start, lengths = bench.packed_prefill_inputs(shape, prompts)
    flops, bytes_ = bench.packed_prefill_cost(q, k, lengths)
    if impl == "triton":
        zero, out, N = torch.zeros(1, dtype=torch.long, device="cuda"), torch.empty_like(q), q.shape[1]
        fn = lambda: bench.verify_attention(q, k, v, zero, kv_len=N, out=out, seg_start=seg_start)  # noqa: E731
    else:
        qp, kp, vp = bench.packed_prefill_padded(q, k, v, lengths)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            qp, kp, vp, is_causal=True, enable_gqa=True)
    benchmark.group = f"packed_prefill_attention {shape} prompts={prompts}"
    run_timed(benchmark, fn, flops, bytes_)
    assert torch.isfinite(fn()).all()


FP8_IMPLS = ("triton", "dequantize", "bf16")
FP8_SHAPES = {"mistral-7b w13": (28672, 4096), "mistral-7b wo": (4096, 4096),
              "mistral-7b w2": (4096, 14336)}


@pytest.mark.parametrize("impl", FP8_IMPLS)
@pytest.mark.parametrize("rows", [1, 16, 64, 512])
@pytest.mark.parametrize("shape", list(FP8_SHAPES))
def test_bench_fp8_linear(benchmark, shape, rows, impl):
    """A draft's product with its weight in float8: the Triton kernel (1 byte a weight read),
    quant.Fp8Linear's dequantizing path, and the bf16 weight it replaced."""
    from specoff.kernels.fp8_gemm import _fp8_linear_into
    from specoff.quant import fp8_rows

    N, K = FP8_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(rows)
    w = (torch.randn(N, K, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    w8, scale = fp8_rows(w)
    scale = scale.to(torch.bfloat16)
    x = torch.randn(rows, K, device="cuda", generator=gen).to(torch.bfloat16)
    out = torch.empty(rows, N, device="cuda", dtype=torch.bfloat16)
    fn = {
        "triton": lambda: _fp8_linear_into(x, w8, scale, out),
        "dequantize": lambda: torch.nn.functional.linear(x, w8.to(x.dtype)) * scale,
        "bf16": lambda: torch.nn.functional.linear(x, w),
    }[impl]
    weight_bytes = N * K * (2 if impl == "bf16" else 1)
    benchmark.group = f"fp8_linear {shape} rows={rows}"
    run_timed(benchmark, fn, 2 * rows * N * K, weight_bytes + 2 * rows * (N + K))
    assert torch.isfinite(fn()).all()


@pytest.mark.parametrize("impl", ("triton", "torch"))
@pytest.mark.parametrize("rows", bench.SKINNY_ROWS)
@pytest.mark.parametrize("shape", list(bench.SKINNY_SHAPES))
def test_bench_skinny_linear(benchmark, shape, rows, impl):
    """The draft's decode products (Mistral-7B shapes, bf16): the few-rows kernel
    (kernels/skinny.py) against torch's dense product."""
    from specoff.kernels.skinny import _skinny_into

    N, K = bench.SKINNY_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(rows)
    w = (torch.randn(N, K, device="cuda", generator=gen) * K**-0.5).to(torch.bfloat16)
    x = torch.randn(rows, K, device="cuda", generator=gen).to(torch.bfloat16)
    out = torch.empty(rows, N, device="cuda", dtype=torch.bfloat16)
    fn = {"triton": lambda: _skinny_into(x, w, None, out),
          "torch": lambda: torch.mm(x, w.t(), out=out)}[impl]
    benchmark.group = f"skinny_linear mistral-7b {shape} rows={rows}"
    run_timed(benchmark, fn, 2 * rows * N * K, 2 * (N * K + rows * (N + K)))
    assert torch.isfinite(fn()).all()
