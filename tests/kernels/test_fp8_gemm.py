"""The float8-weight product (specoff/kernels/fp8_gemm.py) against its plain-torch reference,
and quant.Fp8Linear through it.

On the CPU the kernel runs in Triton's interpreter (fp32/fp16 activations); bf16, the
Mistral-7B shapes and CUDA-graph capture run under the `gpu` marker. Outputs start as NaN,
so an element the kernel never writes fails.
"""
import zlib

import pytest
import torch
from conftest import DEVICE, TOL, dtype_cases, gpu, rel_err

from specoff.kernels.fp8_gemm import FP8, _fp8_linear_into, fp8_linear, fp8_linear_ref, launch_config
from specoff.options import KernelOptions
from specoff.quant import fp8_rows

CPU_CASES = [(1, 64, 128), (16, 96, 160), (33, 511, 200), (130, 128, 72)]  # rows, N, K
GPU_CASES = [(1, 4096, 4096), (16, 28672, 4096), (64, 4096, 14336), (512, 6144, 4096),
             (33, 511, 200)]


def weights(N, K, gen):
    w = torch.randn(N, K, device=DEVICE, generator=gen) * 0.02
    return fp8_rows(w)  # (W8, scale) as Fp8Linear stores them


@pytest.mark.parametrize("rows,N,K,dtype", list(dtype_cases(CPU_CASES, GPU_CASES)))
def test_fp8_linear_matches_ref(rows, N, K, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(repr((rows, N, K, dtype)).encode()))
    w8, scale = weights(N, K, gen)
    assert w8.dtype == FP8
    x = torch.randn(rows, K, device=DEVICE, generator=gen).to(dtype)
    ref = fp8_linear_ref(x, w8, scale.to(dtype))
    out = torch.full((rows, N), float("nan"), dtype=dtype, device=DEVICE)
    _fp8_linear_into(x, w8, scale.to(dtype), out)
    assert rel_err(out, ref) < TOL[dtype]
    # leading dims and a strided input (a view of a wider projection) go through the wrapper
    wide = torch.randn(2, rows, K + 8, device=DEVICE, generator=gen).to(dtype)
    got = fp8_linear(wide[..., 4:K + 4], w8, scale)
    assert got.shape == (2, rows, N) and got.dtype == dtype
    assert rel_err(got, fp8_linear_ref(wide[..., 4:K + 4], w8, scale)) < TOL[dtype]


def test_fp8_linear_refuses_what_it_cannot_take():
    w8, scale = fp8_rows(torch.randn(8, 16, device=DEVICE))
    with pytest.raises(AssertionError, match="features"):
        fp8_linear(torch.randn(2, 12, device=DEVICE), w8, scale)
    with pytest.raises(AssertionError, match="float8"):
        fp8_linear(torch.randn(2, 16, device=DEVICE), w8.float(), scale)


def test_launch_config_spreads_decode_columns():
    small, mid, big = launch_config(1, 4096), launch_config(64, 4096), launch_config(512, 4096)
    assert small["BLOCK_M"] == 16 and 4096 // small["BLOCK_N"] >= 128
    assert mid["BLOCK_M"] == 64 and big["BLOCK_M"] == 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_linear_module_through_the_kernel(dtype, monkeypatch):
    """quant.Fp8Linear with KernelOptions.fp8_weight_kernel (the interpreter on the CPU): the
    kernel's product, within the dtype's tolerance of the dequantizing path."""
    from specoff import quant

    gen = torch.Generator(device=DEVICE).manual_seed(3)
    lin = torch.nn.Linear(96, 80, bias=True, device=DEVICE).to(dtype)
    x = torch.randn(5, 7, 96, device=DEVICE, generator=gen).to(dtype)
    calls = []
    monkeypatch.setattr(quant, "fp8_linear", lambda *a: (calls.append(1), fp8_linear(*a))[1])
    plain = quant.Fp8Linear(lin, KernelOptions(interpret=True, fp8_weight_kernel=False))(x)
    assert not calls
    got = quant.Fp8Linear(lin, KernelOptions(interpret=True))(x)
    assert calls and got.shape == plain.shape and rel_err(got, plain) < 2 * TOL[dtype]


@gpu
def test_gpu_fp8_linear_in_a_cuda_graph():
    """Captured and replayed: the same bits as the eager product."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w8, scale = weights(4096, 4096, gen)
    x = torch.randn(8, 4096, device="cuda", generator=gen).to(torch.bfloat16)
    expect = fp8_linear(x, w8, scale)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_linear(x, w8, scale)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expect)
