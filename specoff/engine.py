"""The engine behind `specoff.LLM`: prompts in, tokens out, with the run's figures.

Batched generation with the target resident on the device or streamed from host memory as
the planner decides: the target alone (prefill, then one pass a token), or speculation with
a draft model, chain (SpecOffload) or tree (SpecExec) verification, as EngineOptions and the
planner choose.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .config import ModelConfig
from .hostmem import available_host_bytes
from .kvcache import KVCache, SegmentKVCache
from .models.passes import row_chunk
from .offload import build_offloaded
from .options import EngineOptions
from .outputs import GenerationStats, RequestOutput
from .planner import (BudgetError, Plan, TreeBudgetTuner, chain_groups as predict_chain_groups,
                      cost_at_budget, expected_tree_rates, load_profile, parse_bytes,
                      plan_run, plan_weights, predict_draft_prefill, predict_pass,
                      tree_budget_ladder, weight_reserve)
from .quant import check_weight_quant, quantize_linears
from .sampling import SamplingParams, select
from .speculation.chain import MAX_DRAFT_LEN, chain_passes
from .speculation.chain_scheduler import ChainScheduler, draft_cache_slots as chain_cache_slots
from .speculation.growth import AcceptanceModel
from .speculation.requests import Request, SpecRun
from .speculation.tree_scheduler import (TreeScheduler, draft_cache_slots as tree_cache_slots,
                                         tree_passes)
from .weights import (SyntheticModel, checkpoint_source, default_device, load_model, load_tokenizer,
                      parse_dtype, random_source)


def host_cache_segmented(mode: str, lengths: Sequence[int], host: bool = True) -> bool:
    """Whether a plain batch's cache over prompts of these lengths sits in row segments
    (CacheOptions.segment_host_cache; `host`: the cache is in host memory): a pass then
    streams what the rows hold instead of rows × the longest."""
    return mode == "on" or (mode == "auto" and host and min(lengths) != max(lengths))


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"kernels.pdl": ...}: a nested options dict by dotted names."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _check_options(options: EngineOptions, has_draft: bool) -> None:
    """Refuse, before anything loads, options that cannot run: one clear error each."""
    spec = options.spec
    if spec.mode is not None and not has_draft:
        raise ValueError(f"spec={spec.mode!r} needs a draft model: pass draft=DIR")
    if options.draft_quant is not None and not has_draft:
        raise ValueError(f"draft_quant={options.draft_quant!r} needs a draft model: pass draft=DIR")
    if options.max_rows < 1 or options.prefill_chunk < 1 or options.ring_slots < 1:
        raise ValueError("max_rows, prefill_chunk and ring_slots must be positive")
    if spec.draft_len is not None and not 1 <= spec.draft_len <= MAX_DRAFT_LEN:
        raise ValueError(f"draft_len must be between 1 and {MAX_DRAFT_LEN} (or None: "
                         f"adaptive), not {spec.draft_len}")
    if spec.tree_budget != "auto" and not 1 <= spec.tree_budget <= 2048:
        raise ValueError(f"tree_budget must be between 1 and 2048, or 'auto', not {spec.tree_budget!r}")


def check_same_tokenizer(target_tok, draft_tok) -> None:
    """A draft must map text to the target's token ids; its vocabulary may be a prefix of the
    target's (e.g. padded embeddings on one side)."""
    if target_tok is not None and draft_tok is not None:
        t_vocab, d_vocab = target_tok.get_vocab(), draft_tok.get_vocab()
        for token, i in sorted(d_vocab.items(), key=lambda kv: kv[1]):
            if t_vocab.get(token) != i:
                where = (f"id {t_vocab[token]} in the target" if token in t_vocab
                         else "absent from the target")
                raise ValueError(
                    f"the target and draft tokenizers differ: token {token!r} is id {i} in the "
                    f"draft but {where}; the draft must use the target's tokenizer")


def default_budget(device) -> int:
    """All the device memory that is free now, less 1 GiB of margin."""
    free, _ = torch.cuda.mem_get_info(device)
    return max(free - (1 << 30), 0)


def _plain_prediction(plan: Plan, prompts: int, new_tokens: int):
    """(passes, tokens/s) the plan predicts for plain batches over `prompts` prompts: every
    batch its prefill pass (which gives the first token), then a decode pass a token, every
    row running to `new_tokens`."""
    batches = -(-prompts // plan.rows_per_pass)
    seconds = batches * (plan.predicted_prefill_seconds
                         + (new_tokens - 1) * plan.predicted_pass_seconds)
    return batches * new_tokens, prompts * new_tokens / seconds


def _requests(rows, progress=None) -> list:
    """speculation.requests.Request of each prompt; `progress` (a tqdm bar) counts each finished one."""
    done = (lambda: progress.update(1)) if progress is not None else None  # noqa: E731
    return [Request(list(r), on_finish=done) for r in rows]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LLM:
    """A target model and, optionally, a draft model, ready to generate.

    `LLM(target, draft=None, *, options=None, **fields)`: `target` and `draft` are Hugging
    Face checkpoint folders, ModelConfigs (seeded random weights of that shape) or
    SyntheticModels built in memory (weights.SyntheticModel; specoff.bench.synthetic builds pairs). `options` (EngineOptions) says how
    the engine runs; `fields` set its fields by name (`spec="tree"`, `gpu_memory="24GiB"`,
    `draft_len=4`, `kernels=KernelOptions(...)`: EngineOptions.replace).
    """

    def __init__(self, target, draft=None, *, options: Optional[EngineOptions] = None, **fields):
        options = (options or EngineOptions()).replace(**fields)
        _check_options(options, draft is not None)
        self.options = options
        self.device = default_device(options.device)
        self.dtype = parse_dtype(options.dtype) or (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        # "auto" budgets go up to tree_budget_max; on a CPU a pass costs in proportion to
        # its tokens, so big trees never pay there. Halved below while one row's tree does
        # not fit the budget.
        self.tree_budget_max = options.spec.tree_budget_max or (
            1024 if self.device.type == "cuda" else 64)
        if not 1 <= self.tree_budget_max <= 2048:
            raise ValueError(f"tree_budget_max must be between 1 and 2048, not {self.tree_budget_max}")
        self._tree_acceptance = None
        self._tree_tuners = {}  # (rows per pass, budget ladder) → TreeBudgetTuner
        self._spec_tokens_per_pass = None  # the last speculative throughput call's (choose_speculation)
        self.last_plan_pass_seconds = None
        target, draft = self._read_configs(target, draft)
        self.weight_plan = self._plan_weights()
        self._load_models(target, draft)
        self._apply_options()
        self.eos_token_ids = self._eos_ids()
        self.last_stats = GenerationStats()
        while True:  # refuse a bad kv_placement or a budget that fits no run now
            try:
                self.plan(1, 1, 1)
                break
            except BudgetError:
                # Auto tree budgets stop where one row's tree no longer fits.
                if (options.spec.tree_budget != "auto" or self.spec_mode(1) != "tree"
                        or self.draft_config is None or self.tree_budget_max <= 16):
                    raise
                self.tree_budget_max //= 2

    def _read_configs(self, target, draft):
        """The models' configs and the target's tokenizer, read before any weight loads (a
        draft must speak the target's tokens); returns (target, draft) as SyntheticModels
        or folders. A ModelConfig stands for seeded random weights of that shape."""
        seed = self.options.seed
        if isinstance(target, ModelConfig):
            target = SyntheticModel(target, random_source(target, seed, self.device))
        if isinstance(draft, ModelConfig):
            draft = SyntheticModel(draft, random_source(draft, seed + 1, self.device))
        if isinstance(target, SyntheticModel):
            self.path, self.config, self.tokenizer = None, target.config, None
        else:
            self.path = Path(target)
            self.config = ModelConfig.from_hf(self.path)  # fails early on an unsupported family
            self.tokenizer = load_tokenizer(self.path)
        self.draft_config = self.draft_model = None
        if draft is not None:
            if isinstance(draft, SyntheticModel):
                self.draft_config, draft_tok = draft.config, None
            else:
                self.draft_config = ModelConfig.from_hf(draft)
                draft_tok = load_tokenizer(draft)
            check_same_tokenizer(self.tokenizer, draft_tok)
            quant = self.options.draft_quant
            check_weight_quant(self.draft_config, quant)
            # The plan counts the draft as it will be stored.
            self.draft_config = dataclasses.replace(self.draft_config, weight_quant=quant)
        return target, draft

    def _plan_weights(self) -> Plan:
        """Where the target's weights go under the GPU budget (the hardware profile measured
        on first use), leaving room for the rows and trees the options ask for."""
        options, spec = self.options, self.options.spec
        self.profile = budget = None
        if self.device.type == "cuda":
            budget = (default_budget(self.device) if options.gpu_memory is None
                      else parse_bytes(options.gpu_memory))
            self.profile = load_profile(self.device, dtype=self.dtype)
        elif options.gpu_memory is not None:
            raise ValueError("gpu_memory applies to a CUDA device; this LLM runs on the CPU")
        # Tree mode's verification passes carry rows × the largest tree: room for an
        # interactive batch's (a throughput run's trees are small: the run plan fits them).
        max_rows = options.max_rows
        tree_rows = 0 if self.draft_config is None or spec.mode == "chain" else (
            max_rows if spec.mode == "tree" else min(max_rows, spec.interactive_rows))
        reserve = 0 if budget is None else weight_reserve(
            self.config, self.dtype, budget, max_rows, self.draft_config,
            tree_rows=tree_rows, tree_nodes=self.tree_capacity_for(max(tree_rows, 1)) + 1)
        return plan_weights(self.config, self.dtype, budget, offload=options.offload,
                            reserve=reserve, ring_slots=options.ring_slots,
                            ring_pieces=options.ring_pieces)

    def _load_models(self, target, draft) -> None:
        """The target as the weight plan places it (streamed from a pinned host store or
        resident), the draft resident (its norms folded, then quantized, as the options say)."""
        options, plan = self.options, self.weight_plan
        synthetic = isinstance(target, SyntheticModel)
        source = target.source if synthetic else checkpoint_source(self.path, self.config)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.load_report = None
        if plan.offload:
            self.model, self.load_report = build_offloaded(
                self.config, source, self.device, self.dtype, ring_slots=plan.ring_slots,
                resident_attention=plan.resident_attention,
                resident_layers=plan.resident_layers, ring_pieces=plan.ring_pieces)
        else:
            self.model = load_model(self.path, self.device, self.dtype, source=source,
                                    config=self.config)
        self.model.use_graphs = options.cuda_graphs and self.device.type == "cuda"
        if draft is None:
            return
        synthetic = isinstance(draft, SyntheticModel)
        self.draft_model = load_model(None if synthetic else draft, self.device, self.dtype,
                                      source=draft.source if synthetic else None,
                                      config=self.draft_config)
        if options.kernels.fold_draft_norms:  # before any quantisation: plain products only
            self.draft_model.fold_norms()
        if options.draft_quant is not None:
            quantize_linears(self.draft_model, options.draft_quant)
        self.draft_model.use_graphs = self.model.use_graphs

    # Options that shape what was built: changing them needs a new LLM.
    _BUILT_BY = ("device", "dtype", "gpu_memory", "offload", "ring_slots", "ring_pieces",
                 "cuda_graphs", "draft_quant", "kernels.fold_draft_norms")

    def reconfigure(self, options: Optional[EngineOptions] = None, **fields) -> None:
        """Run the next calls with other options (`options`, or these fields changed): the
        speculation, the cache layout, the kernels, the rows. Those that shaped the build
        (_BUILT_BY) are refused with a clear error."""
        new = (options or self.options).replace(**fields)
        old_flat, new_flat = _flat(self.options.to_dict()), _flat(new.to_dict())
        fixed = [name for name in self._BUILT_BY if old_flat[name] != new_flat[name]]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} shaped the models this LLM built; build a new "
                             f"LLM to change {'it' if len(fixed) == 1 else 'them'}")
        if new.spec.tree_budget_max != self.options.spec.tree_budget_max:
            self.tree_budget_max = new.spec.tree_budget_max or (
                1024 if self.device.type == "cuda" else 64)
        kernels_changed = new.kernels != self.options.kernels
        self.options = new
        self._apply_options(kernels_changed)

    def _apply_options(self, kernels: bool = True) -> None:
        """Hand the models what they read of the options: the kernels their passes launch
        (which drops their captured graphs) and how far ahead a host cache is fetched."""
        for model in (self.model, self.draft_model):
            if model is None:
                continue
            if kernels:
                model.use_kernels(self.options.kernels)
            model.host_cache_ahead = self.options.cache.host_cache_ahead

    def _eos_ids(self) -> set:
        ids = set(self.config.eos_token_ids)
        gen_cfg = self.path / "generation_config.json" if self.path else None
        if gen_cfg is not None and gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if not ids and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # -- input ---------------------------------------------------------------------------

    def encode(self, prompts: Sequence[Union[str, Sequence[int]]]) -> List[List[int]]:
        if isinstance(prompts, (str, bytes)) or not len(prompts):
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        vocab = self.config.vocab_size
        rows = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    where = (f"{self.path} has no tokenizer files" if self.path is not None
                             else "a model built in memory has no tokenizer")
                    raise ValueError(f"prompt {i} is text but {where}; pass token-id lists or "
                                     f"add a tokenizer")
                ids = self.tokenizer(p)["input_ids"]
            else:
                ids = [int(t) for t in p]
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise ValueError(f"prompt {i} has token id {bad[0]} outside the "
                                     f"vocabulary [0, {vocab})")
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            rows.append(ids)
        return rows

    # -- generation ----------------------------------------------------------------------

    def plan(self, rows: int, longest: int, max_new_tokens: int,
             prompts: Optional[Sequence[int]] = None, speculate: bool = True) -> Plan:
        """The run plan for `rows` prompts of at most `longest` tokens (`prompts`: their
        lengths in queue order, if known: the caches are sized by them).
        `speculate=False`: the target alone, a token a row a pass (a loaded draft's weights
        still count against the budget)."""
        options = self.options
        spec = self.draft_config is not None and speculate
        # Chain: γ+1 tokens per row per pass, caches γ+2 longer; tree: the largest tree.
        tokens, logit_rows, draft_tokens = 1 + MAX_DRAFT_LEN * spec, None, None
        host_tokens = None  # a host cache in row segments streams its pool, not rows × longest
        if not spec and prompts and host_cache_segmented(options.cache.segment_host_cache, prompts):
            host_tokens = lambda r: sum(prompts[:r]) + min(r, rows) * (max_new_tokens + 1)  # noqa: E731
        if spec and self.spec_mode(rows) == "tree":
            # Tree passes take the target's picks a few hundred nodes at a time.
            tokens, logit_rows = self.tree_capacity_for(rows), options.spec.logit_rows

            def target_slots(r):  # in the draft's segments, where those are taken
                slots, segmented = tree_cache_slots(min(r, rows), prompts, max_new_tokens, tokens,
                                                    options.cache)
                return slots if segmented else r * (longest + max_new_tokens + tokens + 1)

            if prompts:  # the draft's cache as the tree scheduler allocates it
                draft_tokens = lambda r: tree_cache_slots(  # noqa: E731
                    min(r, rows), prompts, max_new_tokens, tokens, options.cache)[0]
                if options.cache.segment_target_cache != "off":
                    host_tokens = target_slots
        elif spec and prompts:  # chain: the draft's cache as ChainPipeline allocates it
            draft_tokens = lambda r: chain_cache_slots(  # noqa: E731
                min(r, rows), prompts, max_new_tokens, options.cache)[0]
        return plan_run(self.weight_plan, self.config, self.dtype, rows=rows,
                        context=longest + max_new_tokens + (tokens + 1) * spec,
                        max_rows=options.max_rows, tokens_per_row=tokens,
                        prefill_tokens=longest, prefill_chunk=options.prefill_chunk,
                        kv_placement=options.kv_placement, profile=self.profile,
                        draft=self.draft_config, max_logit_rows=logit_rows,
                        draft_tokens=draft_tokens, draft_idle=not spec,
                        host_kv_tokens=host_tokens,
                        prompt_tokens=(lambda r: sum(prompts[:r])) if prompts else None,
                        host_budget=available_host_bytes() if self.device.type == "cuda" else None,
                        host_cache_ahead=options.cache.host_cache_ahead)

    def choose_speculation(self, rows: int, longest: int, max_new_tokens: int,
                           prompts: Optional[Sequence[int]] = None) -> Tuple[bool, Optional[str]]:
        """(speculate?, why not) for a workload, as generate(speculate=None) decides: with
        spec, draft_len and interleave unset, above TREE_MAX_ROWS prompts and with a hardware
        profile, speculation unless the target alone's plan serves more tokens a second than
        speculation's at SPECULATION_PRIOR_TOKENS (or the last speculative call's) tokens a
        row a pass, or no speculative plan fits the budget."""
        return self._choose_speculation(rows, longest, max_new_tokens, prompts)[:2]

    def _choose_speculation(self, rows: int, longest: int, max_new_tokens: int,
                            prompts: Optional[Sequence[int]] = None):
        """choose_speculation's answer and the plan of the choice (None where none was made),
        which generate then runs."""
        if self.draft_model is None:
            return False, None, None
        spec = self.options.spec
        if (spec.mode is not None or spec.draft_len is not None or spec.interleave is not None
                or self.profile is None or rows <= spec.interactive_rows):
            return True, None, None  # speculation settings asked for, or nothing to predict with
        try:
            guess = self.plan(rows, longest, max_new_tokens, prompts, speculate=True)
        except BudgetError as e:
            plain = self.plan(rows, longest, max_new_tokens, prompts, speculate=False)  # or raise
            return False, f"the target alone: no speculative plan fits ({e})", plain
        plain = self.plan(rows, longest, max_new_tokens, prompts, speculate=False)
        if not (guess.predicted_pass_seconds and plain.predicted_pass_seconds):
            return True, None, guess
        per_pass = self._spec_tokens_per_pass or spec.prior_tokens_per_pass
        spec_rate = min(rows, guess.rows_per_pass) * per_pass / guess.predicted_pass_seconds
        plain_rate = min(rows, plain.rows_per_pass) / plain.predicted_pass_seconds
        if plain_rate <= spec_rate:
            return True, None, guess
        return False, (f"the target alone: {min(rows, plain.rows_per_pass)} rows at "
                       f"{plain.predicted_pass_seconds:.3f} s a pass, {plain_rate:.1f} tokens/s, "
                       f"against {self.spec_mode(rows)} speculation's "
                       f"{min(rows, guess.rows_per_pass)} rows × {per_pass:.2f} tokens at "
                       f"{guess.predicted_pass_seconds:.3f} s, {spec_rate:.1f}"), plain

    def generate(self, prompts, params: Optional[SamplingParams] = None, *,
                 progress=None, speculate: Optional[bool] = None) -> List[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order.
        `speculate=False` runs the target alone even when a draft is loaded, True speculates
        whenever there is a draft; None (the default) lets the planner choose
        (choose_speculation: the reason is in last_stats.speculation_note)."""
        params = params or SamplingParams()
        rows = self.encode(prompts)
        for i, ids in enumerate(rows):
            try:
                self.config.check_context(len(ids) + params.max_new_tokens)
            except ValueError as e:
                raise type(e)(f"prompt {i} ({len(ids)} tokens): {e}") from None
        note = plan = None
        if speculate is None:
            speculate, note, plan = self._choose_speculation(
                len(rows), max(len(r) for r in rows), params.max_new_tokens, [len(r) for r in rows])
        speculate = bool(speculate) and self.draft_model is not None
        plan = plan or self.plan(len(rows), max(len(r) for r in rows), params.max_new_tokens,
                                 [len(r) for r in rows], speculate=speculate)
        seed = self.options.seed if params.seed is None else params.seed
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stats = GenerationStats(rows=len(rows), plan=plan.to_dict(),
                                predicted_pass_seconds=plan.predicted_pass_seconds,
                                predicted_prefill_seconds=plan.predicted_prefill_seconds,
                                speculated=speculate, speculation_note=note,
                                options=self.options.to_dict())
        ring = self.model.ring
        copied0 = ring.bytes_copied if ring is not None else 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.last_plan_pass_seconds = plan.predicted_pass_seconds
        if speculate and self.spec_mode(len(rows)) == "tree":
            outputs = self._speculate_tree(rows, params, generator, stats, plan, progress)
        elif speculate:
            outputs = self._speculate(rows, params, generator, stats, plan, progress)
        else:
            outputs = self._run_plain(rows, params, generator, stats, plan, progress)
        if not speculate and plan.predicted_pass_seconds and plan.predicted_prefill_seconds:
            stats.predicted_passes, stats.predicted_tokens_per_second = _plain_prediction(
                plan, len(rows), params.max_new_tokens)
        elif speculate and self.profile is not None and len(rows) > self.options.spec.interactive_rows:
            plain = self.plan(len(rows), max(len(r) for r in rows), params.max_new_tokens,
                              [len(r) for r in rows], speculate=False)
            if plain.predicted_pass_seconds and plain.predicted_prefill_seconds:
                stats.predicted_plain_tokens_per_second = _plain_prediction(
                    plain, len(rows), params.max_new_tokens)[1]
        stats.tokens = sum(len(o.token_ids) for o in outputs)
        stats.finalize()
        prior = self.options.spec.prior_tokens_per_pass
        if (speculate and len(rows) > self.options.spec.interactive_rows and stats.tokens_per_pass
                and params.max_new_tokens >= 4 * prior):
            # choose_speculation's next figure (not from a few tokens a row: they cap it)
            self._spec_tokens_per_pass = stats.tokens_per_pass
        stats.bytes_streamed = (ring.bytes_copied - copied0) if ring is not None else 0
        if self.device.type == "cuda":
            stats.peak_gpu_bytes = torch.cuda.max_memory_allocated(self.device)
        self.last_stats = stats
        return outputs

    def _run_plain(self, rows, params, generator, stats, plan, progress=None) -> List[RequestOutput]:
        """The target alone: the prompts in batches of the plan's rows, each prefilled, then
        decoded a token a pass; full batches count as steady state."""
        outputs: List[RequestOutput] = []
        for start in range(0, len(rows), plan.rows_per_pass):
            batch = rows[start:start + plan.rows_per_pass]
            seconds = stats.prefill_seconds + stats.decode_seconds
            done = [self._finish(ids, new, params)
                    for ids, new in zip(batch, self._generate_batch(batch, params, generator, stats, plan))]
            outputs += done
            if len(batch) == plan.rows_per_pass:  # a full batch: steady state
                stats.steady_tokens += sum(len(o.token_ids) for o in done)
                stats.steady_seconds += stats.prefill_seconds + stats.decode_seconds - seconds
            if progress is not None:
                progress.update(len(batch))
        return outputs

    @torch.inference_mode()
    def _generate_batch(self, rows, params: SamplingParams, generator, stats,
                        plan: Plan) -> List[List[int]]:
        device, model = self.device, self.model
        B, max_new = len(rows), params.max_new_tokens
        lens = torch.tensor([len(r) for r in rows], device=device)
        longest = max(len(r) for r in rows)
        cache_device = device if plan.kv_on_gpu else torch.device("cpu")
        _sync(device)
        # Timed from the cache's allocation, as the speculative runs are (pinned host memory
        # takes seconds the first time: hostmem.HostPool).
        t0 = time.perf_counter()
        cache = self._batch_cache(rows, max_new, cache_device)
        # Pads past a row's end are written beyond its length and so never attended to.
        ids = torch.zeros(B, longest, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
        chunk = row_chunk(plan.prefill_chunk, plan.rows_per_pass, B)
        last_logits = model.prefill(ids.to(device), lens, cache, chunk,
                                    lengths_host=[len(r) for r in rows])
        stats.prefill_passes += 1
        tokens = select(last_logits, params, generator, self.options.kernels)
        _sync(device)
        t1 = time.perf_counter()

        out = torch.empty(B, max_new, dtype=torch.long, device=device)
        out[:, 0] = tokens
        eos = torch.tensor(sorted(self.eos_token_ids) or [-1], device=device)
        done = torch.isin(tokens, eos) if not params.ignore_eos else torch.zeros_like(lens, dtype=torch.bool)
        # On the GPU every step attends over the whole cache (a fixed shape for CUDA graphs);
        # on the CPU only over the longest row so far.
        fixed_shape = device.type == "cuda"
        for step in range(1, max_new):
            # One host sync every 8 steps to stop once every row has finished.
            if step % 8 == 0 and not params.ignore_eos and bool(done.all()):
                out = out[:, :step]
                break
            kv_len = cache.max_len if fixed_shape else longest + step
            logits = model(tokens[:, None], cache, kv_len=kv_len)[:, 0]
            cache.advance(1)
            stats.decode_passes += 1
            tokens = select(logits, params, generator, self.options.kernels)
            out[:, step] = tokens
            if not params.ignore_eos:
                done |= torch.isin(tokens, eos)
        result = out.tolist()  # once per batch, after the decode loop
        t2 = time.perf_counter()
        stats.prefill_seconds += t1 - t0
        stats.decode_seconds += t2 - t1
        return result

    def _batch_cache(self, rows, max_new: int, where: torch.device) -> KVCache:
        """A plain batch's cache: dense, or rows in segments as CacheOptions says (each
        row's prompt and new tokens and a spare slot, one after another)."""
        cfg, lengths = self.config, [len(r) for r in rows]
        host = where.type != self.device.type
        if host_cache_segmented(self.options.cache.segment_host_cache, lengths, host):
            sizes = [n + max_new + 1 for n in lengths]
            starts = [0, *itertools.accumulate(sizes)][:-1]
            cache = SegmentKVCache(cfg.n_layers, len(rows), sum(sizes), max(sizes),
                                   cfg.n_kv_heads, cfg.head_dim, self.dtype, where,
                                   pin_memory=host, lengths_device=self.device)
            cache.assign(range(len(rows)), starts, sizes)
            return cache
        return KVCache(cfg.n_layers, len(rows), max(lengths) + max_new, cfg.n_kv_heads,
                       cfg.head_dim, self.dtype, where, pin_memory=host,
                       lengths_device=self.device)

    def tree_ladder(self, rows: int) -> List[int]:
        """The tree budgets a run over `rows` rows may use: the fixed budget, or with "auto"
        a ladder the tuner picks from each round: up to tree_budget_max for interactive
        batches; above them, up to the largest power of two whose trees keep the pass under
        SpecOptions.tree_pass_tokens (throughput_tree_budget nodes at least: 16 from 128 rows
        up, 32 from 64, ..., 512 at 5 to 7 rows)."""
        spec = self.options.spec
        if spec.tree_budget != "auto":
            return [spec.tree_budget]
        top = self.tree_budget_max
        if rows > spec.interactive_rows:
            top = spec.throughput_tree_budget
            while 2 * top * rows < spec.tree_pass_tokens:
                top *= 2
            top = min(top, self.tree_budget_max)
        return tree_budget_ladder(top)

    def tree_capacity_for(self, rows: int) -> int:
        """The largest tree (nodes per row) a round over `rows` rows may grow."""
        return max(self.tree_ladder(rows))

    def tree_acceptance_model(self):
        """Tree mode's learned acceptance (speculation.growth.AcceptanceModel), kept across calls so
        that later trees start from what earlier verifications taught; None with
        tree_scores="draft" (nodes ranked by the draft's log-probabilities)."""
        if self.options.spec.tree_scores != "learned":
            return None
        if self._tree_acceptance is None:
            self._tree_acceptance = AcceptanceModel(self.device)
        return self._tree_acceptance

    def reset_tree_acceptance(self) -> None:
        """Forget what tree mode learned about acceptance (the next tree starts from the
        draft's probabilities)."""
        self._tree_acceptance = None

    def spec_mode(self, rows: int) -> str:
        """spec=None picks tree speculation for interactive batches and, above them, where
        the target streams from host memory to a GPU (a copy-bound pass verifies a tree's
        tokens nearly for free); chain where chain settings were asked for (draft_len,
        interleave) or the target's pass costs its compute (resident, or on the CPU)."""
        spec = self.options.spec
        if spec.mode:
            return spec.mode
        if rows <= spec.interactive_rows:
            return "tree"
        if spec.draft_len is not None or spec.interleave:
            return "chain"
        streams = self.weight_plan.offload and self.device.type == "cuda"
        return "tree" if streams else "chain"

    def _speculate_tree(self, rows, params, generator, stats, plan,
                        progress=None) -> List[RequestOutput]:
        requests = _requests(rows, progress)
        per_pass = min(len(rows), plan.rows_per_pass)
        predict = None
        if self.profile is not None:  # the target pass at n nodes per row, from the profile
            context = max(len(r) for r in rows) + params.max_new_tokens
            predict = lambda n: predict_pass(  # noqa: E731
                plan, self.config, self.dtype, self.profile, per_pass, n, context + n)
        ladder = self.tree_ladder(len(rows))
        # What one call learnt about the budgets serves the next ones at the same batch size.
        tuner = self._tree_tuners.setdefault((per_pass, tuple(ladder)), TreeBudgetTuner(ladder))
        tuner.predict_pass = predict
        _sync(self.device)
        t0 = time.perf_counter()
        TreeScheduler(self._spec_run(), requests, params, generator, stats, plan.rows_per_pass,
                      tuner, kv_on_gpu=plan.kv_on_gpu, prefill_chunk=plan.prefill_chunk,
                      acceptance=self.tree_acceptance_model()).run()
        _sync(self.device)
        stats.decode_seconds += time.perf_counter() - t0
        stats.rows_per_group = per_pass
        stats.tree_budget = tuner.choice
        stats.tree_scores = self.options.spec.tree_scores
        if predict is not None and tuner.samples:
            # The planner's figure at the chosen budget: its predicted pass plus the measured
            # growth a round, over the passes this workload takes at the acceptance seen
            # (tree_passes: refills and the tail included), after the first prompts' prefill.
            n = stats.tree_budget
            curve = {c["budget"]: c for c in tuner.curve()}
            grows = {b: c["grow_seconds"] for b, c in curve.items()}
            rate = expected_tree_rates(
                [n], {b: c["tokens_per_pass"] for b, c in curve.items()}, {}, grows, predict)[n]
            stats.predicted_pass_seconds = predict(n)
            stats.predicted_tokens_per_second = per_pass * rate
            if stats.accepted_histogram:  # one wave too: its tail (the slowest row) counts
                stats.predicted_passes = tree_passes(len(rows), per_pass, params.max_new_tokens,
                                                     stats.accepted_histogram, self.options.seed,
                                                     request_histograms=stats.request_histograms)
                round_s = stats.predicted_pass_seconds + cost_at_budget(n, grows, None)
                seconds = (plan.predicted_prefill_seconds or 0.0) + stats.predicted_passes * round_s
                stats.predicted_tokens_per_second = len(rows) * params.max_new_tokens / seconds
        return [self._finish(r.prompt, r.tokens, params) for r in requests]

    @torch.inference_mode()
    def _speculate(self, rows, params, generator, stats, plan,
                   progress=None) -> List[RequestOutput]:
        requests = _requests(rows, progress)
        groups = self.chain_groups(len(rows), plan, max(map(len, rows)) + params.max_new_tokens)
        per_group = -(-min(len(rows), plan.rows_per_pass) // groups)
        _sync(self.device)
        t0 = time.perf_counter()  # the caches' allocation counted, as in the other modes
        pipeline = ChainScheduler(self._spec_run(), params, requests, per_group, groups,
                                  self.options.spec.draft_len, generator, stats,
                                  kv_on_gpu=plan.kv_on_gpu, prefill_chunk=plan.prefill_chunk)
        pipeline.run()
        _sync(self.device)
        stats.decode_seconds += time.perf_counter() - t0
        stats.groups, stats.rows_per_group = groups, per_group
        stats.draft_len = pipeline.gamma
        if stats.proposed:
            # The planner's figure: this workload's passes at the measured α and final γ
            # (E(α, γ) tokens per row per pass in steady state, plus the first prefill and
            # the tail), each costing the predicted pass (plus the draft's γ+1 steps when
            # they cannot hide under the other group's pass).
            stats.predicted_passes = chain_passes(len(rows), per_group, groups,
                                                  params.max_new_tokens,
                                                  stats.position_acceptance(), pipeline.gamma,
                                                  joint=pipeline.joint_tail)
        if plan.predicted_pass_seconds and pipeline.draft_step_s and stats.proposed:
            # The draft's round: its γ+1 steps (as measured: they pick γ) and, on average,
            # its prefill of the new prompts (predicted from its FLOPs; one part a refill).
            prefill = 0.0
            if self.profile is not None:
                prefill = predict_draft_prefill(
                    self.draft_config, self.dtype, self.profile,
                    sum(len(r) - 1 for r in rows), parts=stats.predicted_passes)
                prefill /= stats.predicted_passes
            draft = (pipeline.gamma + 1) * pipeline.draft_step_s + prefill
            stats.predicted_draft_seconds = draft
            round_s = (max(plan.predicted_pass_seconds, draft) if groups > 1
                       else plan.predicted_pass_seconds + draft)
            stats.predicted_tokens_per_second = (
                len(rows) * params.max_new_tokens / (stats.predicted_passes * round_s))
        return [self._finish(r.prompt, r.tokens, params) for r in requests]

    def _spec_run(self) -> SpecRun:
        """The narrow handle a speculative schedule runs with."""
        return SpecRun(self.model, self.draft_model, self.config, self.draft_config,
                       self.device, self.dtype, frozenset(self.eos_token_ids), self.options,
                       offloaded=self.weight_plan.offload,
                       predicted_pass_seconds=self.last_plan_pass_seconds)

    def chain_groups(self, rows: int, plan: Plan, context: int) -> int:
        """Row groups of a chain run: two interleaved (the draft hides under the other
        group's target pass) or one (each pass serves every row, the draft runs between
        passes). interleave=None picks the faster by the planner's prediction: two groups
        pay only when drafting for all rows takes a good part of a pass; an offloaded
        target's copy-bound pass usually dwarfs the draft, and one group then gets twice
        the rows into each pass."""
        spec = self.options.spec
        if rows < 2 or spec.interleave is False:
            return 1
        if spec.interleave or self.profile is None or not plan.predicted_pass_seconds:
            return 2 if spec.interleave else 1
        return predict_chain_groups(plan, self.config, self.draft_config, self.dtype,
                                    self.profile, min(rows, plan.rows_per_pass),
                                    spec.draft_len or 4, context)

    def _finish(self, prompt_ids, new_ids, params: SamplingParams) -> RequestOutput:
        reason = "length"
        if not params.ignore_eos:
            for i, t in enumerate(new_ids):
                if t in self.eos_token_ids:
                    new_ids, reason = new_ids[:i + 1], "stop"
                    break
        text = (self.tokenizer.decode(new_ids, skip_special_tokens=True)
                if self.tokenizer is not None else "")
        return RequestOutput(list(prompt_ids), list(new_ids), text, reason)
