"""The engine behind `specoff.LLM`: prompts in, tokens out, with the run's figures.

This is plain batched generation (prefill, then one target step per token). Speculation
(a draft model, chain and tree verification) and offloading the target to host memory
plug in here; until they land, asking for them is refused with a clear error.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from .config import ModelConfig
from .sampling import SamplingParams, select
from .weights import default_device, load_model, load_tokenizer, parse_dtype


@dataclass
class RequestOutput:
    prompt_token_ids: List[int]
    token_ids: List[int]
    text: str
    finish_reason: str  # "stop" (an EOS token) or "length" (max_new_tokens)


@dataclass
class GenerationStats:
    """Figures of the last `generate` call. Only returned tokens are counted."""
    rows: int = 0
    tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    target_passes: int = 0
    plan: Optional[dict] = None
    acceptance_rate: Optional[float] = None
    tokens_per_pass: Optional[float] = None

    @property
    def tokens_per_second(self) -> float:
        """Returned tokens over the whole run's time (prefill + decode)."""
        total = self.prefill_seconds + self.decode_seconds
        return self.tokens / total if total > 0 else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), tokens_per_second=self.tokens_per_second)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LLM:
    """A target model (and, later, a draft) ready to generate.

    `LLM(target, draft=None, *, spec=None, device=None, dtype=None, gpu_memory=None,
    offload=None, seed=0)`; `target` is a Hugging Face checkpoint folder.
    """

    def __init__(self, target, draft=None, *, spec=None, device=None, dtype=None,
                 gpu_memory=None, offload=None, seed: int = 0, max_rows: int = 256,
                 prefill_chunk: int = 512):
        if draft is not None or spec is not None:
            raise NotImplementedError("speculative decoding (draft=..., spec=...) is not "
                                      "supported yet; leave draft and spec unset")
        if offload:
            raise NotImplementedError("offload=True is not supported yet; use offload=None "
                                      "or False (the target stays on the device)")
        if gpu_memory is not None:
            raise NotImplementedError("gpu_memory=... is not supported yet (it comes with "
                                      "offloading); leave it unset")
        if max_rows < 1 or prefill_chunk < 1:
            raise ValueError("max_rows and prefill_chunk must be positive")
        self.path = Path(target)
        self.config = ModelConfig.from_hf(self.path)  # fails early on an unsupported family
        self.device = default_device(device)
        self.dtype = parse_dtype(dtype) or (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_model(self.path, self.device, self.dtype)
        self.seed = seed
        self.max_rows = max_rows
        self.prefill_chunk = prefill_chunk
        self.eos_token_ids = self._eos_ids()
        self.last_stats = GenerationStats()

    def _eos_ids(self) -> set:
        ids = set(self.config.eos_token_ids)
        gen_cfg = self.path / "generation_config.json"
        if gen_cfg.is_file():
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
                    raise ValueError(f"prompt {i} is text but {self.path} has no tokenizer "
                                     f"files; pass token-id lists or add a tokenizer")
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

    def generate(self, prompts, params: Optional[SamplingParams] = None, *,
                 progress=None) -> List[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order."""
        params = params or SamplingParams()
        rows = self.encode(prompts)
        for i, ids in enumerate(rows):
            try:
                self.config.check_context(len(ids) + params.max_new_tokens)
            except ValueError as e:
                raise type(e)(f"prompt {i} ({len(ids)} tokens): {e}") from None
        seed = self.seed if params.seed is None else params.seed
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stats = GenerationStats(rows=len(rows))
        outputs: List[RequestOutput] = []
        for start in range(0, len(rows), self.max_rows):
            batch = rows[start:start + self.max_rows]
            for ids, new in zip(batch, self._generate_batch(batch, params, generator, stats)):
                outputs.append(self._finish(ids, new, params))
            if progress is not None:
                progress.update(len(batch))
        stats.tokens = sum(len(o.token_ids) for o in outputs)
        self.last_stats = stats
        return outputs

    @torch.inference_mode()
    def _generate_batch(self, rows, params: SamplingParams, generator, stats) -> List[List[int]]:
        device, model = self.device, self.model
        B, max_new = len(rows), params.max_new_tokens
        lens = torch.tensor([len(r) for r in rows], device=device)
        longest = max(len(r) for r in rows)
        cache = model.new_cache(B, longest + max_new)

        _sync(device)
        t0 = time.perf_counter()
        # Prefill in chunks: each row writes its own tokens; pads past a row's end are
        # written beyond its length and so never attended to.
        ids = torch.zeros(B, longest, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
        ids = ids.to(device)
        last_logits = None
        for lo in range(0, longest, self.prefill_chunk):
            hi = min(lo + self.prefill_chunk, longest)
            last = (lens - 1 - lo).clamp(0, hi - lo - 1)
            logits = model(ids[:, lo:hi], cache, kv_len=hi, logits_at=last[:, None])[:, 0]
            ends_here = ((lens - 1 >= lo) & (lens - 1 < hi))[:, None]
            last_logits = logits if last_logits is None else torch.where(ends_here, logits,
                                                                         last_logits)
            cache.advance((lens - lo).clamp(0, hi - lo))
            stats.target_passes += 1
        tokens = select(last_logits, params, generator)
        _sync(device)
        t1 = time.perf_counter()

        out = torch.empty(B, max_new, dtype=torch.long, device=device)
        out[:, 0] = tokens
        eos = torch.tensor(sorted(self.eos_token_ids) or [-1], device=device)
        done = torch.isin(tokens, eos) if not params.ignore_eos else torch.zeros_like(lens, dtype=torch.bool)
        for step in range(1, max_new):
            # One host sync every 8 steps to stop once every row has finished.
            if step % 8 == 0 and not params.ignore_eos and bool(done.all()):
                out = out[:, :step]
                break
            logits = model(tokens[:, None], cache, kv_len=longest + step)[:, 0]
            cache.advance(1)
            stats.target_passes += 1
            tokens = select(logits, params, generator)
            out[:, step] = tokens
            if not params.ignore_eos:
                done |= torch.isin(tokens, eos)
        result = out.tolist()
        t2 = time.perf_counter()
        stats.prefill_seconds += t1 - t0
        stats.decode_seconds += t2 - t1
        return result

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
