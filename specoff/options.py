"""The typed options every layer receives (vLLM's EngineArgs, nanoGPT's config block).

One frozen `EngineOptions` holds everything that chooses behaviour: the run's shape
(device, budget, rows, ring), speculation (`SpecOptions`), cache layout (`CacheOptions`)
and the hand-written kernels a pass launches (`KernelOptions`). `LLM(..., options=...)`
takes it; `LLM(..., spec="tree", gpu_memory="24GiB")` and the CLI's flags fill its fields.
Nothing in specoff reads a module-level switch: behaviour that a test or a benchmark varies
is a field here, passed down.

Fields are set by name with `EngineOptions.build(**fields)` / `options.replace(**fields)`
(a nested field by its own name, e.g. `draft_len=4`, or dotted, `kernels.pdl=False`) and
from strings with `options.with_setting("kernels.pdl", "off")` (`tools/bench.py --set`).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple, Union

import torch

# "auto": where the engine's rule says (each field's doc names it); "on" / "off": always / never.
Switch = Literal["auto", "on", "off"]


class OptionsError(ValueError):
    """An option named or valued wrongly: the message names it and what it takes."""


@dataclass(frozen=True)
class KernelOptions:
    """Which hand-written kernels a model's passes launch. Each path below runs on CUDA
    tensors when True and torch's own ops run when False; on CPU tensors torch's ops run
    unless `interpret` sends them through Triton's interpreter (TRITON_INTERPRET=1)."""
    interpret: bool = False  # CPU tensors through the Triton kernels too (tests under TRITON_INTERPRET=1)
    fused_elementwise: bool = True  # RMSNorm (with the residual add), rotary and SwiGLU as one launch each
    skinny_products: bool = True  # products of at most 16 rows (decode steps) through kernels.skinny
    fused_cache_write: bool = True  # the rotary launch also stores the new keys and values in the cache
    fused_rope_attention: bool = True  # rotary, cache write and chain attention in one launch
    chain_attention: bool = True  # causal attention over a cache (decode, verification, prefill) in Triton
    tree_attention: bool = True  # tree passes' ancestor-masked attention in Triton
    step_kernels: bool = True  # a decode step's ends (embedding gather, rotary tables, argmax) in Triton
    pdl: bool = True  # programmatic dependent launch between a step's kernels (Hopper and later)
    moe_descriptors: bool = True  # fused MoE loads tiles by tensor descriptors where its tuned config says
    fp8_weight_kernel: bool = True  # float8 weights converted in registers, not dequantized first
    fold_draft_norms: bool = True  # the draft's RMSNorms folded into the products after them at load
    squares_from_products: bool = True  # a folded norm takes its sums of squares from the product before
    # Tile overrides for kernels.skinny, ((N, K), ((key, value), ...)) pairs (benchmarks)
    skinny_tiles: Tuple[Tuple[Tuple[int, int], Tuple[Tuple[str, int], ...]], ...] = ()

    def runs(self, enabled: bool, x) -> bool:
        """Whether a kernel path switched `enabled` runs on tensor `x`: on CUDA tensors, or on
        CPU ones under the interpreter where `interpret` asks for it."""
        return enabled and (x.is_cuda or self.interpret)


@dataclass(frozen=True)
class CacheOptions:
    """How the key/value caches are laid out."""
    segment_host_cache: Switch = "auto"  # the target alone: rows in segments of one pool ("auto": host cache, ragged prompts)
    segment_draft_cache: Switch = "auto"  # speculation: the draft's rows in segments of one pool ("auto": where smaller)
    segment_target_cache: Switch = "auto"  # the target's rows in the draft's segments ("auto": host cache)
    draft_slack: float = 1.15  # a segment pool holds this many times its rows' mean need (and two of the longest)
    target_slack: float = 1.5  # chain mode: a group's target pool, times its rows' mean need
    lookahead: int = 8  # a free row takes the first of this many waiting prompts that fits
    host_cache_ahead: int = 1  # a host cache: layers ahead of the computing one whose blocks cross the bus


@dataclass(frozen=True)
class SpecOptions:
    """Speculative decoding: which mode, and how its rounds are shaped."""
    mode: Optional[Literal["chain", "tree"]] = None  # None: the planner chooses (tree, chain or the target alone)
    draft_len: Optional[int] = None  # chain mode's γ (1-8); None adapts it between rounds
    interleave: Optional[bool] = None  # chain mode's two row groups; None: whichever the planner predicts faster
    tree_budget: Union[int, Literal["auto"]] = "auto"  # tree nodes a row (1-2048); "auto" tunes it between rounds
    tree_budget_max: Optional[int] = None  # the largest "auto" budget; None: 1024 on a GPU, 64 on the CPU
    tree_scores: Literal["learned", "draft"] = "learned"  # rank nodes by learned acceptance or the draft's log-probs
    interactive_rows: int = 4  # batches up to this many rows are interactive: trees up to tree_budget_max
    tree_pass_tokens: int = 4096  # above interactive_rows, "auto" trees keep rows × nodes under this
    throughput_tree_budget: int = 16  # above interactive_rows, "auto" trees reach at least this many nodes
    prior_tokens_per_pass: float = 4.0  # tokens a row a pass assumed for speculation before any is measured
    joint_tail: Switch = "auto"  # chain's tail: one pass verifies both groups ("auto": offloaded target)
    draft_prefill_stream: bool = True  # tree refills: the draft prefills new prompts on its own stream
    growth_tokens: int = 512  # tree growth: the most nodes one draft pass expands over all rows
    logit_rows: int = 512  # tree verification: the target's picks over this many nodes at a time


@dataclass(frozen=True)
class EngineOptions:
    """Everything an `LLM` is built with, but the two models."""
    device: Optional[str] = None  # "cuda", "cuda:1" or "cpu" (or a torch.device); None: cuda where there is one
    dtype: Optional[str] = None  # "bfloat16", "float16" or "float32" (or a torch.dtype); None: bf16 on a GPU, fp32 on the CPU
    gpu_memory: Union[None, int, str] = None  # GPU budget ("24GiB" or bytes); None: free memory less 1 GiB
    offload: Optional[bool] = None  # stream the target from host memory; None: the planner decides
    seed: int = 0  # sampling's seed where SamplingParams gives none
    max_rows: int = 256  # the most rows one pass serves
    prefill_chunk: int = 512  # prompt tokens a row per prefill pass
    ring_slots: int = 3  # GPU slots the streamed layers rotate through
    ring_pieces: Optional[int] = None  # copy a layer in this many pieces; None: the planner decides
    cuda_graphs: bool = True  # replay captured CUDA graphs for fixed-shape steps
    kv_placement: Optional[Literal["gpu", "host"]] = None  # the target's cache; None: the planner decides
    draft_quant: Optional[Literal["fp8"]] = None  # store the draft's decoder weights in float8
    spec: SpecOptions = field(default_factory=SpecOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)
    kernels: KernelOptions = field(default_factory=KernelOptions)

    @classmethod
    def build(cls, **fields) -> "EngineOptions":
        """Options with these fields set (see replace)."""
        return cls().replace(**fields)

    def replace(self, **fields) -> "EngineOptions":
        """A copy with fields set by name: a top-level field, a nested one by its own name
        (`draft_len=4`) or dotted (`kernels.pdl=False`), or a whole nested object
        (`kernels=KernelOptions(...)`). `spec` also takes a mode: `spec="tree"`."""
        out = self
        for name, value in fields.items():
            if name == "spec" and not isinstance(value, SpecOptions):
                name = "spec.mode"
            path = _resolve(name)
            out = _set(out, path, _check(path, value))
        return out

    def with_setting(self, name: str, text: str) -> "EngineOptions":
        """A copy with one field set from its text form ("off", "1.5", "none", "true")."""
        if name == "spec":
            name = "spec.mode"
        path = _resolve(name)
        return _set(self, path, _check(path, _parse(path, text)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_NESTED = {"spec": SpecOptions, "cache": CacheOptions, "kernels": KernelOptions}


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _resolve(name: str) -> Tuple[str, ...]:
    """The path of a field named flat or dotted."""
    parts = tuple(name.replace("-", "_").split("."))
    if len(parts) == 2 and parts[0] in _NESTED and parts[1] in _fields(_NESTED[parts[0]]):
        return parts
    if len(parts) == 1:
        if parts[0] in _fields(EngineOptions):
            return parts
        owners = [k for k, cls in _NESTED.items() if parts[0] in _fields(cls)]
        if len(owners) == 1:
            return (owners[0], parts[0])
    known = sorted(list(_fields(EngineOptions)) + [f"{k}.{n}" for k, cls in _NESTED.items()
                                                    for n in _fields(cls)])
    raise OptionsError(f"no option named {name!r}; the options are: {', '.join(known)}")


def _type(path: Tuple[str, ...]):
    cls = EngineOptions if len(path) == 1 else _NESTED[path[0]]
    return _fields(cls)[path[-1]]


def _allowed(tp) -> Tuple[list, list]:
    """(literal values, plain types) a field's annotation admits."""
    literals, types = [], []
    for arg in (typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)):
        if typing.get_origin(arg) is Literal:
            literals.extend(typing.get_args(arg))
        elif arg is type(None):
            literals.append(None)
        else:
            types.append(typing.get_origin(arg) or arg)
    return literals, types


def _check(path: Tuple[str, ...], value):
    if path == ("device",) and isinstance(value, torch.device):
        return str(value)
    if path == ("dtype",) and isinstance(value, torch.dtype):
        return str(value).split(".")[-1]
    tp = _type(path)
    if len(path) == 1 and path[0] in _NESTED:
        if not isinstance(value, _NESTED[path[0]]):
            raise OptionsError(f"option {path[0]} takes a {_NESTED[path[0]].__name__}, "
                               f"not {value!r}")
        return value
    literals, types = _allowed(tp)
    if value in literals and (value is not True and value is not False or bool in types):
        return value
    for t in types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, bool):
            continue
        if isinstance(value, t):
            return value
    want = [repr(v) for v in literals] + [t.__name__ for t in types]
    raise OptionsError(f"option {'.'.join(path)} takes {' or '.join(want)}, not {value!r}")


def _parse(path: Tuple[str, ...], text: str):
    """A field's value from its text form, by its annotation."""
    literals, types = _allowed(_type(path))
    low = text.strip().lower()
    if None in literals and low in ("none", "null", ""):
        return None
    for v in literals:
        if isinstance(v, str) and low == v:
            return v
    if bool in types and low in ("true", "on", "1", "yes", "false", "off", "0", "no"):
        return low in ("true", "on", "1", "yes")
    for t in (int, float):
        if t in types:
            try:
                return t(text)
            except ValueError:
                pass
    if str in types:
        return text
    want = [repr(v) for v in literals] + [t.__name__ for t in types]
    raise OptionsError(f"option {'.'.join(path)} takes {' or '.join(want)}, not {text!r}")


def _set(options: EngineOptions, path: Tuple[str, ...], value) -> EngineOptions:
    if len(path) == 1:
        return dataclasses.replace(options, **{path[0]: value})
    inner = dataclasses.replace(getattr(options, path[0]), **{path[1]: value})
    return dataclasses.replace(options, **{path[0]: inner})
