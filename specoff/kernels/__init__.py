"""Triton kernels; each module exports op() and op_ref() (plain torch)."""
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
