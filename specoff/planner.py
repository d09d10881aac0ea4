"""Planner v1: where the target's weights and KV cache live under a GPU memory budget, and
how long a pass should take.

The hardware profile (pinned host→GPU copy rate, matrix-product rate, HBM rate, CPU
attention rate) is measured once per device and cached as JSON. A pass over an offloaded
target costs max(bytes streamed / copy rate, compute), since copies and compute run on two
streams (docs/design.md); prefill streams each layer once and computes every prompt token.

Tree speculation (SpecExec): the node budget that maximises tokens/s, from the pass time at
that many tokens, the measured tree growth and the measured acceptance-vs-budget curve
(choose_tree_budget), picked again between rounds (TreeBudgetTuner).
"""
from __future__ import annotations

import bisect
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import hostmem
from .config import ModelConfig
from .hostmem import GiB, BudgetError, HostMemoryError, parse_bytes  # noqa: F401 (re-exported)
from .kernels.moe import fused_moe, moe_route
from .offload import copy_gbps

CONTEXT_MARGIN = 256 << 20  # allocator slack, graph pools, cuBLAS workspaces


# -- hardware profile -------------------------------------------------------------------------

@dataclass
class HardwareProfile:
    device_name: str
    copy_gbps: float  # pinned host → device
    gemm_tflops: float  # dense matrix products in the model's dtype
    moe_tflops: float  # the fused MoE kernel on a mid-size grouped problem
    hbm_gbps: float  # device memory, read + write

    def to_dict(self) -> dict:
        return asdict(self)


def _timed(fn, device, repeat=5, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / repeat


def measure_profile(device, dtype=torch.bfloat16) -> HardwareProfile:
    device = torch.device(device)
    cuda = device.type == "cuda"
    # In 1 GiB copies, as tools/bench.py's physical-limit line measures it (smaller copies
    # read a few percent low).
    copy = copy_gbps(device, (1 << 30) if cuda else (32 << 20))
    n = (256 << 20) if cuda else (32 << 20)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    dev2 = torch.empty_like(dev)
    hbm = 2 * n / _timed(lambda: dev2.copy_(dev), device) / 1e9
    # Large enough that launch latency and clock ramp-up vanish (8192³ ≈ 1 ms on Hopper).
    m = 8192 if cuda else 512
    a = torch.randn(m, m, device=device, dtype=dtype if cuda else torch.float32)
    gemm = 2 * m**3 / _timed(lambda: a @ a, device, repeat=20 if cuda else 3) / 1e12
    moe = gemm
    if cuda:
        E, D, I, N, k = 8, 2048, 7168, 8192, 2
        x = torch.randn(N, D, device=device, dtype=dtype)
        w13 = torch.randn(E, 2 * I, D, device=device, dtype=dtype) * 0.02
        w2 = torch.randn(E, D, I, device=device, dtype=dtype) * 0.02
        weights, ids = moe_route(torch.randn(N, E, device=device), k, True)
        out = torch.empty_like(x)
        seconds = _timed(lambda: fused_moe(x, w13, w2, weights, ids, out=out), device, repeat=10)
        moe = 2 * N * k * 3 * D * I / seconds / 1e12
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return HardwareProfile(name, copy, gemm, moe, hbm)


def profile_path(device_name: str, cache_dir: Optional[Path] = None,
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name)
    # Rates depend on the dtype (fp32 products run at a fraction of bf16's).
    return Path(cache_dir or hostmem.cache_dir()) / f"profile-{safe}-{str(dtype).split('.')[-1]}.json"


def load_profile(device, cache_dir: Optional[Path] = None, dtype=torch.bfloat16) -> HardwareProfile:
    """The device's profile in `dtype` from the cache, measured and cached on first use."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = profile_path(name, cache_dir, dtype)
    if path.is_file():
        try:
            return HardwareProfile(**json.loads(path.read_text()))
        except (TypeError, ValueError):
            pass  # an old or damaged cache entry: measure again
    profile = measure_profile(device, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=1))
    tmp.replace(path)
    return profile


# -- sizes ------------------------------------------------------------------------------------

@dataclass
class ModelSizes:
    """Bytes of each part of a model in one dtype."""
    outside_layers: int  # embeddings, head, final norm
    layer_attention: int  # one layer's attention, norms and router
    layer_ffn: int  # one layer's feed-forward (all experts)
    kv_per_token: int  # all layers, K and V
    n_layers: int
    n_experts: int = 0

    @property
    def piece_options(self) -> List[int]:
        """How many ring units a streamed layer may split into (by its experts)."""
        return [1] + [p for p in (2, 4, 8) if self.n_experts >= p and self.n_experts % p == 0]

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: torch.dtype, kv_dtype: Optional[torch.dtype] = None):
        """`kv_dtype`: the cache's, where it differs from the weights'."""
        b = torch.empty(0, dtype=dtype).element_size()
        kv_b = torch.empty(0, dtype=kv_dtype or dtype).element_size()
        D, V, hd = cfg.dim, cfg.vocab_size, cfg.head_dim
        outside = V * D * (1 if cfg.tie_word_embeddings else 2) + D
        attn = D * cfg.qkv_size + cfg.n_heads * hd * D + 2 * D
        attn += cfg.qkv_size * cfg.qkv_bias + D * cfg.o_bias + 2 * hd * cfg.qk_norm
        ffn = 3 * D * cfg.ffn_size * max(cfg.n_experts, 1)
        attn += D * cfg.n_experts  # the router
        kv = cfg.n_layers * 2 * cfg.n_kv_heads * hd
        if cfg.weight_quant == "fp8":  # the linear weights a byte each, a scale per row
            # (specoff.quant.Fp8Linear: dense models; norms and biases stay in dtype)
            linear_attn, rows_attn = D * cfg.qkv_size + cfg.n_heads * hd * D, cfg.qkv_size + D
            rows_ffn = 2 * cfg.ffn_size + D
            return cls(outside * b, (attn - linear_attn + rows_attn) * b + linear_attn,
                       (ffn - 3 * D * cfg.ffn_size + rows_ffn) * b + 3 * D * cfg.ffn_size,
                       kv * kv_b, cfg.n_layers, cfg.n_experts)
        return cls(outside * b, attn * b, ffn * b, kv * kv_b, cfg.n_layers, cfg.n_experts)

    @property
    def layer(self) -> int:
        return self.layer_attention + self.layer_ffn

    @property
    def total(self) -> int:
        return self.outside_layers + self.n_layers * self.layer


def activation_bytes(cfg: ModelConfig, tokens: int, logit_rows: int, dtype: torch.dtype) -> int:
    """A generous bound on the transient memory of one layer step over `tokens` tokens, plus
    the fp32 logits and sampling buffers of `logit_rows` positions at the head."""
    b = torch.empty(0, dtype=dtype).element_size()
    per_token = (6 * cfg.dim + 2 * cfg.qkv_size + 3 * max(cfg.top_k, 1) * cfg.ffn_size) * b
    return tokens * per_token + logit_rows * 4 * 4 * cfg.vocab_size


# -- plans ------------------------------------------------------------------------------------

@dataclass
class Plan:
    offload: bool
    budget_bytes: Optional[int]
    resident_attention: bool = True
    resident_layers: int = 0
    ring_slots: int = 0
    ring_pieces: int = 1  # a streamed layer moves in this many ring units
    kv_on_gpu: bool = True
    rows_per_pass: int = 1
    prefill_chunk: int = 512
    tokens_per_row: int = 1  # tokens each row brings to a decode pass
    gpu_bytes: dict = field(default_factory=dict)
    stream_bytes_per_pass: int = 0
    predicted_pass_seconds: Optional[float] = None
    predicted_prefill_seconds: Optional[float] = None
    host_cache_bytes: int = 0  # the target's cache in pinned host memory (kv_on_gpu False)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def planned_gpu_bytes(self) -> int:
        return sum(self.gpu_bytes.values())


def _weight_bytes_on_gpu(sizes: ModelSizes, resident_attention: bool, resident_layers: int,
                         slots: int, pieces: int = 1) -> dict:
    streamed = sizes.n_layers - resident_layers
    # A slot holds one piece: a share of the experts, and the attention when it streams
    # (it rides with piece 0, so every slot is sized for that one).
    slot = sizes.layer_ffn // pieces + (0 if resident_attention else sizes.layer_attention)
    attention = (streamed * sizes.layer_attention) if resident_attention else 0
    return {"outside_layers": sizes.outside_layers, "resident_layers": resident_layers * sizes.layer,
            "resident_attention": attention, "ring": min(slots, streamed * pieces) * slot}


def smallest_weights(sizes: ModelSizes) -> int:
    """GPU bytes of the smallest offloaded plan: embeddings and head resident, everything
    else streamed through two slots of the smallest pieces."""
    return sum(_weight_bytes_on_gpu(sizes, False, 0, 2, sizes.piece_options[-1]).values())


def weight_reserve(cfg: ModelConfig, dtype: torch.dtype, budget: int, max_rows: int,
                   draft: Optional[ModelConfig] = None, tree_rows: int = 0,
                   tree_nodes: int = 0) -> int:
    """Bytes `plan_weights` keeps free of the target's weights: a resident draft's weights,
    and room for KV caches and activations — a quarter of what the draft and the smallest
    offloaded plan leave, more (up to half) when `max_rows` rows of 512 tokens need it.
    Attention, more ring slots and whole layers go resident only beyond it.

    With a draft, rows come first (up to all that is free): the draft's cache must sit on
    the GPU, every row of a pass needs it, and tokens per second grow with the rows while
    resident attention or a wider ring saves a few percent of a copy-bound pass.
    `tree_rows`, `tree_nodes`: the rows tree mode may run at once and the nodes of its
    largest tree (with the bonus token): room is kept for such a verification pass too (its
    activations, logits and K/V beside 512-token prompts), or the run plan would have to
    drop rows or move the cache to the host."""
    sizes = ModelSizes.of(cfg, dtype)
    smallest = min(sizes.total, smallest_weights(sizes))
    if draft is not None:
        d = ModelSizes.of(draft, dtype)
        free = max(budget - d.total - smallest - CONTEXT_MARGIN, 0)
        rows_need = max_rows * 512 * d.kv_per_token + activation_bytes(draft, max_rows * 8, max_rows, dtype)
        tokens = tree_rows * tree_nodes
        tree_need = (activation_bytes(cfg, tokens, tokens, dtype)
                     + activation_bytes(draft, tokens, 0, dtype)
                     + tree_rows * (tree_nodes + 512) * (sizes.kv_per_token + d.kv_per_token))
        return d.total + max(free // 4, min(free, max(rows_need, tree_need)))
    free = max(budget - smallest - CONTEXT_MARGIN, 0)
    return max(free // 4, min(free // 2, max_rows * 512 * sizes.kv_per_token))


def plan_weights(cfg: ModelConfig, dtype: torch.dtype, budget: Optional[int], *,
                 offload: Optional[bool], reserve: int, ring_slots: int = 3,
                 ring_pieces: Optional[int] = None) -> Plan:
    """Where the weights go, keeping `reserve` bytes for KV cache and activations.

    offload=False: everything on the device (refused if it cannot fit); None: resident when
    it fits, else offloaded; True: every decoder layer streams (nothing but embeddings, head,
    norms, routers and attention stays, and attention only if it fits). A streamed
    mixture-of-experts layer moves in whole-layer slots or in pieces of its experts
    (`ring_pieces`; None lets the budget decide): whichever streams the fewest bytes a pass,
    whole layers on a tie.
    """
    sizes = ModelSizes.of(cfg, dtype)
    fixed = reserve + CONTEXT_MARGIN
    resident_total = sizes.total + fixed
    if offload is False or (offload is None and (budget is None or resident_total <= budget)):
        if budget is not None and resident_total > budget:
            raise BudgetError(
                f"the model needs {resident_total / GiB:.1f} GiB on the GPU ({sizes.total / GiB:.1f} "
                f"GiB of weights + {fixed / GiB:.1f} GiB for cache and activations) but "
                f"gpu_memory is {budget / GiB:.1f} GiB; raise gpu_memory or use offload=True")
        gpu = {"weights": sizes.total}
        return Plan(offload=False, budget_bytes=budget, resident_layers=cfg.n_layers, gpu_bytes=gpu)
    options = sizes.piece_options
    if ring_pieces is not None:
        if ring_pieces not in options:
            raise ValueError(f"ring_pieces={ring_pieces} does not split this model's layers: "
                             f"it takes one of {options} (a layer splits by its experts)")
        options = [ring_pieces]
    # Smallest offloaded plan: two slots of the smallest pieces, nothing else resident.
    smallest = sum(_weight_bytes_on_gpu(sizes, False, 0, 2, options[-1]).values()) + fixed
    if budget is not None and smallest > budget:
        split = " of the smallest pieces" if options[-1] > 1 else ""
        raise BudgetError(
            f"gpu_memory={budget / GiB:.2f} GiB is too small for any plan: the smallest "
            f"(embeddings and head resident, two streamed layer slots{split}, cache and "
            f"activations) needs {smallest / GiB:.2f} GiB; raise gpu_memory to at least that")

    def fits(gpu):
        return budget is None or sum(gpu.values()) + fixed <= budget

    def resident_layers(attention, pieces, slots):
        resident = 0
        if offload is None and budget is not None:
            # Spare memory holds whole layers, which then never stream.
            while resident < cfg.n_layers - 1 and fits(
                    _weight_bytes_on_gpu(sizes, attention, resident + 1, slots, pieces)):
                resident += 1
        return resident

    # The plan that streams the fewest bytes a pass: small expert pieces in the ring can leave
    # room for whole resident layers that whole-layer slots would take (Mixtral 8x7B, 24 GiB,
    # no draft: 3 layer slots are 8.5 GB, 2 one-expert slots 0.7 GB). On equal bytes, the
    # first of: attention resident, whole layers (fewer, larger copies), more slots.
    best = None
    for attention in (True, False):
        for pieces in options:
            slots = next((n for n in range(max(ring_slots, 2), 1, -1)
                          if fits(_weight_bytes_on_gpu(sizes, attention, 0, n, pieces))), None)
            if slots is None:
                continue
            resident = resident_layers(attention, pieces, slots)
            stream = (cfg.n_layers - resident) * (sizes.layer_ffn if attention else sizes.layer)
            if best is None or stream < best[0]:
                best = (stream, attention, pieces, slots, resident)
    stream, attention, pieces, slots, resident = best
    gpu = _weight_bytes_on_gpu(sizes, attention, resident, slots, pieces)
    return Plan(offload=True, budget_bytes=budget, resident_attention=attention,
                resident_layers=resident, ring_slots=slots, ring_pieces=pieces, gpu_bytes=gpu,
                stream_bytes_per_pass=stream)


def plan_run(weights: Plan, cfg: ModelConfig, dtype: torch.dtype, *, rows: int, context: int,
             max_rows: int, tokens_per_row: int = 1, prefill_tokens: int = 0,
             prefill_chunk: int = 512, kv_placement: Optional[str] = None,
             profile: Optional[HardwareProfile] = None,
             draft: Optional[ModelConfig] = None, max_logit_rows: Optional[int] = None,
             draft_tokens: Optional[Callable[[int], int]] = None,
             draft_idle: bool = False,
             host_kv_tokens: Optional[Callable[[int], int]] = None,
             prompt_tokens: Optional[Callable[[int], int]] = None,
             host_budget: Optional[int] = None, host_cache_ahead: int = 1) -> Plan:
    """Rows per pass, KV placement and predicted times for a workload, within the budget
    left by the weights. `kv_placement` "gpu" or "host" forces the cache's place; by
    default it is on the GPU when it fits, else (for an offloaded target) in host memory.
    `max_logit_rows`: the pass's logits are taken that many positions at a time (tree mode:
    speculation.verify.target_picks), at least a row's worth each (a refill's first tokens).
    `draft_tokens(r)`: the token slots of the draft's cache over r rows (default r ×
    `context`; tree mode's segment pool: speculation.tree_scheduler.draft_cache_slots). `draft_idle`: the
    draft is loaded but the run does not speculate (its weights count, its cache and steps
    do not). `host_kv_tokens(r)`: the token slots of r rows' cache a pass streams from the
    host (default r × `context`; rows in segments: engine.LLM._batch_cache).
    `prompt_tokens(r)`: the first r rows' prompt tokens, for the prefill's memory and time
    (prompts are packed, not padded to `prefill_tokens`; default r × `prefill_tokens`).
    `host_budget`: the host memory a cache there may take (hostmem.available_host_bytes);
    rows beyond it are dropped, and where not even one row's fits, HostMemoryError says so.
    `host_cache_ahead`: layers of a host cache fetched ahead of the computing one
    (CacheOptions.host_cache_ahead)."""
    if kv_placement not in (None, "gpu", "host"):
        raise ValueError(f"kv_placement must be 'gpu', 'host' or None, not {kv_placement!r}")
    sizes = ModelSizes.of(cfg, dtype)
    budget = weights.budget_bytes
    draft_sizes = ModelSizes.of(draft, dtype) if draft is not None else None
    draft_weights = draft_sizes.total if draft_sizes else 0  # a draft is wholly resident
    used = sum(weights.gpu_bytes.values()) + draft_weights + CONTEXT_MARGIN
    rows_per_pass = max(1, min(rows, max_rows))
    chunk = max(1, min(prefill_chunk, prefill_tokens or prefill_chunk))

    def streamed_tokens(r):  # the token slots of r rows' cache in host memory
        return host_kv_tokens(r) if host_kv_tokens else r * context

    def need(r, kv_gpu, c):
        logit_rows = r * tokens_per_row
        if max_logit_rows is not None:
            logit_rows = min(logit_rows, max(max_logit_rows, r))
        act = activation_bytes(cfg, max(r * tokens_per_row, r * c), logit_rows, dtype)
        # The prompts' hidden states through the prefill (packed one after another where
        # their lengths are known: models.passes.PrefillBatch; else each padded to the longest).
        prompt = prompt_tokens(r) if prompt_tokens else r * max(prefill_tokens, 1)
        hidden = prompt * cfg.dim * torch.empty(0, dtype=dtype).element_size()
        kv = r * context * sizes.kv_per_token if kv_gpu else 0
        # Prompts fill a cache away from the GPU (or rows of a larger one) through a
        # one-layer scratch of their K/V (models.passes.PrefillStage, PackedStage).
        hidden += prompt * sizes.kv_per_token // cfg.n_layers
        if not kv_gpu:  # layers of it stream in for attention: one read, the next ones coming
            in_flight = 1 + max(host_cache_ahead, 1)
            hidden += in_flight * streamed_tokens(r) * sizes.kv_per_token // cfg.n_layers
        if draft_sizes is not None and not draft_idle:  # the draft's cache and steps live on the GPU
            kv += (draft_tokens(r) if draft_tokens else r * context) * draft_sizes.kv_per_token
            act += activation_bytes(draft, r * max(tokens_per_row, c), r, dtype)
            if draft.weight_quant:  # a product's weight, dequantized for it (quant.Fp8Linear)
                act += 2 * draft.ffn_size * draft.dim * torch.empty(0, dtype=dtype).element_size()
        return kv, act + hidden

    kv_gpu = kv_placement != "host"
    host_kv_allowed = kv_placement is None
    while True:
        kv, act = need(rows_per_pass, kv_gpu, chunk)
        if budget is None or used + kv + act <= budget:
            break
        if chunk > 16:
            chunk //= 2
        elif kv_gpu and host_kv_allowed and weights.offload:
            kv_gpu, chunk = False, max(1, min(prefill_chunk, prefill_tokens or prefill_chunk))
        elif rows_per_pass > 1:  # the most rows that fit: bisect on the row count
            lo, hi = 0, rows_per_pass
            while hi - lo > 1:
                mid = (lo + hi) // 2
                k, a = need(mid, kv_gpu, chunk)
                lo, hi = (mid, hi) if used + k + a <= budget else (lo, mid)
            rows_per_pass = max(lo, 1)
        else:
            raise BudgetError(
                f"gpu_memory={budget / GiB:.2f} GiB leaves {(budget - used) / GiB:.2f} GiB after "
                f"the weights, too little for even one row of {context} tokens "
                f"({(kv + act) / GiB:.2f} GiB); raise gpu_memory or shorten the context")
    host_bytes = 0
    if not kv_gpu:
        # The cache in pinned host memory must fit what the host has free (the weights' store
        # is already there): past it the process is killed, not refused. Fewer rows take
        # less of both memories, so the GPU fit above still holds.
        def host_need(r):
            return streamed_tokens(r) * sizes.kv_per_token

        if host_budget is not None and host_need(rows_per_pass) > host_budget:
            lo, hi = 0, rows_per_pass
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if host_need(mid) <= host_budget else (lo, mid)
            if lo == 0:
                raise HostMemoryError(
                    f"host memory: {max(host_budget, 0) / GiB:.2f} GiB is free beside the weights' "
                    f"store, too little for even one row's cache of {context} tokens in pinned "
                    f"host memory ({host_need(1) / GiB:.2f} GiB; the GPU budget leaves no room for "
                    f"it there); free host memory, shorten the prompts or max_new_tokens, or raise "
                    f"gpu_memory")
            rows_per_pass = lo
            kv, act = need(rows_per_pass, kv_gpu, chunk)
        host_bytes = host_need(rows_per_pass)
    plan = Plan(**{**weights.to_dict(), "kv_on_gpu": kv_gpu, "rows_per_pass": rows_per_pass,
                   "prefill_chunk": chunk, "tokens_per_row": tokens_per_row,
                   "host_cache_bytes": host_bytes})
    plan.gpu_bytes = dict(weights.gpu_bytes, kv_cache=kv, activations=act)
    if draft_weights:
        plan.gpu_bytes["draft_weights"] = draft_weights
    if profile is not None:
        kv_tokens = host_kv_tokens(rows_per_pass) if host_kv_tokens and not kv_gpu else None
        plan.predicted_pass_seconds = predict_pass(plan, cfg, dtype, profile, rows_per_pass,
                                                   tokens_per_row, context, kv_tokens)
        # Prefill pays for filling the pipeline: the first streamed layer's copy is not hidden.
        first_copy = (plan.stream_bytes_per_pass / max(cfg.n_layers - plan.resident_layers, 1)
                      / (profile.copy_gbps * 1e9))
        mean = (prompt_tokens(rows_per_pass) / rows_per_pass if prompt_tokens
                else prefill_tokens)
        plan.predicted_prefill_seconds = first_copy + predict_pass(
            plan, cfg, dtype, profile, rows_per_pass, max(round(mean), 1), round(mean))
    return plan


def predict_pass(plan: Plan, cfg: ModelConfig, dtype, profile: HardwareProfile, rows: int,
                 tokens_per_row: int, context: int, kv_tokens: Optional[int] = None) -> float:
    """Seconds for one pass of `rows` × `tokens_per_row` tokens over a `context`-long cache
    (`kv_tokens`: the cache's token slots, where not rows × context: rows in segments)."""
    sizes = ModelSizes.of(cfg, dtype)
    tokens = rows * tokens_per_row
    active_ffn = 3 * cfg.dim * cfg.ffn_size * max(cfg.top_k, 1)
    attn_params = sizes.layer_attention / torch.empty(0, dtype=dtype).element_size()
    dense = 2 * tokens * cfg.n_layers * attn_params
    dense += 4 * tokens * context * cfg.n_heads * cfg.head_dim * cfg.n_layers  # attention
    ffn = 2 * tokens * cfg.n_layers * active_ffn
    ffn_rate = profile.moe_tflops if cfg.is_moe else profile.gemm_tflops
    compute = dense / (profile.gemm_tflops * 1e12) + ffn / (ffn_rate * 1e12)
    kv_bytes = (rows * context if kv_tokens is None else kv_tokens) * sizes.kv_per_token
    attention = kv_bytes / (profile.hbm_gbps * 1e9)
    # Experts no token routes to still stream (every expert is copied each pass).
    weights_read = sizes.total if not plan.offload else sizes.total - plan.stream_bytes_per_pass
    compute += weights_read / (profile.hbm_gbps * 1e9)
    # A cache in host memory streams in beside the weights (models.host_cache.streamed_attention).
    copy = (plan.stream_bytes_per_pass + (0 if plan.kv_on_gpu else kv_bytes)) / (profile.copy_gbps * 1e9)
    # launches: a layer streamed in pieces runs its experts once a piece
    return max(copy, compute + attention) + cfg.n_layers * 20e-6 * plan.ring_pieces


def predict_draft_step(cfg: ModelConfig, dtype, profile: HardwareProfile, rows: int,
                       context: int) -> float:
    """Seconds for one decode step of a resident draft over `rows` rows: its weights and
    cache read from device memory, its matrix products, and a floor per layer for the
    launches of a replayed graph."""
    sizes = ModelSizes.of(cfg, dtype)
    params = sizes.total / torch.empty(0, dtype=dtype).element_size()
    read = (sizes.total + rows * context * sizes.kv_per_token) / (profile.hbm_gbps * 1e9)
    return max(read, 2 * rows * params / (profile.gemm_tflops * 1e12)) + cfg.n_layers * 30e-6


def predict_draft_prefill(cfg: ModelConfig, dtype, profile: HardwareProfile, tokens: int,
                          parts: int = 1) -> float:
    """Seconds for a resident draft to prefill `tokens` prompt tokens in `parts` parts: the
    layers' matrix products (2 FLOPs a weight a token) at the measured GEMM rate (attention
    within prompts of a few hundred tokens is small beside them), and a floor per layer and
    part for the launches, which run eagerly."""
    sizes = ModelSizes.of(cfg, dtype)
    weights = sizes.n_layers * sizes.layer / torch.empty(0, dtype=dtype).element_size()
    return 2 * tokens * weights / (profile.gemm_tflops * 1e12) + parts * cfg.n_layers * 0.3e-3


def expected_tokens_per_pass(alpha: float, draft_len: int) -> float:
    """E = (1 − α^(γ+1)) / (1 − α): mean tokens a row emits per chain pass (Leviathan et al.
    2023, §3.1)."""
    if alpha >= 1.0:
        return draft_len + 1.0
    return (1 - alpha ** (draft_len + 1)) / (1 - alpha)


def chain_groups(plan: Plan, cfg: ModelConfig, draft: ModelConfig, dtype,
                 profile: HardwareProfile, rows: int, gamma: int, context: int,
                 alpha: float = 0.7) -> int:
    """1 or 2 row groups for a chain run of `rows` rows, whichever the profile predicts
    faster: two groups hide the draft under the other group's target pass but serve half
    the rows per pass, (R/2)·E / max(target, draft); one group serves them all,
    R·E / (target + draft)."""
    def rate(r, interleaved):
        target = predict_pass(plan, cfg, dtype, profile, r, gamma + 1, context)
        drafting = (gamma + 1) * predict_draft_step(draft, dtype, profile, r, context)
        round_s = max(target, drafting) if interleaved else target + drafting
        return r * expected_tokens_per_pass(alpha, gamma) / round_s

    return 2 if rows > 1 and rate(-(-rows // 2), True) > rate(rows, False) else 1


# -- tree budget (SpecExec mode) --------------------------------------------------------------

def tree_budget_ladder(max_budget: int, min_budget: int = 16) -> List[int]:
    """The budgets auto mode chooses among: powers of two from min_budget up to max_budget
    (and max_budget itself)."""
    low = min(min_budget, max_budget)
    ladder, n = [], low
    while n < max_budget:
        ladder.append(n)
        n *= 2
    return ladder + [max_budget]


def _linear(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear through (xs, ys) (xs ascending), the end segments extended with a
    slope of at least 0; a single point is a constant."""
    if len(xs) == 1:
        return ys[0]
    i = max(1, min(bisect.bisect_left(xs, x), len(xs) - 1))
    slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
    if x < xs[0] or x > xs[-1]:
        slope = max(slope, 0.0)
    return max(ys[i - 1] + slope * (x - xs[i - 1]), 0.0)


def _tokens_per_pass(n: int, measured: Dict[int, float]) -> float:
    """The acceptance curve at budget n: measured points made non-decreasing (a bigger tree
    never accepts less, on average), linear in log2(budget) between them, from 1 token at
    budget 1, flat past the largest budget tried (no credit for what was not seen)."""
    points = sorted(measured.items())
    if points[0][0] > 1:
        points.insert(0, (1, 1.0))
    xs, ys, top = [], [], 0.0
    for b, y in points:
        top = max(top, y)
        xs.append(math.log2(b))
        ys.append(top)
    x = math.log2(n)
    return ys[-1] if x >= xs[-1] else _linear(x, xs, ys)


def cost_at_budget(n: int, measured: Dict[int, float],
                   predict: Optional[Callable[[int], float]]) -> float:
    """A cost at budget n: measured where tried; else the prediction scaled by measured /
    predicted at the nearest budget tried; else linear in n through the measured points."""
    if n in measured:
        return measured[n]
    if not measured:
        return predict(n) if predict is not None else 0.0
    if predict is not None:
        near = min(measured, key=lambda b: abs(math.log2(b) - math.log2(n)))
        scale = measured[near] / predict(near) if predict(near) > 0 else 1.0
        return predict(n) * scale
    xs = sorted(measured)
    return _linear(n, xs, [measured[b] for b in xs])


def expected_tree_rates(budgets: Sequence[int], tokens_per_pass: Dict[int, float],
                        pass_seconds: Dict[int, float], grow_seconds: Dict[int, float],
                        predict_pass: Optional[Callable[[int], float]] = None) -> Dict[int, float]:
    """Tokens per row per second at each budget: E[tokens per pass](n) / (target pass(n) +
    tree growth(n)), from the budgets measured so far (dicts keyed by budget) and, for the
    target pass at budgets not tried, the planner's prediction `predict_pass(n)`."""
    if not tokens_per_pass:
        raise ValueError("no budget measured yet")
    rates = {}
    for n in budgets:
        seconds = (cost_at_budget(n, pass_seconds, predict_pass)
                   + cost_at_budget(n, grow_seconds, None))
        rates[n] = _tokens_per_pass(n, tokens_per_pass) / max(seconds, 1e-9)
    return rates


def choose_tree_budget(budgets: Sequence[int], tokens_per_pass: Dict[int, float],
                       pass_seconds: Dict[int, float], grow_seconds: Dict[int, float],
                       predict_pass: Optional[Callable[[int], float]] = None) -> int:
    """The budget with the most expected tokens per second (the smaller one on a tie)."""
    rates = expected_tree_rates(budgets, tokens_per_pass, pass_seconds, grow_seconds, predict_pass)
    return max(sorted(rates), key=lambda n: (rates[n], -n))


class TreeBudgetTuner:
    """Picks the tree budget before each round and learns from each round (SpecExec mode).

    A short hill climb first, over every other rung of the ladder (both ends included):
    start in the middle, then try the probe rungs next to the best one measured so far until
    both of its neighbours have `probe_rounds` rounds (usually three or four probe rounds,
    not a sweep of the ladder: a 32-token request at batch 1 has only ~8 rounds). Then every
    round runs `choose_tree_budget` over the whole ladder on the means of the last `window`
    rounds at each budget tried; every `revisit_every` rounds one round goes to a neighbour of
    the choice, the less measured one, so the curve follows the text. A one-rung ladder is a
    fixed budget.
    """

    def __init__(self, ladder: Sequence[int], predict_pass: Optional[Callable[[int], float]] = None,
                 *, probe_rounds: int = 1, revisit_every: int = 8, window: int = 8):
        self.ladder = sorted(set(ladder))
        last = len(self.ladder) - 1
        self.probes = [self.ladder[i] for i in sorted(set(range(0, last + 1, 2)) | {last})]
        self.start = self.probes[len(self.probes) // 2]
        self.predict_pass = predict_pass
        self.probe_rounds, self.revisit_every, self.window = probe_rounds, revisit_every, window
        self.samples: Dict[int, List[Tuple[float, float, float]]] = {}
        self.since_revisit = 0
        self.climbing = len(self.ladder) > 1

    @property
    def max_budget(self) -> int:
        return self.ladder[-1]

    def _means(self, column: int) -> Dict[int, float]:
        return {b: sum(s[column] for s in rows[-self.window:]) / len(rows[-self.window:])
                for b, rows in self.samples.items()}

    @property
    def choice(self) -> Optional[int]:
        """The best budget by what has been measured (None before any round)."""
        if len(self.ladder) == 1:
            return self.ladder[0]
        if not self.samples:
            return None
        return choose_tree_budget(self.ladder, self._means(0), self._means(1), self._means(2),
                                  self.predict_pass)

    def _rate(self, budget: int) -> float:
        rows = self.samples[budget][-self.window:]
        return sum(t for t, _, _ in rows) / sum(p + g for _, p, g in rows)

    def _climb(self) -> Optional[int]:
        """The next probe of the hill climb, or None once it has ended."""
        measured = [b for b in self.probes if len(self.samples.get(b, ())) >= self.probe_rounds]
        if not measured:
            return self.start
        i = self.probes.index(max(measured, key=self._rate))
        for j in (i + 1, i - 1):
            if 0 <= j < len(self.probes) and self.probes[j] not in measured:
                return self.probes[j]
        return None

    def next_budget(self) -> int:
        if self.climbing:
            probe = self._climb()
            if probe is not None:
                return probe
            self.climbing = False
        best = self.choice
        if self.since_revisit >= self.revisit_every and len(self.ladder) > 1:
            self.since_revisit = 0
            i = self.ladder.index(best)
            near = [self.ladder[j] for j in (i + 1, i - 1) if 0 <= j < len(self.ladder)]
            return min(near, key=lambda b: len(self.samples.get(b, ())))
        return best

    def record(self, budget: int, tokens_per_pass: float, pass_seconds: float,
               grow_seconds: float) -> None:
        """One round at `budget`: tokens a row emitted per target pass (accepted + 1, averaged
        over the active rows), the target pass's and the tree growth's seconds."""
        self.samples.setdefault(budget, []).append((tokens_per_pass, pass_seconds, grow_seconds))
        self.since_revisit += 1

    def curve(self) -> List[dict]:
        """Per budget tried: rounds and the means over all of them."""
        return tree_curve([(b, *s) for b, rows in self.samples.items() for s in rows])


def tree_curve(rounds: Sequence[Tuple[int, float, float, float]]) -> List[dict]:
    """Rounds (budget, tokens per pass, pass seconds, grow seconds) summed up per budget:
    rounds and the means."""
    out = []
    for b in sorted({r[0] for r in rounds}):
        rows = [r for r in rounds if r[0] == b]
        n = len(rows)
        out.append(dict(budget=b, rounds=n, tokens_per_pass=sum(r[1] for r in rows) / n,
                        pass_seconds=sum(r[2] for r in rows) / n,
                        grow_seconds=sum(r[3] for r in rows) / n))
    return out
