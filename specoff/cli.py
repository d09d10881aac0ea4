"""The command line (`python tools/generate.py`): the same `specoff.LLM` a script would use."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

import specoff
from specoff import demo
from specoff.bench.synthetic import default_checkpoint
from specoff.config import UnsupportedModelError
from specoff.humaneval import humaneval_prompts
from specoff.options import EngineOptions, OptionsError
from specoff.planner import BudgetError
from specoff.weights import CheckpointError

DEFAULT_PROMPTS = 8  # HumanEval prompts run when none are given


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Generate with specoff. With no --target, runs the demo pair shipped with "
                    "specoff (speculation on); with no prompts, runs the first HumanEval prompts.")
    p.add_argument("--target", help="Hugging Face checkpoint folder of the target model")
    p.add_argument("--draft", help="checkpoint folder of a draft model (same tokenizer): "
                                   "turns on speculative decoding")
    p.add_argument("--spec", choices=["chain", "tree"],
                   help="speculation mode (default with --draft: tree for up to 4 prompts, and "
                        "above where the target streams from host memory to a GPU; else chain)")
    p.add_argument("--draft-len", default="auto",
                   help="draft tokens per row per round (γ), or auto to adapt between rounds")
    p.add_argument("--tree-budget", default="auto",
                   help="draft-tree nodes per row in tree mode (1 … 2048), or auto to choose "
                        "between rounds by measured tokens/s")
    p.add_argument("--tree-scores", choices=["learned", "draft"], default="learned",
                   help="how tree mode ranks nodes: by acceptance learned from the target's "
                        "verdicts (default) or by the draft's log-probabilities")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--interleave", action="store_true",
                       help="two row groups: the draft hides under the other group's target pass "
                            "(default: whichever the planner predicts faster)")
    group.add_argument("--no-interleave", action="store_true",
                       help="one row group: every pass serves every row, the draft runs between")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", action="append", default=[],
                   help="one prompt per line, or JSONL with a 'prompt' field (repeatable)")
    p.add_argument("--dataset", choices=["humaneval"], help="a built-in prompt set")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--max-rows", type=int, help="the most rows a pass serves (default: the "
                   "prompts, at most 256); the plan takes what --gpu-memory holds")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--gpu-memory", help="GPU memory budget, e.g. 24GiB (default: free memory "
                                        "less 1 GiB)")
    p.add_argument("--draft-quant", choices=["fp8"], help="store the draft's decoder weights in "
                   "float8 (half its GPU memory; the output stays exact)")
    p.add_argument("--offload", choices=["auto", "on", "off"], default="auto",
                   help="stream the target's layers from host memory: auto lets the planner decide")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="set any engine option (specoff.options.EngineOptions), after the flags "
                        "above: --set kernels.pdl=off --set cache.segment_draft_cache=on")
    p.add_argument("--json", help="write outputs and stats to this file")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    return p


def read_prompts_file(path: str) -> List[str]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("{"):
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: a JSON line needs a 'prompt' field")
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts


def gather_prompts(args) -> List[str]:
    prompts = list(args.prompt)
    for path in args.prompts_file:
        prompts += read_prompts_file(path)
    if args.dataset == "humaneval":
        prompts += humaneval_prompts()
    if not prompts:
        prompts = humaneval_prompts()[:DEFAULT_PROMPTS]
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError("--limit must be at least 1")
        prompts = prompts[:args.limit]
    return prompts


def summary(stats) -> str:
    line = (f"rows {stats.rows} | tokens {stats.tokens} | prefill {stats.prefill_seconds:.2f} s | "
            f"decode {stats.decode_seconds:.2f} s | {stats.tokens_per_second:.1f} tokens/s")
    if stats.plan and stats.plan["offload"]:
        line += (f" | pass {stats.measured_pass_seconds:.3f} s (predicted "
                 f"{stats.predicted_pass_seconds or 0:.3f} s) | streamed "
                 f"{stats.bytes_streamed / 1e9:.2f} GB")
    if stats.acceptance_rate is not None:
        hidden = stats.draft_hidden_fraction
        mode = (f"tree {stats.tree_budget} nodes" if stats.tree_budget else f"γ {stats.draft_len}")
        if stats.tree_budgets and len(set(stats.tree_budgets)) > 1:
            mode += f" (auto: tried {', '.join(map(str, sorted(set(stats.tree_budgets))))})"
        if stats.tree_budget and stats.tree_scores:
            mode += f", {stats.tree_scores} ranks"
        line += (f" | acceptance {stats.acceptance_rate:.2f} | {stats.tokens_per_pass:.2f} "
                 f"tokens/row/pass | {mode} | draft hidden "
                 f"{'-' if hidden is None else f'{100 * hidden:.0f}%'}")
    return line


def run(args) -> int:
    prompts = gather_prompts(args)
    params = specoff.SamplingParams(max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p,
                                    top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    target, draft = args.target, args.draft
    if target is None and draft is None and demo.available():
        target, draft = demo.target_dir(), demo.draft_dir()
        print(f"no --target given: using the demo pair shipped with specoff (a Mixtral and a "
              f"draft trained on the stdlib) in {demo.DEMO_DIR}", file=sys.stderr)
    elif target is None:
        target = default_checkpoint()
        print(f"no --target given: using the built-in tiny random model in {target}",
              file=sys.stderr)
    elif not Path(target).is_dir():
        raise ValueError(f"--target {target} is not a folder; pass a Hugging Face checkpoint "
                         f"folder (config.json, *.safetensors, tokenizer files)")
    offload = {"auto": None, "on": True, "off": False}[args.offload]
    if args.draft is not None and not Path(args.draft).is_dir():
        raise ValueError(f"--draft {args.draft} is not a folder; pass a Hugging Face checkpoint folder")
    if args.tree_budget == "auto":
        tree_budget = "auto"
    elif args.tree_budget.isdigit():
        tree_budget = int(args.tree_budget)
    else:
        raise ValueError(f"--tree-budget takes a number or auto, not {args.tree_budget!r}")
    if args.draft_len == "auto":
        draft_len = None
    elif args.draft_len.isdigit():
        draft_len = int(args.draft_len)
    else:
        raise ValueError(f"--draft-len takes a number or auto, not {args.draft_len!r}")
    if args.max_rows is not None and args.max_rows < 1:
        raise ValueError("--max-rows must be at least 1")
    max_rows = min(args.max_rows or 256, len(prompts))
    options = EngineOptions.build(
        spec=args.spec, device=args.device, dtype=args.dtype, seed=args.seed, offload=offload,
        gpu_memory=args.gpu_memory, draft_len=draft_len,
        interleave=False if args.no_interleave else (True if args.interleave else None),
        tree_budget=tree_budget, tree_scores=args.tree_scores, draft_quant=args.draft_quant,
        # The weights are placed for the rows this run can use: a few prompts leave the
        # budget to resident weights and whole-layer ring slots.
        max_rows=max_rows)
    for item in args.set:  # after the flags: --set has the last word
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item}: give NAME=VALUE, e.g. --set kernels.pdl=off")
        try:
            options = options.with_setting(name, value)
        except OptionsError as e:
            raise ValueError(f"--set {item}: {e}") from None
    llm = specoff.LLM(target, draft=draft, options=options)
    with tqdm(total=len(prompts), unit="prompt", disable=None, file=sys.stderr) as bar:
        outputs = llm.generate(prompts, params, progress=bar)
    if not args.quiet:
        for i, out in enumerate(outputs):
            print(f"--- [{i}] {len(out.token_ids)} tokens, {out.finish_reason}")
            print(out.text)
    if llm.last_stats.speculation_note:  # the planner ran the target alone (choose_speculation)
        print(f"note: {llm.last_stats.speculation_note}")
    plain = llm.last_stats.predicted_plain_tokens_per_second
    if plain and plain > 1.05 * llm.last_stats.tokens_per_second:
        print(f"note: the planner predicts {plain:.1f} tokens/s for the target alone batching "
              f"these prompts: try the run without --draft")
    print(summary(llm.last_stats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"outputs": [asdict(o) for o in outputs],
                       "stats": llm.last_stats.to_dict()}, f, indent=1)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, NotImplementedError, CheckpointError,
            UnsupportedModelError, BudgetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
