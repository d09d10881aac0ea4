"""Where a target pass's time goes: a short chain (or tree: --spec tree) run under
torch.profiler, summarised per CUDA stream.

The 24 GiB chain pass of the Mixtral-8x7B-shaped pair runs 0.2–0.55 s over its weight
copy (README, "The benchmark suite"); this tool says whether the copy stream sat idle
(the ring waiting for compute to release a slot, or the host not issuing) or the bus was
shared (the host cache's layers, the refills' prefill). It builds the upcycled pair in
memory as tools/bench.py does, runs one warm-up generation, then profiles a second one and
prints, per stream: busy seconds, bytes copied host→device and device→host, and the
longest idle gaps of the busiest copy stream with the operation that ended each gap.

    python tools/profile_pass.py --gpu-memory 24GiB --rows 144 --new-tokens 8 \\
        --trace $OUT/pass-trace.json --json $OUT/pass-profile.json
    python tools/profile_pass.py --spec tree --tree-budget 16 --rows 144 --humaneval ...
    python tools/profile_pass.py --tiny          # CPU smoke run (CI)
"""
from __future__ import annotations

import argparse
import bisect
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import specoff  # noqa: E402
from bench import humaneval_prompts  # noqa: E402  tools/bench.py, beside this file
from specoff.kernels import compiled_kernels  # noqa: E402
from specoff.options import EngineOptions, OptionsError  # noqa: E402
from specoff.bench.synthetic import MIXTRAL_8X7B, dense_of, pair_configs, upcycled_pair  # noqa: E402

TINY_TARGET = dict(MIXTRAL_8X7B, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=256, num_hidden_layers=3)


def _union(intervals: List[tuple]) -> float:
    """Total length covered by (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(trace: dict, top_gaps: int = 5, top_ops: int = 6) -> dict:
    """Per-stream busy time, copy bytes, the operations that took most of each stream's
    time and the copy stream's idle gaps from a Kineto (chrome trace) dict; in seconds."""
    streams: Dict[int, dict] = {}
    for ev in trace.get("traceEvents", []):
        cat = ev.get("cat", "")
        if cat not in ("kernel", "gpu_memcpy", "gpu_memset") or "dur" not in ev:
            continue
        args = ev.get("args", {})
        sid = int(args.get("stream", ev.get("tid", -1)) or -1)
        st = streams.setdefault(sid, dict(intervals=[], events=[], h2d=0, d2h=0, kernels=0))
        start, dur = ev["ts"] * 1e-6, ev["dur"] * 1e-6
        st["intervals"].append((start, start + dur))
        st["events"].append((start, start + dur, ev.get("name", "")))
        name = ev.get("name", "")
        nbytes = int(args.get("bytes", 0) or 0)
        if cat == "gpu_memcpy" and "HtoD" in name:
            st["h2d"] += nbytes
        elif cat == "gpu_memcpy" and "DtoH" in name:
            st["d2h"] += nbytes
        elif cat == "kernel":
            st["kernels"] += 1
    if not streams:
        return {"streams": {}, "span_seconds": 0.0, "note": "no device activity (CPU run)"}
    first = min(s for st in streams.values() for s, _ in st["intervals"])
    last = max(e for st in streams.values() for _, e in st["intervals"])
    out = {"span_seconds": last - first, "streams": {}}
    for sid, st in streams.items():
        by_name: Dict[str, float] = {}
        for s, e, name in st["events"]:
            by_name[name[:70]] = by_name.get(name[:70], 0.0) + (e - s)
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:top_ops]
        out["streams"][str(sid)] = dict(
            busy_seconds=_union(st["intervals"]), h2d_bytes=st["h2d"], d2h_bytes=st["d2h"],
            kernels=st["kernels"], operations=len(st["events"]),
            top=[dict(op=n, seconds=t) for n, t in top])
    # The weight stream: the one that copied most host→device bytes.
    copy_sid = max(streams, key=lambda s: streams[s]["h2d"])
    events = sorted(streams[copy_sid]["events"])
    gaps = []
    for (s0, e0, _), (s1, e1, name) in zip(events, events[1:]):
        if s1 > e0:
            gaps.append((s1 - e0, e0 - first, name))
    # Was the GPU computing while the copy stream waited? A gap with the compute streams
    # idle too means nothing was issued (the host was behind); with them busy, the ring
    # waited for a slot to be released.
    compute = sorted(iv for sid, st in streams.items() if sid != copy_sid for iv in st["intervals"])
    merged: List[list] = []
    for s, e in compute:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    starts = [m[0] for m in merged]

    def busy_within(a: float, b: float) -> float:
        i = max(0, bisect.bisect_right(starts, a) - 1)
        t = 0.0
        while i < len(merged) and merged[i][0] < b:
            t += max(0.0, min(b, merged[i][1]) - max(a, merged[i][0]))
            i += 1
        return t

    buckets = [("<0.05 ms", 5e-5), ("0.05-0.5 ms", 5e-4), ("0.5-5 ms", 5e-3), ("5-50 ms", 5e-2),
               (">50 ms", float("inf"))]
    hist = {name: dict(count=0, seconds=0.0, compute_busy_seconds=0.0) for name, _ in buckets}
    for (s0, e0, _), (s1, _e1, _n) in zip(events, events[1:]):
        g = s1 - e0
        if g <= 0:
            continue
        name = next(n for n, hi in buckets if g < hi)
        hist[name]["count"] += 1
        hist[name]["seconds"] += g
        hist[name]["compute_busy_seconds"] += busy_within(e0, s1)
    out["copy_gap_histogram"] = hist
    out["host_during_gaps"] = host_during(trace, [(e0, s1) for (s0, e0, _), (s1, _e, _n)
                                                  in zip(events, events[1:]) if s1 - e0 > 5e-4])
    gaps.sort(reverse=True)
    out["copy_stream"] = str(copy_sid)
    out["copy_stream_idle_seconds"] = sum(g for g, _, _ in gaps)
    out["copy_stream_gaps"] = [dict(seconds=g, at=t, next=name) for g, t, name in gaps[:top_gaps]]
    return out


def host_during(trace: dict, windows: List[tuple], top: int = 12) -> List[dict]:
    """What the host threads ran while the copy stream waited: per (thread, operation) the
    seconds its events overlap the given windows, largest first. Nested events each count,
    so this ranks operations; it does not add up to the gaps."""
    windows = sorted(windows)
    starts = [w[0] for w in windows]
    acc: Dict[tuple, float] = {}
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or "dur" not in ev or ev.get("cat") not in (
                "cpu_op", "cuda_runtime", "cuda_driver", "user_annotation", "python_function"):
            continue
        a, b = ev["ts"] * 1e-6, (ev["ts"] + ev["dur"]) * 1e-6
        i = max(0, bisect.bisect_right(starts, a) - 1)
        t = 0.0
        while i < len(windows) and windows[i][0] < b:
            t += max(0.0, min(b, windows[i][1]) - max(a, windows[i][0]))
            i += 1
        if t > 0:
            key = (str(ev.get("tid")), ev.get("name", "")[:60])
            acc[key] = acc.get(key, 0.0) + t
    ranked = sorted(acc.items(), key=lambda kv: -kv[1])[:top]
    return [dict(thread=k[0], op=k[1], seconds=v) for k, v in ranked]


def build(args, options: EngineOptions):
    if args.tiny:
        draft_cfg, target_cfg = pair_configs(dense_of(TINY_TARGET), TINY_TARGET)
        device, budget = torch.device("cpu"), None
    else:
        draft_cfg, target_cfg = pair_configs(dense_of(MIXTRAL_8X7B), MIXTRAL_8X7B, args.layers)
        device, budget = torch.device("cuda"), args.gpu_memory
    draft, target = upcycled_pair(draft_cfg, target_cfg, args.sigma, args.seed, device)
    # Built as tools/bench.py builds it (spec=None: room for an interactive tree), then set.
    llm = specoff.LLM(target, draft=draft, options=options, device=str(device),
                      gpu_memory=budget, offload=True, max_rows=args.rows, seed=args.seed,
                      draft_quant=args.draft_quant)
    llm.reconfigure(spec=args.spec, tree_budget=args.tree_budget, draft_len=args.draft_len,
                    interleave={"on": True, "off": False}.get(args.interleave))
    return llm, target_cfg.vocab_size


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy pair on the CPU: a smoke run")
    p.add_argument("--gpu-memory", default="24GiB")
    p.add_argument("--layers", type=int, help="decoder layers of the pair (default: all)")
    p.add_argument("--rows", type=int, default=144, help="rows per pass (the plan may give fewer)")
    p.add_argument("--prompts", type=int, help="prompts (default: rows + rows // 4: refills ride along)")
    p.add_argument("--prompt-len", type=int, default=113, help="tokens a prompt (HumanEval's mean)")
    p.add_argument("--humaneval", action="store_true",
                   help="HumanEval's prompts (tools/bench.py's mapping) instead of random ones")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--spec", choices=["chain", "tree"], default="chain")
    p.add_argument("--tree-budget", type=int, default=16, help="--spec tree: nodes a row")
    p.add_argument("--draft-len", type=int, default=4)
    p.add_argument("--draft-quant", choices=["fp8"], help="the draft's decoder weights in float8")
    p.add_argument("--interleave", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--offload-only", action="store_true",
                   help="the target alone over one batch of the plan's rows (no speculation)")
    p.add_argument("--sigma", type=float, default=0.0158)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="set an EngineOptions field for the run (kernels.chain_attention=off, "
                        "growth_tokens=1024)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="no profiler: time the run with each value of an option (named as for "
                        "--set) in turn, twice over (ABAB), and print a row for each (repeatable: "
                        "one option after the other, each set back afterwards)")
    p.add_argument("--repeat", type=int, default=0,
                   help="no profiler: time the run this many times (with the --set options)")
    p.add_argument("--memory-peak", metavar="FILE",
                   help="no profiler: one run under torch's allocator history; write what was "
                        "allocated at its peak, by the specoff lines that allocated it, beside "
                        "the plan's figures (JSON)")
    p.add_argument("--syncs", action="store_true",
                   help="no profiler: one run with torch's CUDA sync debugging on; every "
                        "operation that made the host wait for the device, counted by the "
                        "specoff lines that called it")
    p.add_argument("--trace", help="write the chrome trace here")
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    if args.tiny:
        args.rows, args.prompt_len, args.new_tokens = min(args.rows, 4), 12, 4
    elif not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --tiny)")
    options = EngineOptions()
    for item in args.set:
        options = _with_setting(options, item)
    for item in args.compare:  # refused before anything is built
        name, values = _setting(item)
        for value in values.split(","):
            _with_setting(options, f"{name}={value}")
    llm, vocab = build(args, options)
    gen = torch.Generator().manual_seed(args.seed)
    n = args.prompts or args.rows + args.rows // 4
    if args.humaneval:
        prompts = humaneval_prompts(n, vocab)
    else:
        prompts = torch.randint(3, vocab, (n, args.prompt_len), generator=gen).tolist()
    params = specoff.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    speculate = not args.offload_only
    if args.offload_only:  # one full batch (a last batch of a few rows would cost whole passes)
        rows = llm.plan(len(prompts), max(len(q) for q in prompts), args.new_tokens,
                        speculate=False).rows_per_pass
        prompts = prompts[:rows]
    generate = lambda batch: llm.generate(batch, params, speculate=speculate)  # noqa: E731
    # Warm-up as tools/bench.py's: the rows and a quarter more (refills), a few tokens, so
    # that Triton's compiles (triton_compiles below counts the rest) and graph captures
    # mostly happen before the profiled run.
    warm = args.rows + args.rows // 4
    llm.generate(prompts[:warm], specoff.SamplingParams(max_new_tokens=4, ignore_eos=True),
                 speculate=speculate)
    if args.memory_peak:
        return memory_peak(llm, lambda: generate(prompts), Path(args.memory_peak))
    if args.syncs:
        return sync_sites(llm, lambda: generate(prompts), args)
    if args.compare or args.repeat:
        return compare(llm, lambda: generate(prompts), args)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if not args.tiny:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    compiled = compiled_kernels()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        generate(prompts)
    wall = time.perf_counter() - t0
    compiles = None if compiled is None else compiled_kernels() - compiled
    trace_path = Path(args.trace) if args.trace else Path("/tmp") / f"specoff-pass-{time.time_ns()}.json"
    prof.export_chrome_trace(str(trace_path))
    summary = summarize(json.loads(trace_path.read_text()))
    s = llm.last_stats
    summary.update(
        wall_seconds=wall, triton_compiles=compiles, passes=s.decode_passes, rows_per_group=s.rows_per_group,
        groups=s.groups, target_seconds=s.target_seconds, plan=s.plan,
        pass_seconds=pass_seconds(s),
        copy_seconds_per_pass=(s.plan.get("stream_bytes_per_pass", 0) / (llm.profile.copy_gbps * 1e9)
                               if llm.profile else None))
    if not args.trace:
        trace_path.unlink()
    if s.rounds:
        summary.update(draft_seconds=s.draft_seconds, draft_prefill_seconds=s.draft_prefill_seconds,
                       rounds=s.rounds, round_seconds=s.round_seconds)
        prefill = (f" (prefilling new prompts {s.draft_prefill_seconds / s.rounds:.3f} s)"
                   if s.draft_prefill_seconds else "")
        round_s = f", round {s.round_seconds / s.rounds:.3f} s" if s.round_seconds else ""
        print(f"{'tree growth' if s.tree_budget else 'draft'} {s.draft_seconds / s.rounds:.3f} s "
              f"a round{prefill}, target {s.target_seconds / s.decode_passes:.3f} s a pass{round_s}")
    print(f"{summary['passes']} passes of {summary['groups']} x {summary['rows_per_group']} rows, "
          f"wall {wall:.2f} s, span on the device {summary['span_seconds']:.2f} s, "
          f"Triton compiles during it: {compiles}")
    for sid, st in summary["streams"].items():
        print(f"  stream {sid}: busy {st['busy_seconds']:.3f} s, H2D {st['h2d_bytes'] / 1e9:.2f} GB, "
              f"D2H {st['d2h_bytes'] / 1e9:.2f} GB, {st['kernels']} kernels")
        for op in st["top"]:
            print(f"      {op['seconds']:.3f} s  {op['op']}")
    if "copy_stream" in summary:
        print(f"  copy stream {summary['copy_stream']} idle {summary['copy_stream_idle_seconds']:.3f} s; "
              f"longest gaps: " + ", ".join(f"{g['seconds'] * 1e3:.1f} ms before {g['next'][:40]}"
                                            for g in summary["copy_stream_gaps"]))
        for h in summary["host_during_gaps"]:
            print(f"    host thread {h['thread']} in {h['op']}: {h['seconds']:.3f} s of the gaps")
        for name, h in summary["copy_gap_histogram"].items():
            print(f"    gaps {name}: {h['count']} totalling {h['seconds']:.3f} s, compute busy "
                  f"{h['compute_busy_seconds']:.3f} s of it")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _setting(item: str):
    """(name, value) of a NAME=VALUE argument."""
    name, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"error: {item!r} is not NAME=VALUE")
    return name, value


def _with_setting(options: EngineOptions, item: str) -> EngineOptions:
    """`options` with NAME=VALUE set (EngineOptions.with_setting); a clear exit where wrong."""
    name, value = _setting(item)
    try:
        return options.with_setting(name, value)
    except OptionsError as e:
        raise SystemExit(f"error: {item}: {e}")


def pass_seconds(s) -> Optional[float]:
    """Mean time of a decode pass: device time of speculative passes, wall time of plain ones."""
    if not s.decode_passes:
        return None
    return (s.target_seconds or s.decode_seconds) / s.decode_passes


def peak_live_blocks(events: List[dict], baseline: int = 0) -> tuple:
    """Replay an allocator history (torch.cuda.memory._snapshot()["device_traces"][i]): the
    peak of allocated bytes (`baseline` plus the history's own) and the blocks live then."""
    live, current, peak, at = {}, baseline, baseline, -1
    for i, ev in enumerate(events):
        if ev["action"] == "alloc":
            current += ev["size"]
            if current > peak:
                peak, at = current, i
        elif ev["action"] == "free_completed":
            current -= ev["size"]
    for ev in events[:at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
    return peak, list(live.values())


def allocation_site(frames: List[dict], depth: int = 2) -> str:
    """The innermost `depth` specoff frames of an allocation's stack ("file:line fn < ...")."""
    ours = [f for f in frames if "specoff" in f.get("filename", "")
            and "profile_pass" not in f.get("filename", "")]
    if not ours:
        return "(outside specoff)"
    return " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in ours[:depth])


def sync_site(stack, depth: int = 3) -> str:
    """allocation_site of a traceback.extract_stack() (outermost frame first)."""
    return allocation_site([dict(filename=f.filename, line=f.lineno, name=f.name)
                            for f in reversed(stack)], depth)


def sync_sites(llm, run, args) -> dict:
    """One run with torch.cuda.set_sync_debug_mode("warn"): each synchronizing operation
    (a stream or device sync, a blocking copy to or from pageable memory, .item(),
    nonzero...) warns, and is counted here by the specoff lines that called it. The host
    syncs a pipeline means to take (a chain round's one per group, in _commit) show beside
    any it does not, which would hold the host back from issuing the next pass."""
    import traceback
    import warnings

    sites: Dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            site = sync_site(traceback.extract_stack()[:-1])
            sites[site] = sites.get(site, 0) + 1

    cuda = torch.cuda.is_available() and llm.device.type == "cuda"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    s = llm.last_stats
    report = dict(wall_seconds=time.perf_counter() - t0, passes=s.decode_passes,
                  rounds=s.rounds, syncs=sum(sites.values()),
                  draft_hidden_fraction=s.draft_hidden_fraction,
                  draft_exposed_seconds=s.draft_exposed_seconds,
                  sites=[dict(count=n, per_pass=n / max(s.decode_passes, 1), site=k)
                         for k, n in sorted(sites.items(), key=lambda kv: -kv[1])])
    print(f"{report['syncs']} host syncs over {s.decode_passes} passes (draft hidden "
          f"{s.draft_hidden_fraction}; not hidden, by pass: {s.draft_exposed_seconds}), by site:")
    for row in report["sites"][:30]:
        print(f"  {row['count']:6d} ({row['per_pass']:6.1f} a pass)  {row['site']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def memory_peak(llm, run, path: Path) -> dict:
    """One run under the allocator's history: the bytes live at its peak by allocation site
    (what the planner's memory model must count), written to `path` as JSON and printed."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=2_000_000)
    try:
        run()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][device.index]
    peak, blocks = peak_live_blocks(events, baseline)
    sites: Dict[str, int] = {}
    for ev in blocks:
        site = allocation_site(ev.get("frames", []))
        sites[site] = sites.get(site, 0) + ev["size"]
    s = llm.last_stats
    report = dict(baseline_gib=baseline / 2**30, peak_gib=peak / 2**30,
                  measured_peak_gib=s.peak_gpu_bytes / 2**30, events=len(events),
                  budget_gib=(s.plan or {}).get("budget_bytes", 0) / 2**30,
                  plan_gpu_gib={k: v / 2**30 for k, v in (s.plan or {}).get("gpu_bytes", {}).items()},
                  rows_per_group=s.rows_per_group, tokens_per_second=s.tokens_per_second,
                  sites=[dict(gib=v / 2**30, site=k)
                         for k, v in sorted(sites.items(), key=lambda kv: -kv[1])[:40]])
    path.write_text(json.dumps(report, indent=1))
    print(f"peak {report['peak_gib']:.2f} GiB (stats {report['measured_peak_gib']:.2f}), before the "
          f"run {report['baseline_gib']:.2f}; plan: " + ", ".join(
              f"{k} {v:.2f}" for k, v in report["plan_gpu_gib"].items()))
    for row in report["sites"][:25]:
        print(f"  {row['gib']:7.3f} GiB  {row['site']}")
    return report


def compare(llm, run, args) -> dict:
    """The same generation timed unprofiled: `--repeat` times as set, then under each value
    of each `--compare` option, ABAB (the option set back after its runs)."""
    rows = []

    def timed(name=None, value=None):
        for graphs in getattr(llm.model, "_graphs", {}).values():
            graphs.clear()  # per-layer graphs captured under another value
        compiled = compiled_kernels()
        t0 = time.perf_counter()
        run()
        s = llm.last_stats
        compiles = None if compiled is None else compiled_kernels() - compiled
        rows.append(dict(option=name, value=value, wall_seconds=time.perf_counter() - t0,
                         triton_compiles=compiles,
                         passes=s.decode_passes, rows_per_group=s.rows_per_group,
                         segment_waits=s.segment_waits, graph_capture_seconds=s.graph_capture_seconds,
                         joint_passes=s.joint_passes, tail_merges=s.tail_merges,
                         tokens_per_pass=s.tokens_per_pass,
                         peak_gpu_gib=s.peak_gpu_bytes / 2**30 if s.peak_gpu_bytes else None,
                         draft_cache_gib=(s.plan or {}).get("gpu_bytes", {}).get("kv_cache", 0) / 2**30,
                         target_seconds=s.target_seconds,
                         prefill_seconds=s.prefill_seconds, pass_seconds=pass_seconds(s),
                         tokens_per_second=s.tokens_per_second,
                         predicted_tokens_per_second=s.predicted_tokens_per_second,
                         draft_seconds_per_round=s.draft_seconds / s.rounds if s.rounds else None,
                         draft_prefill_seconds_per_round=(s.draft_prefill_seconds / s.rounds
                                                          if s.rounds else None),
                         draft_exposed_seconds=s.draft_exposed_seconds))
        print(json.dumps(rows[-1]), flush=True)

    for _ in range(args.repeat):
        timed()
    for item in args.compare:
        name, values = _setting(item)
        before = llm.options
        for value in values.split(",") * 2:
            llm.reconfigure(_with_setting(before, f"{name}={value}"))
            timed(name, value)
        llm.reconfigure(before)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return {"compare": rows}


if __name__ == "__main__":
    main()
