"""Host memory: pinning, the page-locked block pool, what the host has free, byte units, the
cache folder. The low helpers that the memory, offload and planning layers share.
"""
from __future__ import annotations

import gc
import math
import os
import re
import resource
import weakref
from pathlib import Path
from typing import Optional

import torch

GiB = 2**30
# Host memory a plan leaves to the process beside the caches: prompts, logits copied back,
# the allocator's and the libraries' own.
HOST_MARGIN = 4 << 30


class BudgetError(ValueError):
    """The GPU memory budget cannot hold any plan."""


class HostMemoryError(BudgetError):
    """Host memory cannot hold the offloaded weights' store or a cache placed there."""


def parse_bytes(value) -> int:
    """'24GiB', '24GB', '512MiB', 24e9 → bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {value!r}; write e.g. '24GiB' or '80GB'")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    scale = (1024 if binary else 1000) ** " KMGT".index(unit or " ")
    return int(number * scale)


def pin(tensor: torch.Tensor) -> None:
    """Page-lock an existing host tensor in place (cudaHostRegister).

    Touching the pages first and registering them was measured ~3x faster than allocating
    with pin_memory=True on the reference host (docs/design.md).
    """
    cudart = torch.cuda.cudart()
    nbytes = tensor.numel() * tensor.element_size()
    err = cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.1f} GiB failed ({err}); "
                           f"is host memory or the locked-memory limit (ulimit -l) too small?")
    weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())


class HostPool:
    """Page-locked host blocks handed out as cache tensors, taken back when the tensor is
    collected: pinning costs seconds (docs/design.md), and a throughput run's cache in host
    memory is tens of GB, so the next cache reuses the blocks. A request takes the smallest free block that holds it; failing that, the free
    blocks are let go (their memory returned) and a new one is touched and registered
    (pin). A new block is zeros; a reused one holds what caches of the same dtype
    wrote (finite values a cache never reads past a row's length: masked keys weigh 0, and
    0 × a finite value is 0), and is zeroed only for another dtype, whose bit patterns
    could read as NaN."""

    def __init__(self):
        self._blocks: list = []  # [uint8 buffer, leased, dtype last handed out as]

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        block = self._free_block(n)
        if block is None:
            gc.collect()  # caches held in reference cycles give their blocks back
            block = self._free_block(n)
        if block is None:
            self._blocks = [b for b in self._blocks if b[1]]  # let the free ones go
            buffer = torch.zeros(n, dtype=torch.uint8)  # touched: registering is then fast
            pin(buffer)
            block = [buffer, False, dtype]
            self._blocks.append(block)
        t = block[0][:n].view(dtype).view(shape)
        if block[2] != dtype:
            t.zero_()
        block[1], block[2] = True, dtype
        weakref.finalize(t, _release, block)
        return t

    def _free_block(self, n: int):
        free = [b for b in self._blocks if not b[1] and b[0].numel() >= n]
        return min(free, key=lambda b: b[0].numel(), default=None)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether `t` lies in one of the blocks (registered, page-locked memory)."""
        p = t.data_ptr()
        return any(b[0].data_ptr() <= p < b[0].data_ptr() + b[0].numel() for b in self._blocks)

    def clear(self) -> None:
        """Let every free block go (blocks in use go when their caches do)."""
        self._blocks = [b for b in self._blocks if b[1]]

    @property
    def nbytes(self) -> int:
        return sum(b[0].numel() for b in self._blocks)

    @property
    def free_bytes(self) -> int:
        """Bytes of the blocks no cache holds (a new cache reuses them)."""
        return sum(b[0].numel() for b in self._blocks if not b[1])


def _release(block) -> None:
    block[1] = False


HOST_BLOCKS = HostPool()


def host_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor in page-locked host memory (from HOST_BLOCKS where CUDA runs)."""
    if torch.cuda.is_available():
        return HOST_BLOCKS.zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, pin_memory=True)




def available_host_bytes() -> Optional[int]:
    """Bytes a new cache in host memory may take: the system's available memory (Linux
    /proc/meminfo MemAvailable, else physical pages free), plus the free page-locked blocks
    HOST_BLOCKS holds for reuse, less HOST_MARGIN. None where the system does not say."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return free + HOST_BLOCKS.free_bytes - HOST_MARGIN


def release_host_memory() -> None:
    """Return the page-locked blocks that no cache holds (HOST_BLOCKS) to the system."""
    HOST_BLOCKS.clear()


def peak_host_bytes() -> int:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cache_dir() -> Path:
    """Where specoff keeps what it measures or builds once (hardware profiles, tiny models):
    $SPECOFF_CACHE, else ~/.cache/specoff."""
    return Path(os.environ.get("SPECOFF_CACHE", Path.home() / ".cache" / "specoff"))
