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
from specoff import planner  # noqa: E402

MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                    rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None)


def pinned_copy_gbps(nbytes=1 << 30, repeat=5) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return nbytes * repeat / (time.perf_counter() - t0) / 1e9


def hf_model_on_our_tensors(llm, hf_cfg_dict, layers=None, pageable=False):
    """A transformers Mixtral whose parameters are our tensors (views into the pinned store
    for the layers): the same weights, no second host copy. With `pageable`, its first
    `layers` layers are ordinary-memory copies instead (how accelerate holds weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    layers = layers or hf_cfg_dict["num_hidden_layers"]
    hf_cfg = AutoConfig.for_model(**dict(hf_cfg_dict, num_hidden_layers=layers))
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    cfg, m = llm.config, llm.model
    H, KV = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": m.tok_embeddings.weight, "model.norm.weight": m.norm.weight,
          "lm_head.weight": m.output.weight}
    for i in range(layers):
        host = m.store.views(i)  # every layer's full tensors live in the host store
        if pageable:
            host = {n: t.clone() for n, t in host.items()}
        p = f"model.layers.{i}."
        wqkv = host["attention.wqkv.weight"]
        sd.update({p + "self_attn.q_proj.weight": wqkv[:H], p + "self_attn.k_proj.weight": wqkv[H:H + KV],
                   p + "self_attn.v_proj.weight": wqkv[H + KV:], p + "self_attn.o_proj.weight": host["attention.wo.weight"],
                   p + "input_layernorm.weight": host["attention_norm.weight"],
                   p + "post_attention_layernorm.weight": host["ffn_norm.weight"],
                   p + "mlp.gate.weight": host["feed_forward.gate.weight"],
                   p + "mlp.experts.gate_up_proj": host["feed_forward.w13"],
                   p + "mlp.experts.down_proj": host["feed_forward.w2"]})
    expected = {n: tuple(t.shape) for n, t in hf.state_dict().items()}
    got = {n: tuple(t.shape) for n, t in sd.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise SystemExit(f"this transformers' Mixtral layout differs from the one assumed: {diff}")
    hf.load_state_dict(sd, assign=True, strict=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg).to("cuda")
    return hf.eval()


@torch.inference_mode()
def accelerate_decode_seconds(hf, ids, steps):
    """Per-step time of transformers + accelerate with every decoder layer offloaded to CPU."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(len(hf.model.layers))})
    hf = dispatch_model(hf, device_map=device_map, main_device=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = hf(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return prefill, times


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
    copy_gbps = pinned_copy_gbps()
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
            hf = hf_model_on_our_tensors(llm, hf_cfg)
            ids = torch.tensor(prompts, device="cuda")
            pre, steps = accelerate_decode_seconds(hf, ids, args.accelerate_steps)
            result["accelerate_prefill_seconds"] = pre
            result["accelerate_step_seconds"] = sorted(steps)[len(steps) // 2]
            result["speedup_vs_accelerate"] = result["accelerate_step_seconds"] / s.measured_pass_seconds
            del hf
            n = args.accelerate_pageable_layers
            if n:
                hf = hf_model_on_our_tensors(llm, hf_cfg, layers=n, pageable=True)
                _, steps = accelerate_decode_seconds(hf, ids, args.accelerate_steps)
                per_step = sorted(steps)[len(steps) // 2] * args.layers / n
                result["accelerate_pageable_step_seconds"] = per_step
                result["accelerate_pageable_layers_measured"] = n
                result["speedup_vs_accelerate_pageable"] = per_step / s.measured_pass_seconds
                del hf
        except ImportError as e:
            result["accelerate_error"] = str(e)

    gb = 1e9
    rows = [
        ("device", result["device"]),
        ("model", f"Mixtral-8x7B shape, {args.layers} layers, bf16 random weights"),
        ("workload", f"{args.rows} rows x {args.prompt_len} prompt + {args.new_tokens} new tokens"),
        ("GPU budget / peak allocated", f"{args.gpu_memory} / {s.peak_gpu_bytes / 2**30:.2f} GiB"),
        ("plan", f"ring {plan['ring_slots']} slots, resident attention {plan['resident_attention']}, "
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
