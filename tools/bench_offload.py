#!/usr/bin/env python3
"""Offloaded decode at real size: a Mixtral-8x7B-shaped target (seeded random bf16 weights
drawn on the GPU straight into the pinned store) under a GPU memory budget, against
`transformers` + `accelerate` offloading the very same tensors.

    python tools/bench_offload.py                     # 32 layers, 256 rows, 128 + 32 tokens
    python tools/bench_offload.py --layers 4 --rows 64 --json out.json

Prints a markdown table; the figures come from this run only (copy bandwidth included).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import specoff  # noqa: E402
from specoff.bench import baselines, planner  # noqa: E402
from specoff.offload import copy_gbps as pinned_copy_gbps  # noqa: E402
from specoff.bench.synthetic import MIXTRAL_8X7B  # noqa: E402

def accelerate_decode_seconds(llm, hf_cfg, prompts, steps, layers=None, pageable=False):
    """(prefill, median decode step) seconds of transformers + accelerate with every decoder
    layer offloaded to the CPU, on our own tensors (specoff.baselines): views into the pinned
    store, or with `pageable` ordinary-memory copies of the first `layers` layers."""
    hf = baselines.hf_model(llm.model, llm.config, hf_cfg, layers=layers, pageable=pageable)
    hf = baselines.dispatch(hf, 0, "cuda")
    timed = baselines.hf_generate(hf, prompts, steps + 1, "cuda")
    return timed["prefill_seconds"], timed["step_seconds"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gpu-memory", default="24GiB")
    p.add_argument("--ring-slots", type=int, default=3)
    p.add_argument("--offload", choices=["auto", "on"], default="auto")
    p.add_argument("--eager", action="store_true", help="also time the eager path (no CUDA graphs)")
    p.add_argument("--accelerate-steps", type=int, default=2, help="0 skips the accelerate baseline")
    p.add_argument("--accelerate-pageable-layers", type=int, default=0,
                   help="also time accelerate with weights in ordinary (pageable) memory, on this "
                        "many layers (host memory cannot hold a second full copy), scaled up")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")

    hf_cfg = dict(MIXTRAL_8X7B, num_hidden_layers=args.layers)
    cfg = specoff.ModelConfig.from_dict(hf_cfg)
    copy_gbps = pinned_copy_gbps("cuda")
    t0 = time.perf_counter()
    llm = specoff.LLM(cfg, device="cuda", dtype="bfloat16", gpu_memory=args.gpu_memory,
                      offload=None if args.offload == "auto" else True,
                      ring_slots=args.ring_slots, max_rows=args.rows)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab_size, (args.rows, args.prompt_len), generator=g).tolist()
    params = specoff.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(prompts[:8], specoff.SamplingParams(max_new_tokens=3, ignore_eos=True))  # warm-up
    llm.generate(prompts, params)
    s = llm.last_stats
    plan = s.plan
    stream = plan["stream_bytes_per_pass"]
    result = {
        "device": torch.cuda.get_device_name(), "layers": args.layers, "rows": args.rows,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "gpu_memory": args.gpu_memory,
        "copy_gbps_measured": copy_gbps, "profile": llm.profile.to_dict(), "plan": plan,
        "build_seconds": build_s, "load_report": llm.load_report.to_dict() if llm.load_report else None,
        "stats": s.to_dict(), "stream_bytes_per_pass": stream,
        "pass_seconds": s.measured_pass_seconds,
        "achieved_gbps": stream / s.measured_pass_seconds / 1e9 if s.measured_pass_seconds else 0,
        "budget_bytes": planner.parse_bytes(args.gpu_memory),
    }
    result["copy_fraction"] = result["achieved_gbps"] / copy_gbps
    if args.eager:
        llm.model.use_graphs = False
        llm.generate(prompts, params)
        result["eager_pass_seconds"] = llm.last_stats.measured_pass_seconds
        llm.model.use_graphs = True
    if args.accelerate_steps:
        try:
            if not llm.weight_plan.offload:
                raise ImportError("the model is resident under this budget: use --offload on")
            pre, step = accelerate_decode_seconds(llm, hf_cfg, prompts, args.accelerate_steps)
            result["accelerate_prefill_seconds"] = pre
            result["accelerate_step_seconds"] = step
            result["speedup_vs_accelerate"] = result["accelerate_step_seconds"] / s.measured_pass_seconds
            n = args.accelerate_pageable_layers
            if n:
                _, step = accelerate_decode_seconds(llm, hf_cfg, prompts, args.accelerate_steps,
                                                    layers=n, pageable=True)
                per_step = step * args.layers / n
                result["accelerate_pageable_step_seconds"] = per_step
                result["accelerate_pageable_layers_measured"] = n
                result["speedup_vs_accelerate_pageable"] = per_step / s.measured_pass_seconds
        except ImportError as e:
            result["accelerate_error"] = str(e)

    gb = 1e9
    rows = [
        ("device", result["device"]),
        ("model", f"Mixtral-8x7B shape, {args.layers} layers, bf16 random weights"),
        ("workload", f"{args.rows} rows x {args.prompt_len} prompt + {args.new_tokens} new tokens"),
        ("GPU budget / peak allocated", f"{args.gpu_memory} / {s.peak_gpu_bytes / 2**30:.2f} GiB"),
        ("plan", f"ring {plan['ring_slots']} slots of 1/{plan.get('ring_pieces', 1)} layer, "
                 f"resident attention {plan['resident_attention']}, "
                 f"{plan['resident_layers']} resident layers, KV on {'GPU' if plan['kv_on_gpu'] else 'host'}"),
        ("pinned copy bandwidth (this run)", f"{copy_gbps:.1f} GB/s"),
        ("bytes streamed per decode pass", f"{stream / gb:.2f} GB"),
        ("decode pass: measured / predicted", f"{s.measured_pass_seconds:.3f} s / {s.predicted_pass_seconds:.3f} s"),
        ("pure copy time of a pass", f"{stream / gb / copy_gbps:.3f} s"),
        ("achieved / copy bandwidth", f"{result['achieved_gbps']:.1f} GB/s = {100 * result['copy_fraction']:.1f}%"),
        ("prefill: measured / predicted", f"{s.prefill_seconds:.2f} s / {s.predicted_prefill_seconds:.2f} s"),
        ("decode tokens/s", f"{s.tokens / max(s.decode_seconds, 1e-9):.1f}"),
        ("store build (random weights, pinned)", f"{build_s:.1f} s, host peak "
                                                  f"{llm.load_report.host_peak_bytes / gb:.1f} GB" if llm.load_report else f"{build_s:.1f} s"),
    ]
    if "eager_pass_seconds" in result:
        rows.append(("decode pass, eager (no graphs)", f"{result['eager_pass_seconds']:.3f} s"))
    if "accelerate_step_seconds" in result:
        rows.append(("transformers + accelerate decode step (same pinned tensors)",
                     f"{result['accelerate_step_seconds']:.3f} s"))
        rows.append(("specoff speed-up per decode step (same pinned tensors)",
                     f"{result['speedup_vs_accelerate']:.1f}x"))
    if "accelerate_pageable_step_seconds" in result:
        rows.append((f"accelerate decode step, pageable weights ({result['accelerate_pageable_layers_measured']}"
                     f" layers measured, scaled to {args.layers})",
                     f"{result['accelerate_pageable_step_seconds']:.3f} s"))
        rows.append(("specoff speed-up per decode step (pageable accelerate)",
                     f"{result['speedup_vs_accelerate_pageable']:.1f}x"))
    print("| figure | value |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
