"""Weight-only quantization of a resident model's linear layers (the draft's).

A draft that lives on the GPU beside an offloaded target takes its bf16 weights out of the
budget that would otherwise hold rows: a Mistral-7B-shaped draft is 13.5 GiB of a 24 GiB
budget. Stored in float8 (e4m3, one scale per output row) its decoder layers take half
that; each product reads the float8 weight in a kernel that converts it in registers
(kernels.fp8_gemm, where KernelOptions.fp8_weight_kernel runs) or dequantizes it to the
activations' dtype first (a transient of one matrix), and scales the output rows. The draft only proposes tokens: the target's
verification keeps the output exact (greedy) or lossless (sampling) whatever it proposes,
so quantization can only move the acceptance rate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, UnsupportedModelError
from .kernels.fp8_gemm import fp8_linear
from .options import KernelOptions

WEIGHT_QUANTS = ("fp8",)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value


def fp8_rows(w: torch.Tensor):
    """(W8, s): `w` (N, K) in float8 e4m3 with one float32 scale per row (absmax / 448), as
    Fp8Linear stores it (synthetic.on_fp8_grid rounds weights the same way)."""
    amax = w.abs().amax(dim=1).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (w.float() / scale[:, None]).to(FP8), scale


class Fp8Linear(nn.Module):
    """y = x · (W8 · s)ᵀ + b with W8 (N, K) in float8 e4m3 and s (N,) a scale per row."""

    def __init__(self, linear: nn.Linear, kernels: KernelOptions = KernelOptions()):
        super().__init__()
        self.kernels = kernels  # Transformer.use_kernels sets the model's
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, scale = fp8_rows(w)
        self.weight = nn.Parameter(w8, requires_grad=False)
        # in the model's dtype: the output is scaled in it (bf16: 3 significant digits, far
        # finer than e4m3's own steps)
        self.scale = nn.Parameter(scale.to(w.dtype), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.runs(self.kernels.fp8_weight_kernel, x):
            y = fp8_linear(x, self.weight, self.scale)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


def check_weight_quant(cfg: ModelConfig, quant) -> None:
    """Refuse a quantization this engine cannot apply to `cfg`."""
    if quant is None:
        return
    if quant not in WEIGHT_QUANTS:
        raise ValueError(f"draft_quant must be one of {', '.join(WEIGHT_QUANTS)} or None, "
                         f"not {quant!r}")
    if cfg.is_moe:
        raise UnsupportedModelError(
            f"draft_quant={quant!r} applies to dense drafts; this draft is a mixture of "
            f"experts ({cfg.family}): leave draft_quant unset")


@torch.no_grad()
def quantize_linears(model: nn.Module, quant: str = "fp8") -> int:
    """Replace the decoder layers' nn.Linear modules (attention and feed-forward; not the
    embeddings or the head) by Fp8Linear, one at a time so that the model's memory only
    shrinks; each takes the model's kernel options. Returns how many it replaced."""
    if quant not in WEIGHT_QUANTS:
        raise ValueError(f"unknown weight quantization {quant!r}")
    count = 0
    for layer in model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Fp8Linear(child, getattr(model, "kernels", KernelOptions())))
                    count += 1
    return count
