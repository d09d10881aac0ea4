"""What every kernel module shares: how a kernel is launched (bare, or wrapped for tracing),
programmatic dependent launch on Hopper, and the device's SM count."""
import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


def launcher(kernel, tensor: torch.Tensor):
    """wrap_triton while torch.compile or make_fx traces; the bare kernel in eager mode, where
    wrap_triton's dispatcher costs more host time a call than the kernels take at decode sizes."""
    if torch.compiler.is_compiling() or type(tensor) is not torch.Tensor:
        return wrap_triton(kernel)
    return kernel


# Programmatic dependent launch (Hopper and later): a decode step's kernels launched with
# launch_pdl, each program first waiting (griddepcontrol.wait) for the launch before it, so the
# next launch's setup overlaps this one's tail. The relaxed order holds between launches of one
# stream only: a wait on another stream's event still holds the launch back (test_pdl.py).
_PLAIN = dict(USE_PDL=False)


def pdl_launch(x: torch.Tensor, enabled: bool) -> dict:
    """The launch's keyword arguments for a kernel taking the constexpr USE_PDL and starting
    with pdl_start: a programmatic dependent launch where `enabled`, on a CUDA tensor of a
    Hopper-or-later device in eager mode; else a plain one. USE_PDL is always given, even
    False: a kernel wrapped for torch.compile takes no defaults for constexprs."""
    if (not enabled or not x.is_cuda or torch.compiler.is_compiling() or type(x) is not torch.Tensor
            or not _pdl_capable(x.device.index or 0)):
        return dict(_PLAIN)
    return dict(USE_PDL=True, launch_pdl=True)


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    return (torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(cuda, "gdc_wait")
            and hasattr(cuda, "gdc_launch_dependents"))


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """First thing in a kernel launched by pdl_launch(): wait until the launch before it has
    ended and its writes are visible (the next launch is scheduled at pdl_release or the end)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(USE_PDL: tl.constexpr):
    """After a kernel's main loop: the next launch may be scheduled once every program has
    come here (or ended)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


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
