"""Weight-only quantization of a resident model's linear layers (the draft's).

A draft that lives on the GPU beside an offloaded target takes its bf16 weights out of the
budget that would otherwise hold rows: a Mistral-7B-shaped draft is 13.5 GiB of a 24 GiB
budget. Stored in float8 (e4m3, one scale per output row) its decoder layers take half
that; each product dequantizes the weight to the activations' dtype first (a transient of
one matrix) and scales the output rows. The draft only proposes tokens: the target's
verification keeps the output exact (greedy) or lossless (sampling) whatever it proposes,
so quantization can only move the acceptance rate.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, UnsupportedModelError
from .kvcache import check_segment_mode

WEIGHT_QUANTS = ("fp8",)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
# On a GPU with float8 matrix units (compute capability 8.9+), products in float8: the
# activations quantized a row at a time, torch._scaled_mm with a scale per row of each side
# (the weight read as is, no dequantized copy). False: dequantize, then a bf16 product
# (everywhere). H200, tree mode, 429 rows (session 13): the growth a round 0.586 s
# dequantizing, 0.297 s in float8, but 1.32 tokens a row a pass against 1.63 (the
# activations' rounding on top of the weights'): 129.4 against 135.1 tokens/s. Off.
FP8_GEMM = False
# Products with the weight loaded as float8 and converted in registers by a Triton kernel
# (kernels/fp8_gemm.py: a step reads 1 byte a weight, where dequantizing first moves 5),
# the activations in their own dtype: "auto" on CUDA tensors, "on" wherever Triton runs
# (CUDA tensors, or CPU ones under TRITON_INTERPRET: tests), "off" dequantizes. Correct on
# the H200 (session 19: against the reference in bf16/fp16/fp32, in a CUDA graph, chain and
# tree speculation exact through it). Timed there in session 20: the draft's three products
# 1.1-5.2× faster than dequantizing at 1-512 rows but on wo at 64 and 512 rows (0.93×,
# 0.86×), still 0.95-3.0× bf16's time; and in tree runs with a float8 draft (256 rows, 328
# HumanEval prompts × 32 tokens, off / auto / off) the growth a round 0.325 / 0.233 / 0.322
# s, 109.7 / 113.3 / 112.0 tokens/s: "auto".
FP8_WEIGHT_KERNEL = "auto"


def use_weight_kernel(x: torch.Tensor) -> bool:
    check_segment_mode("quant.FP8_WEIGHT_KERNEL", FP8_WEIGHT_KERNEL)
    if FP8_WEIGHT_KERNEL == "on" and os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return FP8_WEIGHT_KERNEL != "off" and x.is_cuda


def fp8_rows(w: torch.Tensor):
    """(W8, s): `w` (N, K) in float8 e4m3 with one float32 scale per row (absmax / 448), as
    Fp8Linear stores it (synthetic.on_fp8_grid rounds weights the same way)."""
    amax = w.abs().amax(dim=1).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (w.float() / scale[:, None]).to(FP8), scale


class Fp8Linear(nn.Module):
    """y = x · (W8 · s)ᵀ + b with W8 (N, K) in float8 e4m3 and s (N,) a scale per row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, scale = fp8_rows(w)
        self.weight = nn.Parameter(w8, requires_grad=False)
        # in the model's dtype: the output is scaled in it (bf16: 3 significant digits, far
        # finer than e4m3's own steps)
        self.scale = nn.Parameter(scale.to(w.dtype), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FP8_GEMM and _fp8_gemm_ok(x, self.weight):
            y = _scaled_product(x, self.weight, self.scale)
        elif use_weight_kernel(x):
            from .kernels.fp8_gemm import fp8_linear

            y = fp8_linear(x, self.weight, self.scale)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


def _fp8_gemm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._scaled_mm can take this product: bf16 on a CUDA device of compute capability
    8.9 or above, K and N multiples of 16."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and w.shape[0] % 16 == 0
            and w.shape[1] % 16 == 0 and _capability(x.device.index) >= (8, 9))


@functools.lru_cache(maxsize=None)
def _capability(index) -> tuple:
    return torch.cuda.get_device_capability(index)


def _scaled_product(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x · (W8 · s)ᵀ in float8: x quantized a row at a time, both scales applied by the
    product (rowwise torch._scaled_mm)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    xq = (x2 / x_scale).to(FP8)
    y = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale.float()[None],
                         out_dtype=x.dtype)
    return y.reshape(*shape[:-1], w.shape[0])


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
    shrinks. Returns how many it replaced."""
    if quant not in WEIGHT_QUANTS:
        raise ValueError(f"unknown weight quantization {quant!r}")
    count = 0
    for layer in model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Fp8Linear(child))
                    count += 1
    return count
