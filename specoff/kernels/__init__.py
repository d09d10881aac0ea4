"""Triton kernels; each module exports op() and op_ref() (plain torch)."""
import functools

import torch


def launcher(kernel, tensor: torch.Tensor):
    """wrap_triton while torch.compile or make_fx traces; the bare kernel in eager mode.

    On the H200 every eager call through wrap_triton's dispatcher showed a host-time floor of
    ~0.4 ms per launch, more than the kernels themselves take at decode sizes.
    """
    if torch.compiler.is_compiling() or type(tensor) is not torch.Tensor:
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


def num_sms(device) -> int:
    """The device's streaming multiprocessors (4 off a GPU: the interpreter's stand-in), read
    once a device: launch configs ask for it at every call."""
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def compiled_kernels():
    """How many compiled specializations this package's Triton kernels hold, over all
    devices (Triton compiles a kernel again for each new combination of its constexprs and
    of its integer arguments' divisibility by 16, on the host, the first time it meets one);
    None where they run without compiling (TRITON_INTERPRET). A difference of two readings
    counts the compiles between them."""
    from triton.runtime.jit import JITFunction

    from . import attention, fp8_gemm, fused, moe, skinny

    total, found = 0, False
    for module in (attention, fp8_gemm, fused, moe, skinny):
        for obj in vars(module).values():
            if isinstance(obj, JITFunction):
                found = True
                try:  # (kernel cache, ...) in Triton 3.x; a diagnostic must never fail a run
                    total += sum(len(caches[0]) for caches in obj.device_caches.values())
                except (AttributeError, TypeError, IndexError):
                    return None
    return total if found else None
