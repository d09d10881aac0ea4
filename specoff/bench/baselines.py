"""The peers a user would otherwise run, on specoff's very tensors: `transformers` with
`accelerate`'s CPU offload (a device_map that keeps some decoder layers on the CPU and
streams them to the GPU each step), plain and with assisted generation (`assistant_model=`,
Leviathan et al. 2023) with the draft on the GPU.

A `transformers` model is assembled from our tensors through the checkpoint name table
(weights.weight_table), so both engines run the same weights and no second copy of the
target is made in host memory: its layers are views into the pinned store (a favour to the
peer: accelerate's own loading keeps offloaded weights in pageable memory). `pageable=True`
clones the layers into ordinary memory instead, as `from_pretrained(device_map=...)` does.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ..config import ModelConfig
from ..planner import ModelSizes
from ..weights import weight_table


def accelerate_available() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def layer_tensors(model, layer: int) -> Dict[str, torch.Tensor]:
    """Our tensors of one decoder layer: views into the host store when the model is
    offloaded (its module holds ring slots), else the module's own parameters."""
    store = getattr(model, "store", None)
    if store is not None:
        return store.views(layer)
    return dict(model.layers[layer].named_parameters())


def hf_state_dict(model, cfg: ModelConfig, layers: int, pageable: bool = False) -> dict:
    """transformers' parameter name → our tensor (or a slice of it), for the first `layers`
    decoder layers. Covers both checkpoint names and the fused expert tensors that
    transformers ≥ 5 uses for MoE layers (experts.gate_up_proj (E, 2I, D) = our w13)."""
    ours = {n: p for n, p in model.named_parameters() if not n.startswith("layers.")}
    for i in range(layers):
        tensors = layer_tensors(model, i)
        if pageable:
            tensors = {n: t.clone() for n, t in tensors.items()}
        ours.update({f"layers.{i}.{n}": t for n, t in tensors.items()})
    named = {}
    for name, pieces in weight_table(cfg).items():
        if name not in ours:
            continue  # a layer past `layers`
        for p in pieces:
            t = ours[name] if p.expert is None else ours[name][p.expert]
            named[p.hf_name] = t if p.rows < 0 else t.narrow(0, p.row, p.rows)
    named.setdefault("lm_head.weight", ours.get("output.weight", ours["tok_embeddings.weight"]))
    if cfg.is_moe:
        for i in range(layers):
            ff = f"layers.{i}.feed_forward."
            named[f"model.layers.{i}.mlp.experts.gate_up_proj"] = ours[ff + "w13"]
            named[f"model.layers.{i}.mlp.experts.down_proj"] = ours[ff + "w2"]
            named[f"model.layers.{i}.mlp.gate.weight"] = ours[ff + "gate.weight"]
    return named


def hf_model(model, cfg: ModelConfig, hf_config: dict, *, layers: Optional[int] = None,
             pageable: bool = False, device=None, experts: Optional[str] = None):
    """A transformers causal LM whose parameters are our model's tensors (first `layers`
    decoder layers; all by default). Buffers (rotary frequencies) go to `device`. `experts`
    picks transformers' experts_implementation for an MoE ("eager": a loop over experts;
    None: transformers' default)."""
    layers = layers or cfg.n_layers
    dtype = model.tok_embeddings.weight.dtype
    device = torch.device(device or model.tok_embeddings.weight.device)
    extra = {"experts_implementation": experts} if experts and cfg.is_moe else {}
    config = AutoConfig.for_model(**dict(hf_config, num_hidden_layers=layers, **extra))
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    named = hf_state_dict(model, cfg, layers, pageable)
    expected = {n: tuple(t.shape) for n, t in hf.state_dict().items()}
    missing = sorted(n for n in expected if n not in named)
    wrong = sorted(n for n in expected if n in named and tuple(named[n].shape) != expected[n])
    if missing or wrong:
        raise RuntimeError(f"this transformers' {cfg.family} layout differs from the one "
                           f"assumed: missing {missing[:3]}, other shapes {wrong[:3]}")
    hf.load_state_dict({n: named[n] for n in expected}, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config).to(device)
    return hf.eval().requires_grad_(False)


def accelerate_gpu_layers(cfg: ModelConfig, dtype, budget: int, reserve: int) -> int:
    """How many whole decoder layers a device_map can keep on the GPU under `budget` after
    the embeddings, head and `reserve` bytes (KV cache, activations, a resident draft)."""
    sizes = ModelSizes.of(cfg, dtype)
    room = budget - sizes.outside_layers - reserve
    return max(0, min(cfg.n_layers, room // sizes.layer))


def dispatch(hf, gpu_layers: int, device):
    """accelerate's offload: the first `gpu_layers` decoder layers, embeddings and head on
    the GPU, every other layer on the CPU, copied to the GPU at each use."""
    from accelerate import dispatch_model

    device = torch.device(device)
    index = device.index or 0
    for i in range(gpu_layers):
        hf.model.layers[i].to(device)
    device_map = {"model.embed_tokens": index, "model.rotary_emb": index, "model.norm": index,
                  "lm_head": index}
    device_map.update({f"model.layers.{i}": index if i < gpu_layers else "cpu"
                       for i in range(len(hf.model.layers))})
    return dispatch_model(hf, device_map=device_map, main_device=index)


class CallTimer:
    """Wall time of every forward call of a module (synchronising the device around it)."""

    def __init__(self, module, device):
        self.seconds: List[float] = []
        self.device = torch.device(device)
        self._t0 = 0.0
        self._hooks = [module.register_forward_pre_hook(self._start),
                       module.register_forward_hook(self._stop)]

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self._sync()
        self.seconds.append(time.perf_counter() - self._t0)

    def remove(self):
        for h in self._hooks:
            h.remove()


@torch.inference_mode()
def hf_generate(hf, prompts: List[List[int]], new_tokens: int, device, *, assistant=None,
                pad_id: int = 0) -> dict:
    """Greedy generation of `new_tokens` tokens for every prompt (one batch, left-padded;
    assisted generation runs one prompt at a time, as transformers requires). Returns the
    tokens, the wall time, and each target (and draft) forward call's time."""
    device = torch.device(device)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=None, bos_token_id=None)
    target_timer = CallTimer(hf, device)
    draft_timer = CallTimer(assistant, device) if assistant is not None else None
    batches = [[p] for p in prompts] if assistant is not None else [prompts]
    tokens = []
    t0 = time.perf_counter()
    try:
        for batch in batches:
            longest = max(len(p) for p in batch)
            ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, p in enumerate(batch):
                ids[b, longest - len(p):] = torch.tensor(p)
                mask[b, longest - len(p):] = 1
            out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                              generation_config=config, assistant_model=assistant)
            tokens += out[:, longest:].tolist()
    finally:
        target_timer.remove()
        if draft_timer is not None:
            draft_timer.remove()
    wall = time.perf_counter() - t0
    calls = target_timer.seconds
    return {"tokens": tokens, "seconds": wall, "target_calls": calls,
            "draft_calls": draft_timer.seconds if draft_timer is not None else [],
            "prefill_seconds": calls[0] if calls else 0.0,
            "step_seconds": statistics.median(calls[1:]) if len(calls) > 1 else None}
