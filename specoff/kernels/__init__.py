"""Triton kernels; each module exports op() and op_ref() (plain torch)."""
import functools

import torch

import triton
import triton.language as tl


def launcher(kernel, tensor: torch.Tensor):
    """wrap_triton while torch.compile or make_fx traces; the bare kernel in eager mode.

    On the H200 every eager call through wrap_triton's dispatcher showed a host-time floor of
    ~0.4 ms per launch, more than the kernels themselves take at decode sizes.
    """
    if torch.compiler.is_compiling() or type(tensor) is not torch.Tensor:
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


# Programmatic dependent launch (Hopper and later): the kernels of a decode step
# (kernels.skinny's products, fused's norms and rotary cache write, verify_attention) launched
# with the launch_pdl attribute, each program waiting (griddepcontrol.wait) for the launch
# before it to end before it reads anything: the next launch's setup and its programs'
# arrival on the SMs overlap this one's tail instead of following it (CUDA graphs keep it).
# "auto": the next launch may start once every program here has passed its main loop (a
# product's K loop) or ended; "early": once every program has started; "off": plain
# launches, each after the last ends. The relaxed order is between launches of one stream
# only: a stream's wait on another's event (the target's weights from the copy stream)
# still holds the next launch back (tests/kernels/test_pdl.py, on the H200). The draft's
# step on the H200 with "auto": 4.07-4.24 ms against 4.23-4.34 without (session 24, every
# other decode fusion on; bench/runs/h200-session24/).
PDL = "auto"


_PLAIN = dict(USE_PDL=False, PDL_EARLY=False)


def pdl(x: torch.Tensor) -> dict:
    """The launch's keyword arguments for a kernel taking the constexprs USE_PDL and PDL_EARLY
    and starting with pdl_start: both False (a plain launch), or set with launch_pdl. Always
    both, even off: a kernel wrapped for torch.compile takes no defaults for constexprs."""
    if PDL not in ("auto", "early", "off"):
        raise ValueError(f"kernels.PDL is {PDL!r}: set it to 'auto', 'early' or 'off'")
    if (PDL == "off" or not x.is_cuda or torch.compiler.is_compiling() or type(x) is not torch.Tensor
            or not _pdl_capable(x.device.index or 0)):
        return dict(_PLAIN)
    return dict(USE_PDL=True, PDL_EARLY=PDL == "early", launch_pdl=True)


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    return (torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(cuda, "gdc_wait")
            and hasattr(cuda, "gdc_launch_dependents"))


@triton.jit
def pdl_start(USE_PDL: tl.constexpr, PDL_EARLY: tl.constexpr):
    """First thing in a kernel launched by pdl(): wait until the launch before it has ended
    and its writes are visible; with PDL_EARLY then let the next launch's programs be
    scheduled (else a program's pdl_release or its end does)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if PDL_EARLY:
            tl.extra.cuda.gdc_launch_dependents()


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
