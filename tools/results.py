#!/usr/bin/env python3
"""docs/results.md from the benchmark records kept in docs/figures: markdown tables, and PNG
plots where matplotlib is installed (the `bench` extra).

    python tools/results.py                      # docs/figures/*.jsonl -> docs/results.md + PNGs
    python tools/results.py --figures DIR --out FILE
    python tools/results.py --add bench/results/throughput.jsonl --into throughput \\
        --commit 4fadbaa --machine "NVIDIA H200, PCIe Gen5 x16" \\
        --reproduce "PROMPTS=492 bash tools/gpu_session.sh issue4-full" [--runs RUN_ID,...]

Input: JSON lines in docs/figures/NAME.jsonl, one section of the output per file, in name
order. A line is one of
- a section record, {"section": "title", "about": "one paragraph"} (first, optional);
- a run row exactly as `tools/bench.py` writes it (it has "scenario", "config", "engine",
  "status", "run_id", "command", "device_name", "torch", the measured figures);
- a kernel row as `tools/bench_kernels.py --json` writes it in its "rows" list (it has
  "kernel", "shape", "case", "graph_ms", "torch_ms", "torch_graph_ms").
Every row may carry the provenance `--add` stamps on it: "commit" (the code measured),
"machine" (the host, in words) and "reproduce" (the command that reruns it here, usually a
`tools/gpu_session.sh` step). The tables say, for every run, its commit, machine and command.

`--add` appends rows of a bench run (its JSON lines) or of a kernel run (its --json file) to
docs/figures/NAME.jsonl, without the bulky per-row records (settings, options, stats) and the
scratch --out folder of the command, with the provenance given. Ratios are taken within one run only, as `tools/bench.py` takes them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import bench  # noqa: E402  tools/bench.py: the row schema's formatting and plots

FIGURES = ROOT / "docs" / "figures"
OUT = ROOT / "docs" / "results.md"
# per-row records too big for the docs' copy (the run's own JSON lines keep them)
DROPPED = ("settings", "options", "stats", "load_report", "profile", "weight_plan", "tree_curve")
PROVENANCE = ("commit", "machine", "reproduce")
PLOTS = ("tokens_per_second", "budget", "sweep")  # of bench.plots' figures, the ones kept
# What a row's tokens/s is compared with: these engines where the same run and config has them
PLAIN = ("specoff-offload", "specoff-offload-group")
BASELINES = {engine: ("hf-accelerate", "hf-accelerate-pinned") for engine in PLAIN}
SPECULATIVE_BASELINES = PLAIN + ("hf-accelerate", "hf-assisted")
PLOTTED_KERNELS = ("fused_moe", "verify_attention", "packed_prefill_attention")

class InputError(Exception):
    """A missing or malformed input: the message is one line naming the file."""


# -- reading -----------------------------------------------------------------------------------

def read_records(path: Path) -> List[dict]:
    """The records of one JSON-lines file, each checked for its kind."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return parse_records(path.read_text(), path)


def parse_records(text: str, path) -> List[dict]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{n}: a line must be a JSON object, not {type(record).__name__}")
        if "section" in record:
            kind, need = "section", ("section",)
        elif "scenario" in record:
            kind, need = "bench", ("config", "engine", "status")
        elif "kernel" in record:
            kind, need = "kernel", ("shape", "case", "graph_ms")
        else:
            raise InputError(f"{path}:{n}: neither a bench row ('scenario'), a kernel row "
                             f"('kernel') nor a section record ('section')")
        missing = [k for k in need if k not in record]
        if missing:
            raise InputError(f"{path}:{n}: a {kind} row without {', '.join(missing)}")
        records.append(record)
    return records


def read_figures(figures: Path) -> Dict[str, List[dict]]:
    """Every docs/figures/*.jsonl file's records, by file stem, in name order."""
    if not figures.is_dir():
        raise InputError(f"{figures}: no such folder")
    files = sorted(figures.glob("*.jsonl"))
    if not files:
        raise InputError(f"{figures}: no *.jsonl files")
    return {f.stem: read_records(f) for f in files}


# -- tables ------------------------------------------------------------------------------------

def fmt(value, spec: str = ".2f") -> str:
    return bench.fmt(value, spec)


def baseline_ratio(r: dict, rows: List[dict]) -> str:
    """This row's tokens/s against the baseline engines of the same run and config."""
    if r["engine"].startswith("hf-"):
        return "–"
    same = {x["engine"]: x for x in rows if x.get("run_id") == r.get("run_id")
            and x["config"] == r["config"] and x.get("status") == "ok" and x.get("tokens_per_second")}
    ratios = []
    for name in BASELINES.get(r["engine"], SPECULATIVE_BASELINES):
        if name in same and name != r["engine"]:
            x = r["tokens_per_second"] / same[name]["tokens_per_second"]
            ratios.append(f"{x:.{2 if x < 10 else 1 if x < 100 else 0}f}× {name}")
        if ratios and name in PLAIN:
            break  # one plain baseline: the first present
    return ", ".join(ratios) or "–"


def bench_table(rows: List[dict]) -> str:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_second")]
    pairs = list(dict.fromkeys(r.get("pair") for r in ok))
    head = (["pair"] if len(pairs) > 1 else []) + [
        "workload", "GPU budget", "engine", "setting", "rows", "tokens/s", "steady tokens/s",
        "predicted", "against (same run)", "tokens/row/pass", "target pass s", "copy s",
        "% of bound", "peak GPU GiB", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in ok:
        fraction = r.get("fraction_of_bound")
        peak = r.get("peak_gpu_bytes")
        cells = ([r.get("pair") or "–"] if len(pairs) > 1 else []) + [
            r["config"], str(r.get("gpu_memory") or r.get("gpu_memory_requested") or "–"),
            r["engine"], bench.setting(r) or "–", str(r.get("rows") or "–"),
            fmt(r["tokens_per_second"], ".1f"), fmt(r.get("steady_tokens_per_second"), ".1f"),
            fmt(r.get("predicted_tokens_per_second"), ".1f"), baseline_ratio(r, ok),
            fmt(r.get("tokens_per_pass")), fmt(r.get("target_pass_seconds"), ".3f"),
            fmt(r.get("copy_seconds_per_pass"), ".3f"),
            fmt(100 * fraction if fraction is not None else None, ".0f"),
            fmt(peak / 2**30 if peak else None), f"`{r.get('run_id') or '–'}`"]
        lines.append("| " + " | ".join(cells) + " |")
    left_out = len(rows) - len(ok)
    if left_out:
        lines.append(f"\n{left_out} row(s) of these runs skipped or failed: not shown.")
    return "\n".join(lines)


def times_torch(r: dict) -> Optional[float]:
    """The best torch time (eager or graph) over the kernel's graph time, as bench_kernels prints."""
    torch_times = [t for t in (r.get("torch_ms"), r.get("torch_graph_ms"))
                   if isinstance(t, (int, float)) and math.isfinite(t)]
    if not torch_times or not r.get("graph_ms") or r["kernel"] == "draft_step":
        return None  # the draft step's "torch" is its own eager step: over_floor says more
    return min(torch_times) / r["graph_ms"]


def kernel_table(rows: List[dict]) -> str:
    head = ["kernel", "shape", "case", "graph ms", "best torch ms", "× torch", "GB/s",
            "% of read ceiling", "× weights' read", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        torch_ms = [t for t in (r.get("torch_ms"), r.get("torch_graph_ms"))
                    if isinstance(t, (int, float)) and math.isfinite(t)]
        share = r.get("hbm_share")
        cells = [r["kernel"], r["shape"], r["case"], fmt(r["graph_ms"], ".4f"),
                 fmt(min(torch_ms) if torch_ms and r["kernel"] != "draft_step" else None, ".4f"),
                 fmt(times_torch(r)), fmt(r.get("gbps"), ".0f"),
                 fmt(100 * share if share is not None else None, ".0f"), fmt(r.get("over_floor")),
                 f"`{r.get('run_id') or '–'}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def provenance(rows: List[dict]) -> str:
    """One line a run: its id, the commit measured, the machine and the commands."""
    runs: Dict[str, dict] = {}
    for r in rows:
        runs.setdefault(r.get("run_id") or "–", r)
    lines = []
    for run_id, r in runs.items():
        machine = r.get("machine") or r.get("device_name") or "–"
        if r.get("torch") and "torch" not in machine:
            machine += f", torch {r['torch']}"
        line = f"- `{run_id}`: commit {r.get('commit') or '–'}, {machine}"
        if r.get("reproduce"):
            line += f"; rerun: `{r['reproduce']}`"
        if r.get("command"):
            line += f"; ran: `python {r['command']}`" if r["command"].startswith("tools/") \
                else f"; ran: `{r['command']}`"
        lines.append(line)
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------

def kernel_plot(rows: List[dict], out: Path) -> List[Path]:
    """× torch of each case of the kernels a pass spends most in (MoE and attention), a bar each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    bars = [(f"{r['kernel']} {r['shape']} {r['case']}"[:52] + f" ({r.get('run_id') or '–'})",
             times_torch(r)) for r in rows if r["kernel"] in PLOTTED_KERNELS]
    bars = [(name, x) for name, x in bars if x is not None]
    if not bars:
        return []
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(bars) + 1.2))
    ax.barh(range(len(bars)), [x for _, x in bars], color="C0")
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(range(len(bars)), [name for name, _ in bars], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("× the best torch composition (graph replay times)")
    fig.tight_layout()
    path = out / "kernels-times_torch.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return [path]


def section_plots(name: str, records: List[dict], figures: Path) -> List[Path]:
    """The section's PNGs under figures/NAME/: bench.plots' for each scenario (tokens/s by
    engine, the interactive budget curve, a sweep's curve), and the kernels' × torch."""
    out = figures / name
    written = []
    by_scenario: Dict[str, List[dict]] = {}
    for r in records:
        if "scenario" in r:
            by_scenario.setdefault(r["scenario"], []).append(r)
    kernels = [r for r in records if "kernel" in r]
    if not by_scenario and not kernels:
        return []
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    for scenario, rows in by_scenario.items():
        ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_second")]
        if not ok:
            continue
        view = SimpleNamespace(out=out, device_name=ok[0].get("device_name"), pair_name=ok[0].get("pair"))
        for path in bench.plots(view, scenario, rows):
            if any(path.stem.endswith(suffix) for suffix in PLOTS):
                written.append(path)
            else:
                path.unlink()
    return written + (kernel_plot(kernels, out) if kernels else [])


# -- the document ------------------------------------------------------------------------------

HEADER = """# Results

Generated by `python tools/results.py` from the records in `docs/figures/*.jsonl` (rows as
`tools/bench.py` and `tools/bench_kernels.py --json` write them); do not edit by hand. Every
run names the commit it measured, the machine and the command; the `reproduce` command reruns
it with `tools/gpu_session.sh` on a machine like that one. Ratios compare runs of one process
only. Benchmarks use seeded random weights at real shapes (an upcycled pair: the draft's
feed-forward plus noise σ as each expert, docs/design.md); σ and the measured acceptance α are
in each row's record.
"""


def render(sections: Dict[str, List[dict]], figures: Path, out: Path, plots: bool = True) -> str:
    parts = [HEADER]
    for name, records in sections.items():
        head = next((r for r in records if "section" in r), {})
        rows = [r for r in records if "section" not in r]
        parts.append(f"## {head.get('section') or name}\n")
        if head.get("about"):
            parts.append(head["about"].strip() + "\n")
        bench_rows = [r for r in rows if "scenario" in r and r["scenario"] != "demo"]
        demo_rows = [r for r in rows if r.get("scenario") == "demo"]
        kernel_rows = [r for r in rows if "kernel" in r]
        if bench_rows:
            parts.append(bench_table(bench_rows) + "\n")
        if demo_rows:  # the trained demo pair's report: its own rows (specoff.demo.evaluate)
            parts.append(bench.demo_table(demo_rows) + "\n")
        if kernel_rows:
            parts.append(kernel_table(kernel_rows) + "\n")
        if rows:
            parts.append("Runs:\n\n" + provenance(rows) + "\n")
        for png in (section_plots(name, rows, figures) if plots else []):
            rel = os.path.relpath(png, out.parent)
            parts.append(f"![{name}: {png.stem}]({rel})\n")
    return "\n".join(parts)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would, not mkstemp's 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -- adding a run's rows -----------------------------------------------------------------------

def clean(value):
    """JSON with NaN as null (bench_kernels writes NaN for a time it did not take)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def rows_of(path: Path) -> List[dict]:
    """The rows of a bench run's JSON lines or of a bench_kernels --json file."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    text = path.read_text()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and isinstance(whole.get("rows"), list):  # bench_kernels --json
        rows = [dict(r, hbm_gbps=whole.get("hbm_gbps")) for r in whole["rows"]]
        for n, r in enumerate(rows, 1):
            if not isinstance(r, dict) or "kernel" not in r:
                raise InputError(f"{path}: rows[{n - 1}] is not a kernel row")
        return rows
    rows = parse_records(text, path)
    return rows


def add(args) -> int:
    target = args.figures / f"{args.into}.jsonl"
    existing = read_records(target) if target.exists() else []
    runs = set(bench.split(args.runs)) if args.runs else None
    kernels = set(bench.split(args.kernels)) if args.kernels else None
    new = []
    for path in args.add:
        for r in rows_of(Path(path)):
            if "scenario" in r and runs is not None and r.get("run_id") not in runs:
                continue
            if "kernel" in r and kernels is not None and r["kernel"] not in kernels:
                continue
            r = clean({k: v for k, v in r.items() if k not in DROPPED})
            if isinstance(r.get("command"), str):  # its --out folder was scratch space
                r["command"] = re.sub(r"\s--out\s+\S+", "", r["command"])
            for key in PROVENANCE:
                if getattr(args, key):
                    r[key] = getattr(args, key)
            if "kernel" in r and args.run_id:
                r["run_id"] = args.run_id
            new.append(r)
    if not new:
        raise InputError(f"{', '.join(args.add)}: no rows to add (see --runs / --kernels)")
    if args.section and not any("section" in r for r in existing):
        existing.insert(0, {"section": args.section, **({"about": args.about} if args.about else {})})
    write_atomic(target, "".join(json.dumps(r) + "\n" for r in existing + new))
    print(f"{target}: {len(new)} row(s) added, {len(existing) + len(new)} record(s)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--figures", type=Path, default=FIGURES, help="the records (*.jsonl) and PNGs")
    p.add_argument("--out", type=Path, default=OUT, help="the markdown written")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--add", nargs="+", metavar="FILE",
                   help="append these runs' rows to --figures/INTO.jsonl instead of generating")
    p.add_argument("--into", help="--add: the figures file's name (without .jsonl)")
    p.add_argument("--runs", help="--add: only these run ids (comma-separated)")
    p.add_argument("--kernels", help="--add: only these kernels (comma-separated)")
    p.add_argument("--run-id", help="--add: the run id of kernel rows (they carry none)")
    p.add_argument("--commit", help="--add: the commit measured")
    p.add_argument("--machine", help="--add: the host, in words")
    p.add_argument("--reproduce", help="--add: the command that reruns it")
    p.add_argument("--section", help="--add: the section's title, for a new file")
    p.add_argument("--about", help="--add: the section's paragraph, for a new file")
    args = p.parse_args(argv)
    try:
        if args.add:
            if not args.into:
                raise InputError("--add needs --into NAME")
            return add(args)
        sections = read_figures(args.figures)
        text = render(sections, args.figures, args.out, plots=not args.no_plots)
        write_atomic(args.out, text)
        print(f"{args.out}: {sum(len(v) for v in sections.values())} record(s) "
              f"from {len(sections)} file(s)")
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
