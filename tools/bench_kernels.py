"""Time the Triton kernels against their references and the fastest plain-torch compositions.

Prints one markdown table per kernel: median time (triton.testing.do_bench), TFLOP/s and GB/s,
and the speed-up over the torch baseline. Shapes are Mixtral-8x7B's and Qwen3-30B-A3B's.

    python3 tools/bench_kernels.py [--only moe|attention] [--no-ref] [--json out.json]

Needs a CUDA GPU. tests/benchmarks/test_bench_kernels.py imports the cases and baselines below.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from specoff.kernels.attention import attention_mask, verify_attention, verify_attention_ref  # noqa: E402
from specoff.kernels.moe import fused_moe, fused_moe_ref, moe_route  # noqa: E402

# name: (hidden D, intermediate I, experts E, top_k) and (heads H, kv heads KV, head_dim)
MOE_SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
ATTN_SHAPES = {"mixtral-8x7b": (32, 8, 128), "qwen3-30b-a3b": (32, 4, 128)}
MOE_TOKENS = (1, 8, 64, 256, 1280)
# (rows B, new tokens T, prefix length, tree?)
ATTN_CASES = ((64, 1, 4096, False), (64, 5, 4096, False), (1, 256, 4096, True), (8, 64, 2048, True))


# ---------------------------------------------------------------------------------------
# Inputs


def moe_inputs(shape: str, tokens: int, dtype=torch.bfloat16, seed=0, weights=None):
    D, I, E, top_k = MOE_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if weights is None:
        w13 = torch.randn(E, 2 * I, D, device="cuda", dtype=dtype, generator=gen) * D**-0.5
        w2 = torch.randn(E, D, I, device="cuda", dtype=dtype, generator=gen) * I**-0.5
        weights = (w13, w2)
    x = torch.randn(tokens, D, device="cuda", dtype=dtype, generator=gen)
    logits = torch.randn(tokens, E, device="cuda", generator=gen)
    topk_weights, topk_ids = moe_route(logits, top_k, renormalize=True)
    return x, *weights, topk_weights, topk_ids


def moe_cost(x, w13, w2, topk_ids):
    """(flops, bytes): weights of the experts actually used, read once, plus activations."""
    pairs = topk_ids.numel()
    D, I = w2.shape[1], w2.shape[2]
    active = torch.unique(topk_ids).numel()
    flops = 2 * pairs * 3 * I * D
    bytes_ = active * 3 * I * D * w13.element_size() + 2 * x.numel() * x.element_size()
    return flops, bytes_


def attention_inputs(shape: str, B: int, T: int, prefix: int, tree: bool, dtype=torch.bfloat16, seed=0):
    H, KV, hd = ATTN_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    S = prefix + T
    q = torch.randn(B, T, H, hd, device="cuda", dtype=dtype, generator=gen)
    k_cache = torch.randn(B, KV, S, hd, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn(B, KV, S, hd, device="cuda", dtype=dtype, generator=gen)
    lengths = torch.full((B,), prefix, device="cuda", dtype=torch.int64)
    tree_mask = None
    if tree:
        parent = [torch.randint(0, max(j, 1), (B,), generator=torch.Generator().manual_seed(seed + j))
                  for j in range(T)]
        mask = torch.zeros(B, T, T, dtype=torch.bool)
        for j in range(T):
            mask[:, j, j] = True
            if j > 0:
                mask[:, j] |= mask[torch.arange(B), parent[j]]
        tree_mask = mask.cuda()
    return q, k_cache, v_cache, lengths, tree_mask


def attention_cost(q, k_cache, lengths):
    """(flops, bytes): K and V of every visible key read once, q read and out written once."""
    B, T, H, hd = q.shape
    KV = k_cache.shape[1]
    keys = int((lengths + T).sum())
    bytes_ = 2 * keys * KV * hd * k_cache.element_size() + 2 * q.numel() * q.element_size()
    flops = 4 * keys * T * H * hd
    return flops, bytes_


# ---------------------------------------------------------------------------------------
# Plain-torch baselines (the fastest compositions we could write; they may sync the host)


def moe_torch_grouped(x, w13, w2, topk_weights, topk_ids):
    """Sort pairs by expert, one torch.mm per used expert on its contiguous group."""
    N, D = x.shape
    top_k = topk_ids.shape[1]
    I = w2.shape[2]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # host sync: group sizes
    xs = x[order // top_k]
    ys = torch.empty_like(xs)
    start = 0
    for e, count in enumerate(counts):
        if count:
            h = torch.mm(xs[start:start + count], w13[e].t())  # (count, 2I)
            ys[start:start + count] = torch.mm(torch.nn.functional.silu(h[:, :I]) * h[:, I:], w2[e].t())
            start += count
    ys *= topk_weights.reshape(-1)[order, None].to(x.dtype)
    out = torch.empty_like(ys)
    out[order] = ys
    return out.view(N, top_k, D).sum(1)


def attention_sdpa(q, k_cache, v_cache, mask):
    """SDPA over the whole cache with a boolean mask built beforehand (GQA without copies)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache, v_cache, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------
# Table


def _time_ms(fn):
    """Eager: host launch cost included, as a caller without CUDA graphs sees it."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def _graph_ms(fn):
    """Replays of a CUDA graph of fn: device time alone, as the engine's captured steps see it."""
    import triton.testing

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")


def bench_moe(with_ref: bool):
    rows = []
    for shape in MOE_SHAPES:
        weights = None
        for tokens in MOE_TOKENS:
            x, w13, w2, topk_weights, topk_ids = moe_inputs(shape, tokens, weights=weights)
            weights = (w13, w2)
            flops, bytes_ = moe_cost(x, w13, w2, topk_ids)
            out = torch.empty_like(x)
            kernel = lambda: fused_moe(x, w13, w2, topk_weights, topk_ids, out=out)  # noqa: E731
            t_kernel, t_graph = _time_ms(kernel), _graph_ms(kernel)
            t_torch = _time_ms(lambda: moe_torch_grouped(x, w13, w2, topk_weights, topk_ids))  # host sync: no graph
            t_ref = _time_ms(lambda: fused_moe_ref(x, w13, w2, topk_weights, topk_ids)) if with_ref else float("nan")
            rows.append(dict(kernel="fused_moe", shape=shape, case=f"tokens={tokens}", ms=t_kernel,
                             graph_ms=t_graph, torch_ms=t_torch, torch_graph_ms=float("nan"), ref_ms=t_ref,
                             tflops=flops / t_graph / 1e9, gbps=bytes_ / t_graph / 1e6))
            print_row(rows[-1])
        del weights
        torch.cuda.empty_cache()
    return rows


def bench_attention(with_ref: bool):
    rows = []
    for shape in ATTN_SHAPES:
        for B, T, prefix, tree in ATTN_CASES:
            q, k_cache, v_cache, lengths, tree_mask = attention_inputs(shape, B, T, prefix, tree)
            S = k_cache.shape[2]
            flops, bytes_ = attention_cost(q, k_cache, lengths)
            mask = attention_mask(lengths, T, S, tree_mask)[:, None]  # (B, 1, T, S)
            out = torch.empty_like(q)
            kernel = lambda: verify_attention(q, k_cache, v_cache, lengths, tree_mask, kv_len=S, out=out)  # noqa: E731
            t_kernel, t_graph = _time_ms(kernel), _graph_ms(kernel)
            sdpa = lambda: attention_sdpa(q, k_cache, v_cache, mask)  # noqa: E731
            t_torch, t_torch_graph = _time_ms(sdpa), _graph_ms(sdpa)
            t_ref = (_time_ms(lambda: verify_attention_ref(q, k_cache, v_cache, lengths, tree_mask))
                     if with_ref else float("nan"))
            case = f"B={B} T={T} prefix={prefix} {'tree' if tree else 'chain'}"
            rows.append(dict(kernel="verify_attention", shape=shape, case=case, ms=t_kernel,
                             graph_ms=t_graph, torch_ms=t_torch, torch_graph_ms=t_torch_graph, ref_ms=t_ref,
                             tflops=flops / t_graph / 1e9, gbps=bytes_ / t_graph / 1e6))
            print_row(rows[-1])
            del q, k_cache, v_cache, mask
            torch.cuda.empty_cache()
    return rows


def print_header():
    print("ms are medians; 'graph' = CUDA-graph replay (device time). TFLOP/s and GB/s use the kernel's graph "
          "time; × torch = best torch time (eager or graph) / kernel graph time.")
    print("| kernel | shape | case | kernel ms | kernel graph ms | torch ms | torch graph ms | ref ms "
          "| TFLOP/s | GB/s | × torch |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)


def print_row(r):
    best_torch = min(t for t in (r["torch_ms"], r["torch_graph_ms"]) if not math.isnan(t))
    print(f"| {r['kernel']} | {r['shape']} | {r['case']} | {r['ms']:.4f} | {r['graph_ms']:.4f} | "
          f"{r['torch_ms']:.4f} | {r['torch_graph_ms']:.4f} | {r['ref_ms']:.3f} | {r['tflops']:.1f} | "
          f"{r['gbps']:.0f} | {best_torch / r['graph_ms']:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["moe", "attention"])
    parser.add_argument("--no-ref", action="store_true", help="skip the slow float32 references")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print_header()  # rows print as they are measured
    rows = []
    if args.only in (None, "moe"):
        rows += bench_moe(not args.no_ref)
    if args.only in (None, "attention"):
        rows += bench_attention(not args.no_ref)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
