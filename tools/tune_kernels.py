"""Tune the fused-MoE launch parameters offline on a GPU and write specoff/kernels/configs/*.json.

For each token count, every BLOCK_M is tried with a grid of (BLOCK_N, BLOCK_K, GROUP_M, warps,
stages) for each of the two grouped GEMMs (gate-up: N_out = 2I, K = D; down: N_out = D, K = I);
the BLOCK_M with the lowest summed median time wins (both launches share one grouping). The
files are keyed like vLLM's: E, N_out, K, device name, dtype; moe.get_config picks the entry
with the nearest token count.

    python3 tools/tune_kernels.py --shape mixtral-8x7b [--tokens 1 8 64 256 1280] [--quick]
    python3 tools/tune_kernels.py --D 4096 --I 14336 --E 8 --top-k 2
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from specoff.kernels import moe  # noqa: E402

SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def search_space(quick: bool):
    if quick:
        return dict(BLOCK_M=[16, 64], BLOCK_N=[64, 128], BLOCK_K=[64, 128], GROUP_M=[8], num_warps=[4, 8],
                    num_stages=[3, 4])
    return dict(BLOCK_M=[16, 32, 64, 128], BLOCK_N=[32, 64, 128, 256], BLOCK_K=[64, 128, 256], GROUP_M=[1, 8, 32],
                num_warps=[4, 8], num_stages=[2, 3, 4, 5])


def time_config(fn) -> float:
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
    except Exception:  # out of shared memory / registers for this tile: not a candidate
        return float("inf")


def tune_tokens(D, I, E, top_k, dtype, tokens, space, weights):
    w13, w2 = weights
    x = torch.randn(tokens, D, device="cuda", dtype=dtype)
    topk_weights, topk_ids = moe.moe_route(torch.randn(tokens, E, device="cuda"), top_k, True)
    pairs = tokens * top_k
    route_w = topk_weights.reshape(-1).contiguous()
    hidden = torch.empty(pairs, I, device="cuda", dtype=dtype)
    down = torch.empty(pairs, D, device="cuda", dtype=dtype)
    best = None
    for block_m in space["BLOCK_M"]:
        sorted_pairs, block_expert = moe.moe_align(topk_ids, E, block_m)
        per_gemm = []
        for gated in (True, False):
            a, w, out = (x, w13, hidden) if gated else (hidden, w2, down)
            results = []
            for bn, bk, gm, nw, ns in itertools.product(space["BLOCK_N"], space["BLOCK_K"], space["GROUP_M"],
                                                         space["num_warps"], space["num_stages"]):
                cfg = dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=nw, num_stages=ns)
                ms = time_config(lambda: moe._launch_gemm(
                    a, w, out, route_w, sorted_pairs, block_expert, pairs, top_k, cfg,
                    gated=gated, a_per_token=gated, weighted=not gated))
                results.append((ms, cfg))
            per_gemm.append(min(results, key=lambda r: r[0]))
        total = per_gemm[0][0] + per_gemm[1][0]
        if best is None or total < best[0]:
            best = (total, per_gemm[0][1], per_gemm[1][1])
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES))
    parser.add_argument("--D", type=int)
    parser.add_argument("--I", type=int)
    parser.add_argument("--E", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 64, 256, 1024, 1280])
    parser.add_argument("--quick", action="store_true", help="a small search space (minutes, not hours)")
    parser.add_argument("--out-dir", default=moe.CONFIG_DIR)
    args = parser.parse_args()
    D, I, E, top_k = SHAPES[args.shape] if args.shape else (args.D, args.I, args.E, args.top_k)
    dtype = DTYPES[args.dtype]
    device = moe.device_name(torch.device("cuda"))
    w13 = torch.randn(E, 2 * I, D, device="cuda", dtype=dtype) * D**-0.5
    w2 = torch.randn(E, D, I, device="cuda", dtype=dtype) * I**-0.5
    space = search_space(args.quick)
    gate_up, down = {}, {}
    for tokens in args.tokens:
        ms, cfg1, cfg2 = tune_tokens(D, I, E, top_k, dtype, tokens, space, (w13, w2))
        x = torch.randn(tokens, D, device="cuda", dtype=dtype)
        routing = moe.moe_route(torch.randn(tokens, E, device="cuda"), top_k, True)
        defaults = (moe._default_config(E, 2 * I, D, tokens, top_k, dtype),
                    moe._default_config(E, D, I, tokens, top_k, dtype))
        out = torch.empty_like(x)
        default_ms = time_config(lambda: moe._fused_moe_into(x, w13, w2, *routing, out, *defaults))
        tuned_ms = time_config(lambda: moe._fused_moe_into(x, w13, w2, *routing, out, cfg1, cfg2))
        print(f"tokens={tokens}: whole op {tuned_ms:.4f} ms tuned, {default_ms:.4f} ms default; "
              f"gate_up={cfg1} down={cfg2}", flush=True)
        gate_up[tokens], down[tokens] = cfg1, cfg2
    os.makedirs(args.out_dir, exist_ok=True)
    for (n_out, k), table in (((2 * I, D), gate_up), ((D, I), down)):
        path = os.path.join(args.out_dir, moe.config_file_name(E, n_out, k, dtype, device))
        with open(path, "w") as f:
            json.dump({str(t): cfg for t, cfg in table.items()}, f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
