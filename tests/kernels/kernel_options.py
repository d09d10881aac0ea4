"""KernelOptions for a test on this machine's DEVICE: what a run there takes by default, some
fields set. On the CPU the paths a GPU takes by default are off unless named, and the named
ones run in Triton's interpreter (TRITON_INTERPRET, set by conftest)."""
from conftest import DEVICE

from specoff.options import KernelOptions

# the paths that run on CUDA tensors only unless `interpret` sends CPU ones through Triton
GPU_PATHS = ("fused_elementwise", "skinny_products", "chain_attention", "tree_attention", "step_kernels",
             "fp8_weight_kernel")


def kernel_options(**fields) -> KernelOptions:
    base = dict({name: False for name in GPU_PATHS}, interpret=True) if DEVICE == "cpu" else {}
    return KernelOptions(**{**base, **fields})
