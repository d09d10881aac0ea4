"""One compact decoder for every supported family (gpt-fast style).

Llama / Mistral / Qwen2 / Qwen3 are the dense decoder; Mixtral and Qwen3-MoE swap the
feed-forward for a routed mixture of experts (Shazeer et al. 2017; Jiang et al. 2024,
"Mixtral of Experts"); Qwen3 adds RMS norms on queries and keys. Attention is GQA with
rotary position embeddings (Su et al. 2021, "RoFormer"), applied in the rotate-half layout
that Hugging Face checkpoints are stored in.
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, rope_inv_freq
from ..kernels import skinny
from ..kernels.attention import rope_verify_attention
from ..kernels.fused import add_rms_norm, rms_norm, rope, rope_write, silu_mul
from ..kernels.moe import fused_moe, moe_route
from ..kernels.step import embed_rows, rope_tables, rope_tables_ref
from ..kvcache import KVCache
from .attention import SegmentMask, TreeMask, cached_attention, causal_mask, use_chain_kernel
from .graphs import LayerGraphs
from .host_cache import HostCacheReads, streamed_attention
from .passes import PassPart, PrefillBatch
from ..options import KernelOptions


def use_fused_elementwise(x: torch.Tensor, kernels: KernelOptions) -> bool:
    """RMSNorm, rotary and SwiGLU as one Triton launch each (kernels.fused_elementwise)."""
    return kernels.runs(kernels.fused_elementwise, x)


def few_rows(x: torch.Tensor, w: torch.Tensor, kernels: KernelOptions) -> bool:
    """Whether x · Wᵀ goes to the few-rows kernel (kernels.skinny_products, ≤ 16 rows)."""
    return kernels.runs(kernels.skinny_products, x) and skinny.usable(x, w)


def project(linear: nn.Module, x: torch.Tensor, kernels: KernelOptions, norm: Optional["RMSNorm"] = None,
            residual: Optional[torch.Tensor] = None, squares: bool = False) -> torch.Tensor:
    """linear(x), through the few-rows kernel where `kernels` sends it there (a plain
    nn.Linear, ≤ skinny.MAX_ROWS rows: decode steps and short verifications); quantized
    projections (quant.Fp8Linear) keep their own forward. `norm`: an RMSNorm whose weight
    is folded into linear's (Transformer.fold_norms; its own weight ones), applied to x
    first, inside the kernel where it runs; `residual`: added to the result; `squares`: the
    kernel, where it runs, also leaves the result's sums of squares for a folded norm's
    product after it (skinny_linear)."""
    if type(linear) is nn.Linear and few_rows(x, linear.weight, kernels):
        return skinny.skinny_linear(x, linear.weight, linear.bias, residual=residual,
                                    rms_eps=None if norm is None else norm.eps, squares=squares,
                                    tiles=kernels.skinny_tiles, pdl=kernels.pdl)
    out = linear(x if norm is None else norm(x))
    return out if residual is None else residual + out


def fuses_rope_attention(q: torch.Tensor, causal: bool, kernels: KernelOptions) -> bool:
    """Whether a step whose cache write already rides in the rotary launch also attends in
    it (kernels.fused_rope_attention): where the chain kernel (q (B, T, H, hd)) attends."""
    return kernels.fused_rope_attention and use_chain_kernel(q.transpose(1, 2), causal, kernels)


def fuses_cache_write(x: torch.Tensor, cache, causal: bool, positions, kernels: KernelOptions) -> bool:
    """Whether the rotary launch also stores the new keys and values (kernels.fused_cache_write):
    a causal step over a plain KVCache on x's device in x's dtype, eager."""
    return (kernels.runs(kernels.fused_cache_write, x) and causal and positions is not None
            and cache is not None and type(cache) is KVCache
            and cache.row_start is None and cache.k.device == x.device and cache.k.dtype == x.dtype
            and not torch.compiler.is_compiling() and type(x) is torch.Tensor)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels = KernelOptions()  # Transformer.use_kernels sets the model's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused_elementwise(x, self.kernels):
            return rms_norm(x, self.weight, self.eps, pdl=self.kernels.pdl)
        # Normalise in fp32, scale in the input dtype: Hugging Face's exact rounding.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor):
        """(self(h), h) for h = residual + x: one fused launch on the Triton path."""
        if use_fused_elementwise(x, self.kernels):
            return add_rms_norm(x, residual, self.weight, self.eps, pdl=self.kernels.pdl)
        h = residual + x
        return self(h), h


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, nh, hd); cos, sin: (B, T, 1, hd)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, cfg.qkv_size, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.kernels = KernelOptions()  # Transformer.use_kernels sets the model's

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache], layer: int,
                positions: Optional[torch.Tensor], kv_len: Optional[int], norm: Optional["RMSNorm"] = None,
                residual: Optional[torch.Tensor] = None, squares: bool = False) -> torch.Tensor:
        """`mask`: a TreeMask, or the causal mask of `positions` (causal_mask), which run
        consecutively in each row. `norm`: x is the block's input, this norm's weight folded
        into wqkv (Transformer.fold_norms); `residual`: added to the output projection's result;
        `squares`: see project()."""
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        kernels = self.kernels
        qkv = project(self.wqkv, x, kernels, norm)
        q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
        q, k, v = q.view(B, T, H, hd), k.view(B, T, KV, hd), v.view(B, T, KV, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        causal = not isinstance(mask, (TreeMask, SegmentMask))
        fused = use_fused_elementwise(x, kernels)
        if fused and fuses_cache_write(x, cache, causal, positions, kernels):
            if fuses_rope_attention(q, causal, kernels) and self.q_norm is None:
                # rotary, the cache write and the attention in one launch
                y = rope_verify_attention(qkv, H, KV, cos, sin, positions, cache.k[layer], cache.v[layer], kv_len,
                                          pdl=kernels.pdl)
                return project(self.wo, y.reshape(B, T, H * hd), kernels, residual=residual, squares=squares)
            # q rotated; k rotated and v stored in the cache by the same launch
            q = rope_write(q, k, v, cos, sin, cache.k[layer], cache.v[layer], positions, pdl=kernels.pdl)
            y = cached_attention(q.transpose(1, 2), None, None, mask, cache, layer, positions, kv_len, causal,
                                 kernels=kernels)
            return project(self.wo, y.transpose(1, 2).reshape(B, T, H * hd), kernels, residual=residual,
                           squares=squares)
        if fused:
            q, k = rope(q, k, cos, sin)  # one launch for both
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if not causal:
            if cache is not None and cache.k.device == x.device and mask.use_kernel(x, kernels):
                cache.write(layer, k.transpose(1, 2), v.transpose(1, 2), positions)
                y = mask.attend(q, cache.k[layer], cache.v[layer], kv_len,
                                row_start=cache.row_start, pdl=kernels.pdl)  # (B, T, H, hd)
                return project(self.wo, y.reshape(B, T, H * hd), kernels, residual=residual, squares=squares)
            if not (cache is not None and cache.row_start is not None
                    and cache.k.device != x.device):  # streamed_segments takes the mask itself
                mask = mask.dense(kv_len)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        if cache is not None and cache.k.device != x.device:
            y = streamed_attention(q, k, v, mask, cache, layer, positions, kv_len, causal, kernels=kernels)
        elif cache is not None:
            y = cached_attention(q, k, v, mask, cache, layer, positions, kv_len, causal, kernels=kernels)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=KV != H)
        y = y.transpose(1, 2).reshape(B, T, H * hd)
        return project(self.wo, y, kernels, residual=residual, squares=squares)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x·w1) ⊙ x·w3), with w1 and w3 stored stacked as w13."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.kernels = KernelOptions()  # Transformer.use_kernels sets the model's

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                norm: Optional[RMSNorm] = None, squares: bool = False) -> torch.Tensor:
        """The feed-forward of x, added to `residual` when one is given (the block's skip).
        `norm`: x is un-normalised, this norm's weight folded into w13 (fold_norms);
        `squares`: see project()."""
        kernels = self.kernels
        if use_fused_elementwise(x, kernels):
            if type(self.w13) is nn.Linear and few_rows(x, self.w13.weight, kernels):
                # the few-rows products: the activation (and a folded norm) in the gate-up
                # launch, the skip's add in the down projection's (two launches fewer)
                act = skinny.skinny_linear(x, self.w13.weight, self.w13.bias, swiglu=True,
                                           rms_eps=None if norm is None else norm.eps,
                                           tiles=kernels.skinny_tiles, pdl=kernels.pdl)
                if type(self.w2) is nn.Linear and few_rows(act, self.w2.weight, kernels):
                    return skinny.skinny_linear(act, self.w2.weight, self.w2.bias, residual=residual,
                                                squares=squares, tiles=kernels.skinny_tiles, pdl=kernels.pdl)
                out = project(self.w2, act, kernels)
            else:
                out = project(self.w2, silu_mul(project(self.w13, x, kernels, norm)), kernels)
        else:
            gate, up = project(self.w13, x, kernels, norm).chunk(2, dim=-1)
            out = project(self.w2, F.silu(gate) * up, kernels)
        return out if residual is None else residual + out


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts. w13: (E, 2I, D) = [w1; w3] per expert, w2: (E, D, I)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, I, D = cfg.n_experts, cfg.moe_intermediate_size, cfg.dim
        self.top_k, self.renormalize = cfg.top_k, cfg.norm_topk_prob
        self.gate = nn.Linear(D, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))
        # A layer streamed in pieces (offload.build_offloaded, ring_pieces > 1): per piece
        # (first expert, w13, w2) views of its ring slot; w13 / w2 above are then host views.
        self.pieces = None
        self.kernels = KernelOptions()  # Transformer.use_kernels sets the model's

    def route(self, x: torch.Tensor):
        """x (..., D) → (x as (N, D), routing weights (N, k), expert ids (N, k))."""
        x = x.reshape(-1, x.shape[-1])
        return (x,) + tuple(moe_route(self.gate(x), self.top_k, self.renormalize))

    def experts(self, routed, w13, w2, first: int = 0) -> torch.Tensor:
        """Σ over the token's routed experts that lie in [first, first + len(w13)) of their
        weighted outputs, (N, D). All experts: the whole feed-forward."""
        x, weights, ids = routed
        if x.is_cuda:  # grouped-GEMM Triton kernels, no host sync: capturable in a graph
            descriptors = self.kernels.moe_descriptors
            if w13.shape[0] == self.w13.shape[0]:
                return fused_moe(x, w13, w2, weights, ids, descriptors=descriptors)
            return fused_moe(x, w13, w2, weights, ids, experts_from=first, descriptors=descriptors)
        if w13.shape[0] != self.w13.shape[0]:  # the others match no expert here
            ids = torch.where((ids >= first) & (ids < first + w13.shape[0]), ids - first, -1)
        return moe_experts(x, w13, w2, weights, ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(self.route(x), self.w13, self.w2).view(x.shape)


def moe_experts(x, w13, w2, weights, ids):
    """Σ_j weights[n, j] · expert_{ids[n, j]}(x[n]), one expert at a time, in x's dtype with
    Hugging Face's rounding (the CPU path; `nonzero` syncs, so never used in a graph)."""
    out = torch.zeros_like(x)
    I = w2.shape[-1]
    for e in range(w13.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gate_up = x[tok] @ w13[e].t()
        y = (F.silu(gate_up[:, :I]) * gate_up[:, I:]) @ w2[e].t()
        out.index_add_(0, tok, y * weights[tok, slot, None].to(x.dtype))
    return out


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.feed_forward = MoEFeedForward(cfg) if cfg.is_moe else FeedForward(cfg)
        self.folded = False  # Transformer.fold_norms: the norms' weights are in the products
        self.kernels = KernelOptions()  # Transformer.use_kernels sets the model's

    def fold_norms(self) -> bool:
        """Fold the two RMSNorms' weights into the products after them (wqkv's and w13's
        columns), the norms left with weights of ones: the same function up to bf16
        rounding (the scaled weights rounded once, the normalised rows no longer rounded
        before the scale). Then, where the few-rows products run, forward() normalises inside
        them. Dense blocks of plain nn.Linear only (before any quantisation); False if not."""
        attn, ffn = self.attention, self.feed_forward
        if self.folded:
            return True
        if not isinstance(ffn, FeedForward) or any(
                type(m) is not nn.Linear for m in (attn.wqkv, attn.wo, ffn.w13, ffn.w2)):
            return False
        with torch.no_grad():
            for norm, linear in ((self.attention_norm, attn.wqkv), (self.ffn_norm, ffn.w13)):
                linear.weight.copy_((linear.weight.float() * norm.weight.float()).to(linear.weight.dtype))
                norm.weight.fill_(1.0)
        self.folded = True
        return True

    def fast_folded(self, h: torch.Tensor) -> bool:
        """Whether this step runs the folded path: the fused element-wise kernels and the
        few-rows products take h's rows."""
        return use_fused_elementwise(h, self.kernels) and few_rows(h, self.attention.wqkv.weight, self.kernels)

    def attend(self, h, cos, sin, mask, cache=None, layer=0, positions=None, kv_len=None):
        """(h + attention(attention_norm(h)), ffn_norm of that): the residual add and the
        feed-forward's norm are one launch on the Triton path."""
        y = self.attention(self.attention_norm(h), cos, sin, mask, cache, layer, positions, kv_len)
        normed, h = self.ffn_norm.add_norm(y, h)
        return h, normed

    def forward(self, h, cos, sin, mask, cache=None, layer=0, positions=None, kv_len=None):
        if self.folded and self.fast_folded(h):
            # both norms inside the products after them, both skip adds in the products
            # before them: wqkv, rotary + cache write, attention, wo, w13, w2 (6 launches)
            squares = self.kernels.squares_from_products
            h = self.attention(h, cos, sin, mask, cache, layer, positions, kv_len,
                               norm=self.attention_norm, residual=h, squares=squares)
            return self.feed_forward(h, residual=h, norm=self.ffn_norm, squares=squares)
        h, normed = self.attend(h, cos, sin, mask, cache, layer, positions, kv_len)
        if isinstance(self.feed_forward, FeedForward):
            return self.feed_forward(normed, residual=h)  # the skip's add may ride in its last product
        return h + self.feed_forward(normed)


class Transformer(nn.Module):
    """The decoder. `kernels`: which hand-written kernels its passes launch (use_kernels);
    `host_cache_ahead`: a cache in pinned host memory is fetched this many layers ahead of
    the computing one, on a copy stream of its own (0: on the compute stream as each layer
    comes; HostCacheReads)."""

    def __init__(self, cfg: ModelConfig, *, kernels: KernelOptions = KernelOptions(), host_cache_ahead: int = 1):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.ring = None  # a WeightRing when decoder layers stream from host memory
        self.use_graphs = False  # replay decode passes as per-layer CUDA graphs
        self._graphs = weakref.WeakKeyDictionary()  # KVCache → {(rows, tokens): LayerGraphs}
        self.host_cache_ahead = host_cache_ahead
        self.kernels = kernels
        self.use_kernels(kernels)

    def use_kernels(self, options: KernelOptions) -> None:
        """Launch the kernels `options` names from now on: set on every module that chooses
        between a kernel and torch's ops (quant.Fp8Linear's too); graphs captured before go."""
        for module in self.modules():
            if isinstance(getattr(module, "kernels", None), KernelOptions):
                module.kernels = options
        self._graphs = weakref.WeakKeyDictionary()

    def fold_norms(self) -> int:
        """TransformerBlock.fold_norms on every layer (a draft's, before quantize_linears:
        its decode steps lose the two norm launches a layer); returns how many folded."""
        return sum(layer.fold_norms() for layer in self.layers)

    def step_kernels(self, x: torch.Tensor) -> bool:
        """Whether a pass's ends (embedding gather, rotary tables) run as kernels.step's
        single launches: with the fused element-wise kernels and kernels.step_kernels."""
        return use_fused_elementwise(x, self.kernels) and self.kernels.runs(self.kernels.step_kernels, x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens' embeddings: one gather launch where the step kernels run
        (kernels.step.embed_rows; torch's index_select is built for far bigger gathers)."""
        if self.step_kernels(input_ids) and type(self.tok_embeddings) is nn.Embedding:
            return embed_rows(input_ids, self.tok_embeddings.weight, interpret=self.kernels.interpret)
        return self.tok_embeddings(input_ids)

    def new_cache(self, rows: int, max_len: int, device=None, dtype=None) -> KVCache:
        cfg = self.config
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        return KVCache(cfg.n_layers, rows, max_len, cfg.n_kv_heads, cfg.head_dim, dtype, device)

    def rope(self, positions: torch.Tensor, dtype):
        """cos, sin of shape (B, T, 1, hd) for absolute positions (B, T), computed in fp32
        (kernels.step.rope_tables: one launch where the step kernels run)."""
        if self.step_kernels(positions):
            return rope_tables(positions, self.inv_freq, dtype, interpret=self.kernels.interpret)
        return rope_tables_ref(positions, self.inv_freq, dtype)

    def forward(self, input_ids: torch.Tensor, cache: Optional[KVCache] = None, *,
                kv_len: Optional[int] = None, logits_at: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Logits of `input_ids` (B, T).

        Without a cache: positions 0..T-1, causal. With a cache: row b's tokens take positions
        cache.lengths[b] + t and are written to the cache there; `cache.lengths` is not moved
        (see KVCache.advance). `kv_len` bounds the cached positions attended to (default: all).
        `logits_at` (B, K) picks the positions whose logits are returned, (B, K, vocab).
        """
        B, T = input_ids.shape
        device = input_ids.device
        if cache is None:
            positions = torch.arange(T, device=device).expand(B, T)
            mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        else:
            kv_len = kv_len or cache.max_len
            positions = cache.positions(T)  # (B, T)
            mask = causal_mask(positions, kv_len)
        h = self.embed(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        h = self.run_layers(h, cos, sin, mask, cache, positions, kv_len)
        return self.head(h, logits_at)

    def run_layers(self, h, cos, sin, mask, cache, positions, kv_len):
        pieces = self.ring.pieces if self.ring is not None else 1
        if (self.use_graphs and h.is_cuda and cache is not None and cache.k.is_cuda
                and kv_len == cache.max_len and pieces == 1):
            per_cache = self._graphs.setdefault(cache, {})  # dropped with the cache
            shape = tuple(h.shape[:2])
            if shape not in per_cache:
                per_cache[shape] = LayerGraphs(self, cache, *shape)
            return per_cache[shape].run(h, cos, sin, mask, positions)
        reads = HostCacheReads.for_parts([cache], len(self.layers), h.device, self.host_cache_ahead)
        try:
            for i in range(len(self.layers)):
                if reads is not None:
                    reads.begin(i)
                h, = self.layer_step(i, [(h, cos, sin, mask, cache, i, positions, kv_len)])
        finally:
            if reads is not None:
                reads.close()
        return h

    def layer_step(self, i: int, calls: list) -> list:
        """Layer i over several batches of tokens (`calls`: the block's forward arguments,
        hidden states first), its streamed weights acquired from the ring once for all of
        them. A layer streamed in pieces runs attention, then each piece's experts for every
        batch as that piece arrives, releasing each slot as soon as it is read."""
        layer, ring = self.layers[i], self.ring
        if ring is None or i not in ring:
            return [layer(*c) for c in calls]
        ring.acquire(i)  # piece 0: the attention too, when it streams
        ffn = layer.feed_forward
        if ring.pieces == 1 or ffn.pieces is None:
            out = [layer(*c) for c in calls]
            ring.release(i)
            return out
        attended = [layer.attend(*c) for c in calls]  # (h, ffn_norm(h)) each
        hs = [h for h, _ in attended]
        routed = [ffn.route(normed) for _, normed in attended]
        acc = [None] * len(hs)
        for s, (first, w13, w2) in enumerate(ffn.pieces):
            if s:
                ring.acquire(i, s)
            for n, r in enumerate(routed):
                y = ffn.experts(r, w13, w2, first)
                acc[n] = y if acc[n] is None else acc[n] + y
            ring.release(i, s)
        return [h + a.view(h.shape) for h, a in zip(hs, acc)]

    def run_parts(self, parts: List["PassPart"]) -> None:
        """One pass over the layers for several batches of tokens (`part.h` gets each one's
        final hidden states). Layer outer, part inner: a streamed layer is loaded once per
        pass however many parts (prefill chunks, verification, refills) ride on it."""
        for p in parts:
            p.h = self.embed(p.input_ids)
            p.cos, p.sin = self.rope(p.positions, p.h.dtype)
            if p.mask is None:
                p.mask = causal_mask(p.positions, p.kv_len)
            if p.slots is None:
                p.slots = p.positions
        stages = list({id(p.stage): p.stage for p in parts if p.stage is not None}.values())
        reads = HostCacheReads.for_parts([p.cache for p in parts if p.stage is None],
                                         len(self.layers), parts[0].h.device, self.host_cache_ahead)
        try:
            self._run_parts(parts, stages, reads)
        finally:
            if reads is not None:
                reads.close()

    def _run_parts(self, parts, stages, reads) -> None:
        for i in range(len(self.layers)):
            if reads is not None:
                reads.begin(i)
            calls = []
            for p in parts:
                # A staged prefill builds this layer's K/V in its one-layer scratch.
                cache, at = (p.stage.scratch, 0) if p.stage is not None else (p.cache, i)
                calls.append((p.h, p.cos, p.sin, p.mask, cache, at, p.slots, p.kv_len))
            for p, h in zip(parts, self.layer_step(i, calls)):
                p.h = h
            for stage in stages:
                stage.flush(i)

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache,
                chunk: int, kv_start: int = 0, rows: Optional[torch.Tensor] = None,
                lengths_host: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Append each row's first `lengths[b]` tokens of `input_ids` (B, T) to the cache and
        return the logits after each row's last token, (B, vocab).

        A streamed layer is loaded once per batch, whatever the number of chunks.
        `kv_start` bounds the rows' cached lengths before the call. `rows` (B,): fill those
        rows of a larger cache (they must be empty); a cache away from the compute device
        (host memory) is filled through a PrefillStage, attention running on the device.
        `lengths_host` (the lengths as ints) lets prompts of different lengths run packed in
        one row, without padding (PrefillBatch, PackedStage).
        """
        batch = PrefillBatch(input_ids, cache, chunk, kv_start, rows=rows,
                             device=self.tok_embeddings.weight.device, lengths_host=lengths_host)
        self.run_parts(batch.parts)
        if rows is None:
            cache.advance(lengths)
        else:
            cache.lengths[rows.to(cache.lengths.device)] = lengths.to(cache.lengths.device)
        return self.head(batch.last_hidden(lengths))[:, 0]

    def head(self, h: torch.Tensor, logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        if logits_at is not None:
            h = h.gather(1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
        return project(self.output, self.norm(h), self.kernels)


