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
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import SUPPORTED_FAMILIES

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
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this  # noqa: F401  (stored rot13-encoded in this.s)
    zen = codecs.decode(this.s, "rot13")
    return (zen + _CODE).splitlines() * 4


def make_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with <s>/</s>/<pad>, prepending <s> like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

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
    from transformers import AutoConfig

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
    from transformers import AutoModelForCausalLM

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


def cache_dir() -> Path:
    return Path(os.environ.get("SPECOFF_CACHE", Path.home() / ".cache" / "specoff"))


def default_checkpoint() -> Path:
    """The command line's built-in target: a tiny random Mixtral, written once to the cache."""
    path = cache_dir() / "default-tiny-mixtral-v1"
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


@dataclass
class SyntheticModel:
    """A model to build in memory: its shape and where its weights come from."""
    config: object  # ModelConfig
    source: Callable  # weights.WeightSource


def _name_seed(seed: int, name: str, expert: int = -1) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}/{expert}".encode())) % (2**63)


def _draw(flat: torch.Tensor, device, std: float, seed: int, noise_seed: Optional[int] = None,
          sigma: float = 0.0, chunk: int = 1 << 26) -> None:
    """Fill `flat` with N(0, std²) values drawn on `device` a chunk at a time (plus, with a
    noise seed, σ·std-scaled noise), so any size fits in bounded device memory."""
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(noise_seed) if noise_seed is not None else None
    for part in flat.split(chunk):
        values = torch.randn(part.numel(), generator=g, device=device, dtype=part.dtype).mul_(std)
        if noise is not None:
            values.add_(torch.randn(part.numel(), generator=noise, device=device,
                                    dtype=part.dtype).mul_(sigma * std))
        part.copy_(values)


def random_source(cfg, seed: int = 0, device=None, std: float = 0.02):
    """A weight source (see weights.WeightSource) of seeded random weights at any size.

    Each tensor has its own seed (from its name), so two models that share tensor names
    share those tensors. Values are drawn on `device` (the GPU when there is one) and copied
    into their destinations, which may be views into the pinned host store: a full-size
    model is built in memory with no checkpoint on disk and no second host copy. Norm
    weights are ones.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def fill(destinations):
        for name, dst in destinations.items():
            if "norm" in name:
                dst.fill_(1.0)
            else:
                _draw(dst.view(-1), device, std, _name_seed(seed, name))
    return fill


def upcycled_pair(draft_cfg, target_cfg, sigma: float, seed: int = 0, device=None,
                  std: float = 0.02):
    """(draft, target) SyntheticModels at any size: the target's attention, norms, embeddings
    and head are the draft's tensors; its every expert is the draft's feed-forward plus
    noise of σ times the weights' std; its router is random. σ sets the acceptance rate."""
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
                    _draw(dst[e].view(-1), device, std, _name_seed(seed, dense),
                          _name_seed(seed, name, e), sigma)
            else:
                _draw(dst.view(-1), device, std, _name_seed(seed, name))

    return (SyntheticModel(draft_cfg, random_source(draft_cfg, seed, device, std)),
            SyntheticModel(target_cfg, target_fill))


def make_upcycled_pair(out_dir, sigma: float, *, seed: int = 0, draft_family: str = "mistral",
                       experts: int = 4, top_k: int = 2, tokenizer=None, **config_kw):
    """A tiny (draft, target) pair in Hugging Face format: the target is the MoE of the
    draft's family whose attention, norms, embeddings and head are the draft's and whose
    every expert is the draft's feed-forward plus noise of σ times that weight's std, with a
    random router (Mixtral itself was upcycled from Mistral). Returns (draft_dir, target_dir).
    """
    from safetensors.torch import load_file, save_file

    target_family = {"mistral": "mixtral", "llama": "mixtral", "qwen3": "qwen3_moe"}[draft_family]
    out_dir = Path(out_dir)
    tokenizer = tokenizer or make_tokenizer()
    draft_dir = make_tiny_checkpoint(draft_family, out_dir / "draft", seed=seed,
                                     tokenizer=tokenizer, **config_kw)
    target_dir = out_dir / "target"
    target_dir.mkdir(parents=True, exist_ok=True)
    import json

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
