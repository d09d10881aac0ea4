"""Random checkpoints in Hugging Face format, made with `transformers`' own classes.

No checkpoint can be downloaded where specoff is tested, so tests, the command line's
built-in default and benchmarks build their own: a byte-level BPE tokenizer trained on a
small built-in text, and a model of any supported family with seeded random weights (norm
weights and biases randomised too, so a loader that skips them is caught).
"""
from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from .. import hostmem
from ..config import SUPPORTED_FAMILIES, ModelConfig, rope_inv_freq
from ..models.decoder import Transformer, TransformerBlock
from ..planner import ModelSizes
from ..weights import (  # noqa: F401
    GRIDS,
    SyntheticModel,
    draw_random,
    grid_row,
    on_fp8_grid,
    random_source,
    tensor_seed,
    weight_table,
)

with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
    import this  # the tokenizer's training text, stored rot13-encoded in this.s

_CODE = '''
def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def has_close_elements(numbers: list, threshold: float) -> bool:
    for i, x in enumerate(numbers):
        for j, y in enumerate(numbers):
            if i != j and abs(x - y) < threshold:
                return True
    return False


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()
'''


def tokenizer_corpus() -> list:
    zen = codecs.decode(this.s, "rot13")
    return (zen + _CODE).splitlines() * 4


def make_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with <s>/</s>/<pad>, prepending <s> like Llama's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_hf_config(family: str, vocab_size: int, *, dim: int = 64, layers: int = 2,
                   heads: int = 4, kv_heads: int = 2, intermediate: int = 128, experts: int = 4,
                   top_k: int = 2, max_positions: int = 512, tie: bool = False, **overrides):
    """A `transformers` config of `family` at toy size (any field can be overridden)."""
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"family {family!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_FAMILIES)}")
    kw = dict(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads,
              intermediate_size=intermediate, head_dim=dim // heads,
              max_position_embeddings=max_positions, tie_word_embeddings=tie,
              initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if family in ("mistral", "mixtral"):
        kw["sliding_window"] = None
    if family == "mixtral":
        kw.update(num_local_experts=experts, num_experts_per_tok=top_k)
    if family == "qwen3_moe":
        kw.update(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=intermediate,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Norm weights around 1 and non-zero biases, so every tensor matters."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_tiny_checkpoint(family: str, out_dir, *, seed: int = 0, max_shard_size=None,
                         tokenizer=None, **config_kw) -> Path:
    """Write a random `family` checkpoint (config, safetensors, tokenizer) into `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = tokenizer or make_tokenizer()
    config_kw.setdefault("vocab_size", len(tokenizer))
    config = tiny_hf_config(family, **config_kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kw)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def default_checkpoint() -> Path:
    """The command line's built-in target: a tiny random Mixtral, written once to the cache."""
    path = hostmem.cache_dir() / "default-tiny-mixtral-v1"
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default-", dir=path.parent))
    try:
        make_tiny_checkpoint("mixtral", tmp, seed=0)
        os.replace(tmp, path)  # atomic: a half-written default is never seen
    except OSError:
        if not (path / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def upcycled_pair(draft_cfg, target_cfg, sigma: float, seed: int = 0, device=None,
                  std: float = 0.02, grid: Optional[str] = None):
    """(draft, target) SyntheticModels at any size: the target's attention, norms, embeddings
    and head are the draft's tensors; its every expert is the draft's feed-forward plus
    noise of σ times the weights' std; its router is random. σ sets the acceptance rate.

    `grid="fp8"`: the draft's decoder weights lie on the float8 grid (on_fp8_grid) and the
    target is built from them (its shared attention the same, its experts the rounded
    feed-forward plus the noise), so a draft stored in float8 (draft_quant="fp8") proposes
    as the bf16 one does. Without it the pair's experts differ from the draft by σ = 1.6% of
    the weights' scale, less than e4m3's rounding step, and float8 rounding alone costs most
    of the acceptance; a real draft differs from its target by far more than its rounding.
    What float8 costs a real pair's acceptance is not measured by this pair either way."""
    for field_name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
        if getattr(draft_cfg, field_name) != getattr(target_cfg, field_name):
            raise ValueError(f"an upcycled pair needs equal {field_name}: draft "
                             f"{getattr(draft_cfg, field_name)}, target {getattr(target_cfg, field_name)}")
    if draft_cfg.intermediate_size != target_cfg.moe_intermediate_size or draft_cfg.is_moe:
        raise ValueError("an upcycled pair needs a dense draft whose intermediate_size equals the "
                         "target's expert size")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def target_fill(destinations):
        for name, dst in destinations.items():
            if "norm" in name:
                dst.fill_(1.0)
            elif name.endswith(("feed_forward.w13", "feed_forward.w2")):
                dense = name + ".weight"  # the draft's tensor of the same role
                for e in range(dst.shape[0]):
                    draw_random(dst[e].view(-1), device, std, tensor_seed(seed, dense),
                          tensor_seed(seed, name, e), sigma,
                          grid_row=grid_row(dense, dst[e], grid))
            else:
                draw_random(dst.view(-1), device, std, tensor_seed(seed, name),
                      grid_row=grid_row(name, dst, grid))

    return (SyntheticModel(draft_cfg, random_source(draft_cfg, seed, device, std, grid)),
            SyntheticModel(target_cfg, target_fill))


def make_upcycled_pair(out_dir, sigma: float, *, seed: int = 0, draft_family: str = "mistral",
                       experts: int = 4, top_k: int = 2, tokenizer=None, **config_kw):
    """A tiny (draft, target) pair in Hugging Face format: the target is the MoE of the
    draft's family whose attention, norms, embeddings and head are the draft's and whose
    every expert is the draft's feed-forward plus noise of σ times that weight's std, with a
    random router (Mixtral itself was upcycled from Mistral). Returns (draft_dir, target_dir).
    """
    target_family = {"mistral": "mixtral", "llama": "mixtral", "qwen3": "qwen3_moe"}[draft_family]
    out_dir = Path(out_dir)
    tokenizer = tokenizer or make_tokenizer()
    draft_dir = make_tiny_checkpoint(draft_family, out_dir / "draft", seed=seed,
                                     tokenizer=tokenizer, **config_kw)
    target_dir = out_dir / "target"
    target_dir.mkdir(parents=True, exist_ok=True)
    shared = json.loads((draft_dir / "config.json").read_text())
    kw = dict(config_kw, vocab_size=shared["vocab_size"], experts=experts, top_k=top_k,
              rms_norm_eps=shared["rms_norm_eps"], rope_parameters=shared["rope_parameters"])
    tiny_hf_config(target_family, **kw).save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    draft = load_file(draft_dir / "model.safetensors")
    g = torch.Generator().manual_seed(seed + 1000)
    target = {}
    for name, w in draft.items():
        if ".mlp." not in name:
            target[name] = w
            continue
        layer, proj = name.split(".mlp.")
        for e in range(experts):
            noisy = w + sigma * w.std() * torch.randn(w.shape, generator=g)
            if target_family == "mixtral":
                hf = {"gate_proj.weight": "w1", "up_proj.weight": "w3", "down_proj.weight": "w2"}
                key = f"{layer}.block_sparse_moe.experts.{e}.{hf[proj]}.weight"
            else:
                key = f"{layer}.mlp.experts.{e}.{proj}"
            target[key] = noisy.contiguous()
        if proj == "gate_proj.weight":
            router = torch.randn(experts, w.shape[1], generator=g) * 0.5
            prefix = "block_sparse_moe" if target_family == "mixtral" else "mlp"
            target[f"{layer}.{prefix}.gate.weight"] = router
    save_file(target, target_dir / "model.safetensors", metadata={"format": "pt"})
    return draft_dir, target_dir


# -- real shapes and acceptance calibration ------------------------------------------------------

# Hugging Face config values of the published models (weights are drawn, never downloaded).
MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                    rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None)


MIXTRAL_8X22B = dict(model_type="mixtral", vocab_size=32768, hidden_size=6144, num_hidden_layers=56,
                     num_attention_heads=48, num_key_value_heads=8, intermediate_size=16384,
                     num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=65536,
                     rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None)
QWEN3_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                     moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                     max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, use_sliding_window=False, sliding_window=None)

_MOE_KEYS = ("num_local_experts", "num_experts", "num_experts_per_tok", "norm_topk_prob",
             "decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size",
             "output_router_logits", "router_aux_loss_coef")


def dense_of(moe: dict, model_type: Optional[str] = None) -> dict:
    """The dense config whose feed-forward is one expert of the MoE config `moe` (its
    family's dense sibling by default: Mistral for Mixtral, Qwen3 for Qwen3-MoE)."""
    dense = {k: v for k, v in moe.items() if k not in _MOE_KEYS}
    if "moe_intermediate_size" in moe:
        dense["intermediate_size"] = moe["moe_intermediate_size"]
    dense["model_type"] = model_type or {"mixtral": "mistral", "qwen3_moe": "qwen3"}[moe["model_type"]]
    return dense


MISTRAL_7B = dense_of(MIXTRAL_8X7B)

# The same families at toy sizes (CPU smoke runs): the real configs with small dimensions.
_TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e4)
TINY_MIXTRAL = dict(MIXTRAL_8X7B, **_TINY, intermediate_size=128, num_local_experts=4)
TINY_QWEN3_MOE = dict(QWEN3_30B_A3B, **_TINY, head_dim=16, intermediate_size=128,
                      moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
# Toy pairs of the same families (CPU smoke runs), by the target's family.
TINY_PAIRS = {"mixtral": (dense_of(TINY_MIXTRAL), TINY_MIXTRAL, "tiny mistral/mixtral"),
              "qwen3_moe": (dense_of(TINY_QWEN3_MOE), TINY_QWEN3_MOE, "tiny qwen3/qwen3-moe")}

# Real-size upcycled pairs: (draft config, target config, what to call them, the most layers
# a 128 GiB host holds of the target in bf16 once). A draft shares the target's attention,
# norms, embeddings and head, so it has the target's width and depth: the Mixtral-8x22B pair's
# draft is its dense twin (390M parameters a layer), Qwen3-30B-A3B's a 1.7B dense model with
# one 768-wide expert as its feed-forward.
PAIRS = {
    "mixtral-8x7b": (MISTRAL_7B, MIXTRAL_8X7B, "Mistral-7B / Mixtral-8x7B shapes", 32),
    "mixtral-8x22b": (dense_of(MIXTRAL_8X22B), MIXTRAL_8X22B,
                      "dense twin / Mixtral-8x22B shapes", 20),
    "qwen3-30b-a3b": (dense_of(QWEN3_30B_A3B), QWEN3_30B_A3B,
                      "dense Qwen3 (one expert wide) / Qwen3-30B-A3B shapes", 48),
}


def pair_configs(draft: dict, target: dict, layers: Optional[int] = None):
    """(draft, target) ModelConfigs from Hugging Face config dicts, with `layers` decoder
    layers each when given (a shorter pair of the same shape)."""
    over = {} if layers is None else {"num_hidden_layers": layers}
    return ModelConfig.from_dict({**draft, **over}), ModelConfig.from_dict({**target, **over})


def checkpoint_bytes(cfg, dtype=torch.bfloat16) -> int:
    """Bytes of a model's weights in a checkpoint of `dtype`."""
    return ModelSizes.of(cfg, dtype).total


@torch.inference_mode()
def write_checkpoint(model: SyntheticModel, hf_config: dict, out_dir, dtype=torch.bfloat16,
                     tokenizer=None, progress: Optional[Callable[[str], None]] = None) -> Path:
    """Write a SyntheticModel as a Hugging Face folder (config.json, one safetensors shard
    per decoder layer plus one for embeddings, final norm and head, the index, and the
    tokenizer when given), drawing one layer's weights at a time: the model never sits in
    memory whole. Tensors get their checkpoint names (weights.weight_table), so both
    specoff and transformers load the folder."""
    cfg, out = model.config, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    AutoConfig.for_model(**hf_config).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    table = weight_table(cfg)
    with torch.device("meta"):
        outside = {n: p.shape for n, p in Transformer(cfg).named_parameters()
                   if not n.startswith("layers.")}
        block = {n: p.shape for n, p in TransformerBlock(cfg).named_parameters()}
    groups = [{f"layers.{i}.{n}": shape for n, shape in block.items()} for i in range(cfg.n_layers)]
    groups.append(outside)
    weight_map, total = {}, 0
    for k, shapes in enumerate(groups):
        ours = {n: torch.empty(shape, dtype=dtype) for n, shape in shapes.items()}
        model.source(ours)
        if cfg.tie_word_embeddings:
            ours.pop("output.weight", None)
        tensors = {}
        for name, t in ours.items():
            for piece in table[name]:
                part = t if piece.expert is None else t[piece.expert]
                if piece.rows >= 0:
                    part = part.narrow(0, piece.row, piece.rows)
                tensors[piece.hf_name] = part.contiguous()
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, out / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        if progress is not None:
            progress(shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def write_upcycled_pair(out_dir, draft_hf: dict, target_hf: dict, sigma: float, *,
                        layers: Optional[int] = None, seed: int = 0, std: float = 0.02,
                        dtype=torch.bfloat16, device=None, tokenizer=None,
                        disk_bytes: Optional[int] = None,
                        progress: Optional[Callable[[str], None]] = None):
    """The upcycled pair of `upcycled_pair` at any size, as two Hugging Face folders
    OUT/draft and OUT/target, for peers that load checkpoints from disk. `layers` None: all
    of them, or, when both do not fit `disk_bytes` (default: the free space at OUT), as
    many as do. Returns (draft_dir, target_dir, layers written)."""
    out = Path(out_dir)
    created = not out.exists()
    try:
        return _write_upcycled_pair(out, draft_hf, target_hf, sigma, layers, seed, std, dtype,
                                    device, tokenizer, disk_bytes, progress)
    except BaseException:  # nothing half-written stays behind
        for name in ("draft", "target"):
            shutil.rmtree(out / name, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write_upcycled_pair(out, draft_hf, target_hf, sigma, layers, seed, std, dtype, device,
                         tokenizer, disk_bytes, progress):
    full = target_hf["num_hidden_layers"]
    per_layer = {}
    for n in (1, 2):
        d, t = pair_configs(draft_hf, target_hf, n)
        per_layer[n] = checkpoint_bytes(d, dtype) + checkpoint_bytes(t, dtype)
    layer_bytes = per_layer[2] - per_layer[1]
    fixed = per_layer[1] - layer_bytes
    if layers is None:
        out.mkdir(parents=True, exist_ok=True)
        room = shutil.disk_usage(out).free if disk_bytes is None else disk_bytes
        layers = min(full, int((room * 0.95 - fixed) // layer_bytes))
        if layers < 1:
            raise ValueError(f"{out} has {room / 2**30:.1f} GiB free; the pair needs "
                             f"{(fixed + layer_bytes) / 2**30:.1f} GiB for even one layer")
    draft_cfg, target_cfg = pair_configs(draft_hf, target_hf, layers)
    draft, target = upcycled_pair(draft_cfg, target_cfg, sigma, seed, device, std)
    dirs = []
    for name, model, hf in (("draft", draft, draft_hf), ("target", target, target_hf)):
        hf = dict(hf, num_hidden_layers=layers, torch_dtype=str(dtype).split(".")[-1])
        dirs.append(write_checkpoint(model, hf, out / name, dtype, tokenizer, progress))
    return dirs[0], dirs[1], layers


@torch.inference_mode()
def streamed_logits(model: SyntheticModel, ids: torch.Tensor, dtype=torch.float32,
                    last_only: bool = False) -> torch.Tensor:
    """Causal logits (B, T, V) of `ids` (B, T) (or (B, V) at the last position) under a
    SyntheticModel, without building it whole: each decoder layer's weights are drawn on
    ids' device, applied to every token and dropped, so a model of any size runs in the
    memory of one layer."""
    cfg, device = model.config, ids.device
    with torch.device("meta"):
        shell = Transformer(cfg)
    outside = {n: torch.empty(p.shape, dtype=dtype, device=device)
               for n, p in shell.named_parameters() if not n.startswith("layers.")}
    model.source(outside)
    if cfg.tie_word_embeddings:
        outside["output.weight"] = outside["tok_embeddings.weight"]
    del shell.layers
    shell.load_state_dict(outside, assign=True, strict=True)
    shell.inv_freq = rope_inv_freq(cfg).to(device)
    B, T = ids.shape
    positions = torch.arange(T, device=device).expand(B, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    h = shell.tok_embeddings(ids)
    cos, sin = shell.rope(positions, h.dtype)
    for i in range(cfg.n_layers):
        with torch.device("meta"):
            block = TransformerBlock(cfg)
        params = {n: torch.empty(p.shape, dtype=dtype, device=device)
                  for n, p in block.named_parameters()}
        model.source({f"layers.{i}.{n}": t for n, t in params.items()})
        block.load_state_dict(params, assign=True, strict=True)
        h = block(h, cos, sin, mask)
        del block, params  # this layer's weights go before the next one's are drawn
    if last_only:
        return shell.head(h[:, -1:])[:, -1]
    return shell.head(h)


def draft_trajectories(draft: SyntheticModel, rows: int, prompt_len: int, new_tokens: int,
                       device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """(rows, prompt_len + new_tokens): random prompts, each extended by the draft's own
    greedy tokens: the contexts a chain of drafted tokens is verified in."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, draft.config.vocab_size, (rows, prompt_len), generator=g).to(device)
    for _ in range(new_tokens):
        nxt = streamed_logits(draft, ids, dtype, last_only=True).argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


def greedy_agreement(target: SyntheticModel, trajectories: torch.Tensor, prompt_len: int,
                     dtype=torch.float32) -> float:
    """How often the target's argmax equals the draft's greedy token along the draft's
    trajectories: the per-token greedy acceptance α (chain mode with γ = 1 measures it)."""
    picks = streamed_logits(target, trajectories[:, :-1], dtype)[:, prompt_len - 1:].argmax(-1)
    return (picks == trajectories[:, prompt_len:]).float().mean().item()


def sigma_for_acceptance(alpha: float, draft_cfg, target_cfg, device=None, *, dtype=None,
                         seed: int = 0, std: float = 0.02, rows: int = 32, prompt_len: int = 32,
                         new_tokens: int = 16, tol: float = 0.01, max_iter: int = 16,
                         grid: Optional[str] = None):
    """(σ, measured α): the noise scale of an upcycled pair (see upcycled_pair) at which the
    target agrees with the draft's greedy token a fraction `alpha` of the time.

    α is teacher-forced greedy agreement along the draft's own greedy continuations of
    random prompts (the same prompts at every σ, so α(σ) is a smooth decreasing curve),
    found by doubling σ until α falls below the request, then bisecting in log σ. Every
    evaluation draws the target layer by layer (streamed_logits): cheap at any size.
    Returns the evaluated σ whose α came closest.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be strictly between 0 and 1, not {alpha}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    draft, _ = upcycled_pair(draft_cfg, target_cfg, 0.0, seed, device, std, grid)
    ids = draft_trajectories(draft, rows, prompt_len, new_tokens, device, dtype, seed)
    tried = {}

    def measure(sigma: float) -> float:
        if sigma not in tried:
            target = upcycled_pair(draft_cfg, target_cfg, sigma, seed, device, std, grid)[1]
            tried[sigma] = greedy_agreement(target, ids, prompt_len, dtype)
        return tried[sigma]

    lo, hi = 0.0, 1e-3
    while measure(hi) > alpha and hi < 1e3:
        lo, hi = hi, hi * 4
    for _ in range(max_iter):
        best = min(tried, key=lambda s: abs(tried[s] - alpha))
        if abs(tried[best] - alpha) <= tol:
            break
        mid = (lo * hi) ** 0.5 if lo > 0 else hi / 4
        if measure(mid) > alpha:
            lo = mid
        else:
            hi = mid
    best = min(tried, key=lambda s: abs(tried[s] - alpha))
    return best, tried[best]
