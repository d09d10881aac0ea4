"""Triton kernels; each module exports op() and op_ref() (plain torch).

attention.py verification and tree attention over a cache; fused.py RMSNorm, rotary and
SwiGLU as one launch each; moe.py the fused mixture-of-experts feed-forward; skinny.py
products of a few rows; fp8_gemm.py products reading float8 weights; step.py a decode
step's two ends; launch.py what they share.
"""
from triton.runtime.jit import JITFunction

from . import attention, fp8_gemm, fused, moe, skinny, step


def compiled_kernels():
    """How many compiled specializations this package's Triton kernels hold, over all
    devices (Triton compiles a kernel again for each new combination of its constexprs and
    of its integer arguments' divisibility by 16, on the host, the first time it meets one);
    None where they run without compiling (TRITON_INTERPRET). A difference of two readings
    counts the compiles between them."""
    total, found = 0, False
    for module in (attention, fp8_gemm, fused, moe, skinny, step):
        for obj in vars(module).values():
            if isinstance(obj, JITFunction):
                found = True
                try:  # (kernel cache, ...) in Triton 3.x; a diagnostic must never fail a run
                    total += sum(len(caches[0]) for caches in obj.device_caches.values())
                except (AttributeError, TypeError, IndexError):
                    return None
    return total if found else None
