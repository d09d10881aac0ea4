"""Hugging Face safetensors checkpoints → specoff's parameter layout.

Every parameter of ours is assembled from named checkpoint tensors through an explicit
table: q/k/v projections stack into `wqkv`, gate/up projections into `w13`, and the
experts of a layer into one (E, ...) tensor. Loading writes each checkpoint tensor straight
into its destination (a GPU tensor, or later a view into the pinned host store), so a load
never holds a second full copy of the model in host memory.
"""
from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from .config import ModelConfig, rope_inv_freq
from .models.decoder import Transformer
from .quant import fp8_rows


class CheckpointError(ValueError):
    """A checkpoint folder that does not match its config: names the tensor and the file."""


@dataclass(frozen=True)
class Piece:
    """Checkpoint tensor `hf_name` fills rows [row, row + rows) of `dst[expert]` (or of dst)."""
    hf_name: str
    expert: Optional[int]
    row: int
    rows: int


def weight_table(cfg: ModelConfig) -> Dict[str, List[Piece]]:
    """Our parameter name → the checkpoint tensors it is made of, for every family."""
    table: Dict[str, List[Piece]] = {}
    H, KV = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

    def whole(ours, hf):
        table[ours] = [Piece(hf, None, 0, -1)]

    whole("tok_embeddings.weight", "model.embed_tokens.weight")
    whole("norm.weight", "model.norm.weight")
    if not cfg.tie_word_embeddings:
        whole("output.weight", "lm_head.weight")
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        whole(ours + "attention_norm.weight", hf + "input_layernorm.weight")
        whole(ours + "ffn_norm.weight", hf + "post_attention_layernorm.weight")
        att = hf + "self_attn."
        kinds = ["weight"] + (["bias"] if cfg.qkv_bias else [])
        for kind in kinds:
            table[ours + f"attention.wqkv.{kind}"] = [
                Piece(att + f"q_proj.{kind}", None, 0, H),
                Piece(att + f"k_proj.{kind}", None, H, KV),
                Piece(att + f"v_proj.{kind}", None, H + KV, KV)]
        whole(ours + "attention.wo.weight", att + "o_proj.weight")
        if cfg.o_bias:
            whole(ours + "attention.wo.bias", att + "o_proj.bias")
        if cfg.qk_norm:
            whole(ours + "attention.q_norm.weight", att + "q_norm.weight")
            whole(ours + "attention.k_norm.weight", att + "k_norm.weight")
        ff = ours + "feed_forward."
        I = cfg.ffn_size
        if not cfg.is_moe:
            table[ff + "w13.weight"] = [Piece(hf + "mlp.gate_proj.weight", None, 0, I),
                                        Piece(hf + "mlp.up_proj.weight", None, I, I)]
            whole(ff + "w2.weight", hf + "mlp.down_proj.weight")
            continue
        if cfg.family == "mixtral":
            moe, gate, up, down = hf + "block_sparse_moe.", "w1", "w3", "w2"
        else:
            moe, gate, up, down = hf + "mlp.", "gate_proj", "up_proj", "down_proj"
        whole(ff + "gate.weight", moe + "gate.weight")
        ex = moe + "experts.{}."
        table[ff + "w13"] = [p for e in range(cfg.n_experts) for p in (
            Piece(ex.format(e) + f"{gate}.weight", e, 0, I),
            Piece(ex.format(e) + f"{up}.weight", e, I, I))]
        table[ff + "w2"] = [Piece(ex.format(e) + f"{down}.weight", e, 0, -1)
                            for e in range(cfg.n_experts)]
    return table


# Tensors some checkpoints carry that we recompute or do not need.
_IGNORED = re.compile(r"(.*\.rotary_emb\.inv_freq$)")


class Checkpoint:
    """The safetensors files of a checkpoint folder and which file holds which tensor."""

    def __init__(self, path):
        self.path = Path(path)
        single = self.path / "model.safetensors"
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.where = {name: self.path / file for name, file in weight_map.items()}
        elif single.is_file():
            self.where = {name: single for name in self._open(single).keys()}
        else:
            raise CheckpointError(
                f"no model.safetensors or model.safetensors.index.json in {self.path}: specoff "
                f"loads safetensors checkpoints (convert .bin files with transformers' "
                f"save_pretrained(safe_serialization=True))")
        for file in sorted(set(self.where.values())):
            if not file.is_file():
                raise CheckpointError(f"checkpoint file {file} is listed in "
                                      f"model.safetensors.index.json but missing")
        self._handles = {}

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:
            raise CheckpointError(f"cannot read {file}: {e} (truncated or not a safetensors "
                                  f"file? re-download or re-save it)") from None

    def handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    def shape(self, name: str) -> List[int]:
        return list(self.handle(self.where[name]).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        file = self.where[name]
        try:
            return self.handle(file).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {file}: {e} (truncated "
                                  f"file?)") from None


def check_names(ckpt: Checkpoint, cfg: ModelConfig, table) -> None:
    needed = {p.hf_name for pieces in table.values() for p in pieces}
    missing = sorted(needed - ckpt.where.keys())
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]} is missing from the checkpoint in {ckpt.path} "
            f"({len(missing)} missing in all) but the {cfg.family} config needs it")
    extra = sorted(n for n in ckpt.where.keys() - needed if not _IGNORED.match(n))
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # a tied head saved anyway is the embedding again
    if extra:
        raise CheckpointError(
            f"unexpected tensor {extra[0]} in {ckpt.where[extra[0]]} ({len(extra)} unexpected "
            f"in all): the checkpoint does not match its config.json ({cfg.family}, "
            f"{cfg.n_layers} layers{f', {cfg.n_experts} experts' if cfg.is_moe else ''})")


def load_into(ckpt: Checkpoint, table, destinations: Dict[str, torch.Tensor],
              progress: Optional[Iterable] = None) -> None:
    """Copy every checkpoint tensor into its place in `destinations` (our name → tensor)."""
    for ours, pieces in table.items():
        dst = destinations[ours]
        for p in pieces:
            part = dst if p.expert is None else dst[p.expert]
            if p.rows >= 0:
                part = part.narrow(0, p.row, p.rows)
            got = ckpt.shape(p.hf_name)
            if got != list(part.shape):
                raise CheckpointError(
                    f"tensor {p.hf_name} in {ckpt.where[p.hf_name]} has shape {got}, the config "
                    f"implies {list(part.shape)}")
            part.copy_(ckpt.tensor(p.hf_name))


def parse_dtype(dtype) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported; use float32, float16 or bfloat16")
    return names[dtype]


def default_device(device=None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available; "
                         f"use device='cpu'")
    return device


WeightSource = Callable[[Dict[str, torch.Tensor]], None]


def checkpoint_source(path, cfg: ModelConfig) -> WeightSource:
    """Fills destinations (our name → tensor) from the checkpoint in `path`, after checking
    that its tensor names match the config."""
    ckpt = Checkpoint(path)
    table = weight_table(cfg)
    check_names(ckpt, cfg, table)
    return lambda destinations: load_into(ckpt, table, destinations)


def load_model(path, device=None, dtype=None, *, source: Optional[WeightSource] = None,
               config: Optional[ModelConfig] = None):
    """Build the decoder of the checkpoint in `path` on `device` with weights in `dtype`.

    Returns a `Transformer`; `model(input_ids)` gives causal logits (B, T, vocab). With
    `config` and `source` (e.g. random_source below) no checkpoint is read.
    """
    cfg = config or ModelConfig.from_hf(path)
    device = default_device(device)
    dtype = parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    source = source or checkpoint_source(path, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(model.named_parameters())  # a tied head appears once, as the embedding
    dst = {name: torch.empty(p.shape, dtype=dtype, device=device) for name, p in params.items()}
    source(dst)
    return materialize(model, cfg, dst, device)


def materialize(model, cfg: ModelConfig, params: Dict[str, torch.Tensor], device):
    """Give a model built on the meta device its real tensors (our name → tensor)."""
    if cfg.tie_word_embeddings:
        params["output.weight"] = params["tok_embeddings.weight"]
    model.load_state_dict(params, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval().requires_grad_(False)


def load_tokenizer(path):
    """The checkpoint folder's tokenizer (local files only), or None when it has none."""
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        return None


# -- models built in memory: seeded random weights at any size ---------------------------------

@dataclass
class SyntheticModel:
    """A model to build in memory: its shape and where its weights come from."""
    config: object  # ModelConfig
    source: Callable  # weights.WeightSource


def tensor_seed(seed: int, name: str, expert: int = -1) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}/{expert}".encode())) % (2**63)


GRIDS = ("fp8",)


def on_fp8_grid(values: torch.Tensor, row: int) -> torch.Tensor:
    """`values` (rows of `row` elements) rounded as quant.Fp8Linear stores a weight: e4m3
    with one scale per row (absmax / 448), back in the values' dtype."""
    w8, scale = fp8_rows(values.view(-1, row))
    return (w8.float() * scale[:, None]).to(values.dtype).view(values.shape)


def draw_random(flat: torch.Tensor, device, std: float, seed: int, noise_seed: Optional[int] = None,
          sigma: float = 0.0, chunk: int = 1 << 26, grid_row: Optional[int] = None) -> None:
    """Fill `flat` with N(0, std²) values drawn on `device` a chunk at a time (plus, with a
    noise seed, σ·std-scaled noise), so any size fits in bounded device memory. `grid_row`:
    the drawn values (before the noise) on the float8 grid of rows that long (on_fp8_grid)."""
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(noise_seed) if noise_seed is not None else None
    if grid_row:
        chunk = max(grid_row, chunk // grid_row * grid_row)  # whole rows a chunk
    for part in flat.split(chunk):
        values = torch.randn(part.numel(), generator=g, device=device, dtype=part.dtype).mul_(std)
        if grid_row:
            values = on_fp8_grid(values, grid_row)
        if noise is not None:
            values.add_(torch.randn(part.numel(), generator=noise, device=device,
                                    dtype=part.dtype).mul_(sigma * std))
        part.copy_(values)


def grid_row(name: str, dst: torch.Tensor, grid: Optional[str]) -> Optional[int]:
    """The row length to put a tensor on `grid` by (None: left as drawn): a decoder layer's
    attention and feed-forward weights, what draft_quant quantizes (not norms, routers,
    embeddings or the head)."""
    if grid is None:
        return None
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)} or None, not {grid!r}")
    if (name.startswith("layers.") and (".attention." in name or ".feed_forward." in name)
            and "norm" not in name and ".gate." not in name and dst.dim() >= 2):
        return dst.shape[-1]
    return None


def random_source(cfg, seed: int = 0, device=None, std: float = 0.02, grid: Optional[str] = None):
    """A weight source (see weights.WeightSource) of seeded random weights at any size.

    Each tensor has its own seed (from its name), so two models that share tensor names
    share those tensors. Values are drawn on `device` (the GPU when there is one) and copied
    into their destinations, which may be views into the pinned host store: a full-size
    model is built in memory with no checkpoint on disk and no second host copy. Norm
    weights are ones. `grid="fp8"`: the decoder layers' weights on the float8 grid that
    draft_quant="fp8" stores (grid_row).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid_row("", torch.empty(0), grid)  # an unknown grid fails here, not mid-build

    def fill(destinations):
        for name, dst in destinations.items():
            if "norm" in name:
                dst.fill_(1.0)
            else:
                draw_random(dst.view(-1), device, std, tensor_seed(seed, name),
                      grid_row=grid_row(name, dst, grid))
    return fill
