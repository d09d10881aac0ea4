"""Offloaded target execution: a pinned host store and a GPU ring buffer of layer slots.

SpecOffload (arXiv 2505.10259) §4 and FlexGen stream the target's layers from host memory;
here every decoder layer is packed into one contiguous block of a pinned host buffer, and a
ring of K GPU slots is filled on a dedicated copy stream while earlier layers compute. CUDA
events order the two streams, so the layer loop never waits on the host.

Layout of one packed layer: the feed-forward (experts) first, then attention, norms and the
router. When the plan keeps attention resident, only the feed-forward prefix streams.
"""
from __future__ import annotations

import math
import resource
import time
import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from .config import ModelConfig
from .weights import materialize

FFN_PREFIX = "feed_forward."
ROUTER = "feed_forward.gate.weight"
ALIGN_BYTES = 256  # every packed tensor starts on a 256-byte boundary


@dataclass
class LayerLayout:
    """Where each tensor of one decoder layer sits in the layer's flat block."""
    entries: Dict[str, tuple]  # name → (offset in elements, shape)
    numel: int
    stream_numel: int  # the prefix [0, stream_numel) streams through the ring

    @classmethod
    def of(cls, block: torch.nn.Module, dtype: torch.dtype, stream_attention: bool):
        params = dict(block.named_parameters())
        ffn = [n for n in params if n.startswith(FFN_PREFIX) and n != ROUTER]
        rest = [n for n in params if n not in ffn]
        align = ALIGN_BYTES // torch.empty(0, dtype=dtype).element_size()
        entries, offset, ffn_end = {}, 0, 0
        for name in ffn + rest:
            entries[name] = (offset, tuple(params[name].shape))
            offset += -(-params[name].numel() // align) * align
            if name in ffn:
                ffn_end = offset
        return cls(entries, offset, offset if stream_attention else ffn_end)

    def streams(self, name: str) -> bool:
        return self.entries[name][0] < self.stream_numel

    def views(self, flat: torch.Tensor, streamed_only: bool = False) -> Dict[str, torch.Tensor]:
        return {name: flat[off:off + math.prod(shape)].view(shape)
                for name, (off, shape) in self.entries.items()
                if not streamed_only or off < self.stream_numel}


def pin(tensor: torch.Tensor) -> None:
    """Page-lock an existing host tensor in place (cudaHostRegister).

    Touching the pages first and registering them was measured ~3x faster than allocating
    with pin_memory=True on the reference host (DESIGN.md).
    """
    cudart = torch.cuda.cudart()
    nbytes = tensor.numel() * tensor.element_size()
    err = cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.1f} GiB failed ({err}); "
                           f"is host memory or the locked-memory limit (ulimit -l) too small?")
    weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())


class HostStore:
    """All decoder layers, each a contiguous block of one (pinned) host buffer."""

    def __init__(self, n_layers: int, layout: LayerLayout, dtype: torch.dtype, pinned: bool):
        self.layout = layout
        self.flat = torch.empty(n_layers, layout.numel, dtype=dtype)
        self.flat.zero_()  # touch every page (also zeroes alignment gaps)
        self.pinned = pinned
        if pinned:
            pin(self.flat)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def views(self, layer: int) -> Dict[str, torch.Tensor]:
        return self.layout.views(self.flat[layer])


class WeightRing:
    """K device slots cycling through the streamed layers, filled on a copy stream.

    Streamed layer j always uses slot j mod K. When layer j releases its slot, the slot's
    next tenant is fetched at once: layer j + K, or at the end of a pass the first layer of
    the next pass that maps to the slot, so copies never stop between passes.
    """

    def __init__(self, store: HostStore, layers: Sequence[int], slots: int, device):
        self.store, self.layers, self.device = store, list(layers), torch.device(device)
        self.index = {layer: j for j, layer in enumerate(self.layers)}
        self.n_slots = max(1, min(slots, len(self.layers)))
        self.buffers = torch.empty(self.n_slots, store.layout.stream_numel,
                                   dtype=store.flat.dtype, device=self.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event() for _ in range(self.n_slots)]
            self.released = [torch.cuda.Event() for _ in range(self.n_slots)]
        self.bytes_copied = 0
        for j in range(self.n_slots):
            self._fetch(j)

    @property
    def slot_bytes(self) -> int:
        return self.buffers[0].numel() * self.buffers.element_size()

    def slot_of(self, layer: int) -> int:
        return self.index[layer] % self.n_slots

    def slot_views(self, slot: int) -> Dict[str, torch.Tensor]:
        return self.store.layout.views(self.buffers[slot], streamed_only=True)

    def __contains__(self, layer: int) -> bool:
        return layer in self.index

    def _fetch(self, j: int) -> None:
        slot = j % self.n_slots
        src = self.store.flat[self.layers[j], :self.store.layout.stream_numel]
        self.bytes_copied += src.numel() * src.element_size()
        if not self.cuda:
            self.buffers[slot].copy_(src)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.released[slot])  # the slot's last reader is done
            self.buffers[slot].copy_(src, non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def reload(self) -> None:
        """Fetch every slot's first tenant again, after the store's values changed."""
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no pass is still reading a slot
        for j in range(self.n_slots):
            self._fetch(j)

    def acquire(self, layer: int) -> None:
        """Make the current stream wait until `layer`'s weights are in its slot."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[self.slot_of(layer)])

    def release(self, layer: int) -> None:
        """`layer` has been issued; refill its slot with the slot's next tenant."""
        j, n, k = self.index[layer], len(self.layers), self.n_slots
        if n <= k:
            return  # every streamed layer has a slot of its own: nothing to evict
        if self.cuda:
            self.released[j % k].record(torch.cuda.current_stream(self.device))
        self._fetch(j + k if j + k < n else j % k)


def copy_gbps(device, nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """Measured host→device copy rate in GB/s from pinned memory (on a CPU device: a copy
    between two host buffers), for the physical limit of a pass: bytes streamed / rate."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(host, non_blocking=True)  # warm-up
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        dst.copy_(host, non_blocking=True)
    if cuda:
        torch.cuda.synchronize(device)
    return nbytes * repeat / (time.perf_counter() - t0) / 1e9


def peak_host_bytes() -> int:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class LoadReport:
    seconds: float
    store_bytes: int
    pinned: bool
    host_peak_bytes: int  # the process's peak RSS after the load
    host_peak_increase_bytes: int  # how much the load raised it

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def build_offloaded(cfg: ModelConfig, source, device, dtype, *, ring_slots: int,
                    resident_attention: bool, resident_layers: int = 0,
                    pinned: Optional[bool] = None):
    """Fill a host store from `source` (weights.checkpoint_source or synthetic.random_source)
    and return a Transformer whose streamed layers read their weights from ring slots, with
    the ring attached (`model.ring`), and a LoadReport."""
    from .models.decoder import Transformer

    device = torch.device(device)
    pinned = device.type == "cuda" if pinned is None else pinned
    t0, peak0 = time.perf_counter(), peak_host_bytes()
    with torch.device("meta"):
        model = Transformer(cfg)
    layout = LayerLayout.of(model.layers[0], dtype, stream_attention=not resident_attention)
    store = HostStore(cfg.n_layers, layout, dtype, pinned)
    dst = {n: torch.empty(p.shape, dtype=dtype, device=device)
           for n, p in model.named_parameters() if not n.startswith("layers.")}
    for i in range(cfg.n_layers):
        dst.update({f"layers.{i}.{n}": t for n, t in store.views(i).items()})
    source(dst)  # checkpoint tensors land straight in the store: no second host copy
    streamed = list(range(resident_layers, cfg.n_layers))
    ring = WeightRing(store, streamed, ring_slots, device) if streamed else None
    for i in range(cfg.n_layers):
        slot = ring.slot_views(ring.slot_of(i)) if ring is not None and i in ring else {}
        for name, host in store.views(i).items():
            key = f"layers.{i}.{name}"
            dst[key] = slot[name] if name in slot else host.to(device)
    model = materialize(model, cfg, dst, device)
    model.ring = ring
    model.store = store
    report = LoadReport(time.perf_counter() - t0, store.nbytes, pinned, peak_host_bytes(),
                        peak_host_bytes() - peak0)
    return model, report


@torch.no_grad()
def refill(model, source) -> None:
    """Rewrite an offloaded model's decoder-layer weights in place from `source` (e.g. an
    upcycled target at another σ): the host store, the device copies of what the plan keeps
    resident, and the ring's slots. No allocation: the pinned store, the ring and the
    captured CUDA graphs stay as they are."""
    store, ring = model.store, model.ring
    views = [store.views(i) for i in range(len(model.layers))]
    source({f"layers.{i}.{n}": t for i, layer in enumerate(views) for n, t in layer.items()})
    for i, block in enumerate(model.layers):
        params = dict(block.named_parameters())
        for name, host in views[i].items():
            in_ring = ring is not None and i in ring and store.layout.streams(name)
            if not in_ring and params[name].data_ptr() != host.data_ptr():
                params[name].copy_(host)  # a resident copy on the device
    if ring is not None:
        ring.reload()
