"""Model configuration read from a Hugging Face checkpoint folder's config.json.

One dataclass covers every supported family; the family comes from `model_type`, never
from the folder's name.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

SUPPORTED_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe")
MOE_FAMILIES = ("mixtral", "qwen3_moe")


class UnsupportedModelError(ValueError):
    """The checkpoint asks for a family or a feature specoff does not implement."""


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    n_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = field(default_factory=tuple)
    # How the engine stores the decoder layers' linear weights (not from the checkpoint):
    # None (the model's dtype) or "fp8" (specoff.quant: e4m3, a scale per output row).
    weight_quant: Optional[str] = None

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.n_heads} is not a multiple of "
                f"num_key_value_heads={self.n_kv_heads}")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def ffn_size(self) -> int:
        """Hidden size of one feed-forward (one expert's, for MoE)."""
        return self.moe_intermediate_size if self.is_moe else self.intermediate_size

    @property
    def qkv_size(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    def check_context(self, n_tokens: int) -> None:
        """Refuse a context the model cannot serve exactly."""
        if n_tokens > self.max_position_embeddings:
            raise ValueError(
                f"a context of {n_tokens} tokens is longer than the model's "
                f"max_position_embeddings={self.max_position_embeddings}; shorten the prompt "
                f"or lower max_new_tokens")
        if self.sliding_window is not None and n_tokens > self.sliding_window:
            raise UnsupportedModelError(
                f"{self.family}: sliding-window attention (window {self.sliding_window}) is not "
                f"implemented and a context of {n_tokens} tokens would need it; keep prompt + "
                f"max_new_tokens within {self.sliding_window} tokens")

    @classmethod
    def from_hf(cls, path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"no config.json in {path}: pass the folder of a Hugging Face checkpoint "
                f"(config.json + *.safetensors + tokenizer files)")
        with open(cfg_file) as f:
            hf = json.load(f)
        return cls.from_dict(hf)

    @classmethod
    def from_dict(cls, hf: dict) -> "ModelConfig":
        family = hf.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"model_type {family!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_FAMILIES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{family}: hidden_act={act!r} is not supported (only silu)")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError(f"{family}: mlp_bias=true is not supported")

        rope_theta, rope_scaling = _rope(hf, family)
        kw = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf.get("intermediate_size", 0),
            head_dim=hf.get("head_dim") or 0,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
        )
        bias = bool(hf.get("attention_bias", False))
        if family == "llama":
            kw.update(qkv_bias=bias, o_bias=bias)
        elif family == "qwen2":
            kw.update(qkv_bias=True, o_bias=False)
        elif family in ("qwen3", "qwen3_moe"):
            kw.update(qkv_bias=bias, o_bias=bias, qk_norm=True)

        if family in ("mistral", "mixtral"):
            kw["sliding_window"] = hf.get("sliding_window")
        elif family in ("qwen2", "qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
            kw["sliding_window"] = hf.get("sliding_window")

        if family == "mixtral":
            kw.update(n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                      moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True)
        elif family == "qwen3_moe":
            if hf.get("mlp_only_layers"):
                raise UnsupportedModelError(
                    "qwen3_moe: mlp_only_layers (dense layers among MoE layers) is not supported")
            if hf.get("decoder_sparse_step", 1) != 1:
                raise UnsupportedModelError(
                    "qwen3_moe: decoder_sparse_step != 1 (dense layers among MoE layers) is not "
                    "supported")
            kw.update(n_experts=hf.get("num_experts") or hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                      moe_intermediate_size=hf["moe_intermediate_size"],
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        return cls(**kw)


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _rope(hf: dict, family: str):
    """RoPE base and scaling from either the old (`rope_theta`, `rope_scaling`) or the
    transformers-5 (`rope_parameters`) spelling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind == "llama3" and family == "llama":
            scaling = dict(scaling, rope_type="llama3")
        else:
            raise UnsupportedModelError(
                f"{family}: rope scaling of type {kind!r} is not supported "
                f"(supported: none, and llama3 for the llama family)")
    return float(theta), scaling


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies of RoPE, with Llama 3.1's frequency-dependent scaling."""


    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, smooth blend between.
    factor = s["factor"]
    low_ff, high_ff = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    low_wl, high_wl = old_ctx / low_ff, old_ctx / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, blended, scaled)
