"""The MoE at one token count three ways timed, with two sets of tuned configs side by side.

    python tools/moe_probe.py --tokens 256 1280 --configs specoff/kernels/configs DIR [--repeats 2]

For each token count and each config folder (files named as in specoff/kernels/configs),
fused_moe is timed as (a) the tuner does (a CUDA graph of a few calls, ~4 ms a replay),
(b) as bench_kernels does (triton's do_bench_cudagraph, ~60 ms of calls a replay) and (c)
eagerly (do_bench, the L2 flushed between calls), beside the benchmark's torch composition
(eager), cuBLAS on the same products without the grouping (torch.mm of all the pairs'
rows against one expert's weights: the dense ceiling for the same FLOPs) and cuBLAS on the
exact groups (each expert's rows against its weights, nothing else of the MoE), both under
the two graph timers. `--variants` changes entries of each folder's configs ('GROUP_M=16':
the gate-up one's, 'down.GROUP_M=16': the down one's; comma-separated, a row each). Folders
alternate `--repeats` times so drift shows. Prints a markdown table; --json writes the rows.
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
from tools.bench_kernels import moe_inputs, moe_torch_grouped, profiled_launches  # noqa: E402
from tools.tune_kernels import graph_ms  # noqa: E402


def configs_in(folder: str, E: int, D: int, I: int, dtype, tokens: int):
    name = moe.device_name(torch.device("cuda"))
    pair = []
    for n_out, k in ((2 * I, D), (D, I)):
        path = os.path.join(folder, moe.config_file_name(E, n_out, k, dtype, name))
        with open(path) as f:
            table = {int(t): c for t, c in json.load(f).items()}
        pair.append(table[min(table, key=lambda t: abs(t - tokens))])
    return pair


def main():
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1280])
    parser.add_argument("--configs", nargs="+", required=True, help="config folders to compare")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=[""],
                        help="config changes, a row each: '' (as installed), 'GROUP_M=16', 'GROUP_M=16,down.GROUP_M=16'")
    parser.add_argument("--profile", action="store_true",
                        help="also each row's kernels: own device time a call (torch.profiler, eager, first repeat)")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    print("| tokens | configs | tuner graph ms | bench graph ms | eager ms | torch eager ms | dense mm graph ms |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    weights = None
    for tokens in args.tokens:
        x, w13, w2, topk_weights, topk_ids = moe_inputs("mixtral-8x7b", tokens, weights=weights)
        weights = (w13, w2)
        E, I, D = w13.shape[0], w2.shape[2], x.shape[1]
        rows_all = x.new_empty(tokens * topk_ids.shape[1], D).normal_()
        h = torch.empty(rows_all.shape[0], 2 * I, device="cuda", dtype=x.dtype)
        y = torch.empty_like(rows_all)
        hid = torch.empty(rows_all.shape[0], I, device="cuda", dtype=x.dtype).normal_()

        def dense():
            torch.mm(rows_all, w13[0].t(), out=h)
            torch.mm(hid, w2[0].t(), out=y)

        # cuBLAS on the exact groups: each expert's rows (counted once, on the host) against
        # its own weights, every other op of the MoE left out
        counts = torch.bincount(topk_ids.reshape(-1), minlength=E).tolist()
        ends = [sum(counts[:e + 1]) for e in range(E)]

        def groups():
            for e in range(E):
                lo, hi = ends[e] - counts[e], ends[e]
                if hi > lo:
                    torch.mm(rows_all[lo:hi], w13[e].t(), out=h[lo:hi])
                    torch.mm(hid[lo:hi], w2[e].t(), out=y[lo:hi])

        dense_ms = graph_ms(dense)
        dense_sustained = triton.testing.do_bench_cudagraph(dense, rep=60, return_mode="median")
        groups_ms = graph_ms(groups)
        groups_sustained = triton.testing.do_bench_cudagraph(groups, rep=60, return_mode="median")
        print(f"tokens {tokens}: dense mm {dense_ms:.4f} ms (tuner's timer) / {dense_sustained:.4f} (bench's); "
              f"cuBLAS on the exact groups {groups_ms:.4f} / {groups_sustained:.4f}", flush=True)
        torch_ms = triton.testing.do_bench(lambda: moe_torch_grouped(x, w13, w2, topk_weights, topk_ids),
                                           warmup=10, rep=60, return_mode="median")
        out = torch.empty_like(x)
        for repeat in range(args.repeats):
            for folder, variant in itertools.product(args.configs, args.variants):
                cfg1, cfg2 = configs_in(folder, E, D, I, x.dtype, tokens)
                for key, value in (e.split("=") for e in filter(None, variant.split(","))):
                    # 'down.KEY=V' goes to the down config, a bare 'KEY=V' to the gate-up one
                    target, key = (cfg2, key[5:]) if key.startswith("down.") else (cfg1, key)
                    target[key] = int(value)
                label = f"{folder} {variant}".strip()
                fn = lambda: moe._fused_moe_into(x, w13, w2, topk_weights, topk_ids, out, cfg1, cfg2)  # noqa: E731
                try:
                    fn()
                except triton.runtime.errors.OutOfResources as e:  # a variant too big for this GPU
                    print(f"| {tokens} | {label} | does not fit: {e} |||||", flush=True)
                    continue
                ref = moe.fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                torch.cuda.synchronize()
                row = dict(tokens=tokens, configs=label, tuner_graph_ms=graph_ms(fn),
                           bench_graph_ms=triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median"),
                           eager_ms=triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"),
                           torch_eager_ms=torch_ms, dense_mm_graph_ms=dense_ms,
                           dense_mm_bench_graph_ms=dense_sustained, groups_mm_graph_ms=groups_ms,
                           groups_mm_bench_graph_ms=groups_sustained, rel_err=err, gate_up=cfg1, down=cfg2)
                rows.append(row)
                print(f"| {tokens} | {label} | {row['tuner_graph_ms']:.4f} | {row['bench_graph_ms']:.4f} | "
                      f"{row['eager_ms']:.4f} | {torch_ms:.4f} | {dense_ms:.4f} |", flush=True)
                if args.profile and repeat == 0:
                    launches = profiled_launches(fn, 20)
                    if launches is not None:
                        row["kernels"] = [dict(name=n, own_ms=o) for n, o, _ in zip(*launches)]
                        print("    kernels (own ms a call): " + ", ".join(
                            f"{n[:40]} {o:.4f}" for n, o, _ in zip(*launches)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
