"""Offloaded target execution: a pinned host store and a GPU ring buffer of layer slots.

SpecOffload (arXiv 2505.10259) §4 and FlexGen stream the target's layers from host memory;
here every decoder layer is packed into one contiguous block of a pinned host buffer, and a
ring of K GPU slots is filled on a dedicated copy stream while earlier layers compute. CUDA
events order the two streams, so the layer loop never waits on the host.

Layout of one packed layer: the feed-forward (experts) first, then attention, norms and the
router. When the plan keeps attention resident, only the feed-forward prefix streams.

A mixture-of-experts layer may stream in `pieces` (1, 2, 4, ...): piece s holds experts
[s·E/P, (s+1)·E/P) of both expert tensors (and piece 0 the attention, if that streams), so a
ring slot holds a fraction of a layer. Two slots of quarter layers keep the copy engine as
busy as two of whole layers (each piece's experts compute while the next piece copies), and
free GPU memory for rows: at 24 GiB with a 7B draft resident, three quarters of the ring.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .config import ModelConfig
from .hostmem import GiB, HOST_MARGIN, HostMemoryError, available_host_bytes, peak_host_bytes, pin
from .models.decoder import Transformer
from .weights import materialize

FFN_PREFIX = "feed_forward."
ROUTER = "feed_forward.gate.weight"
EXPERT_PARAMS = ("feed_forward.w13", "feed_forward.w2")  # (E, ...) stacks, split by piece
ALIGN_BYTES = 256  # every packed tensor starts on a 256-byte boundary


@dataclass
class LayerLayout:
    """Where each tensor of one decoder layer sits in the layer's flat block."""
    entries: Dict[str, tuple]  # name → (offset in elements, shape)
    numel: int
    stream_numel: int  # the prefix [0, stream_numel) streams through the ring
    pieces: int = 1  # a streamed layer moves in this many ring units (split by experts)
    align: int = 1  # elements per ALIGN_BYTES

    @classmethod
    def of(cls, block: torch.nn.Module, dtype: torch.dtype, stream_attention: bool,
           pieces: int = 1):
        params = dict(block.named_parameters())
        if pieces > 1:
            shapes = [tuple(params[n].shape) for n in EXPERT_PARAMS if n in params]
            if len(shapes) != 2 or shapes[0][0] % pieces:
                n = shapes[0][0] if shapes else 0
                raise ValueError(f"ring_pieces={pieces} splits a layer by its experts: it needs "
                                 f"a mixture-of-experts layer whose expert count divides by it "
                                 f"(this one has {n} experts); use ring_pieces=1")
        ffn = [n for n in params if n.startswith(FFN_PREFIX) and n != ROUTER]
        rest = [n for n in params if n not in ffn]
        align = ALIGN_BYTES // torch.empty(0, dtype=dtype).element_size()
        entries, offset, ffn_end = {}, 0, 0
        for name in ffn + rest:
            entries[name] = (offset, tuple(params[name].shape))
            offset += -(-params[name].numel() // align) * align
            if name in ffn:
                ffn_end = offset
        return cls(entries, offset, offset if stream_attention else ffn_end, pieces, align)

    def streams(self, name: str) -> bool:
        return self.entries[name][0] < self.stream_numel

    def views(self, flat: torch.Tensor, streamed_only: bool = False) -> Dict[str, torch.Tensor]:
        return {name: flat[off:off + math.prod(shape)].view(shape)
                for name, (off, shape) in self.entries.items()
                if not streamed_only or off < self.stream_numel}

    def piece_plan(self, piece: int) -> List[Tuple[str, int, int, int, tuple]]:
        """What piece `piece` of a streamed layer copies: (name, source offset in the layer's
        block, offset in the slot, elements, shape in the slot)."""
        if self.pieces == 1:
            return [(name, off, off, math.prod(shape), shape)
                    for name, (off, shape) in self.entries.items() if off < self.stream_numel]
        plan, dst = [], 0
        for name, (off, shape) in self.entries.items():
            if off >= self.stream_numel:
                continue
            if name in EXPERT_PARAMS:
                per = shape[0] // self.pieces
                sub = (per,) + tuple(shape[1:])
                src = off + piece * per * math.prod(shape[1:])
            elif piece == 0:
                sub, src = shape, off
            else:
                continue
            plan.append((name, src, dst, math.prod(sub), sub))
            dst += -(-math.prod(sub) // self.align) * self.align
        return plan

    @property
    def slot_numel(self) -> int:
        """Elements of one ring slot: the largest piece."""
        if self.pieces == 1:
            return self.stream_numel
        return max(p[-1][2] + p[-1][3] for p in map(self.piece_plan, range(self.pieces)))

    def piece_views(self, flat: torch.Tensor, piece: int) -> Dict[str, torch.Tensor]:
        """The tensors of piece `piece` inside a slot buffer."""
        return {name: flat[dst:dst + n].view(shape)
                for name, _, dst, n, shape in self.piece_plan(piece)}


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

    The ring moves units: whole layers, or (layout.pieces > 1) pieces of layers in order,
    (layer, 0), (layer, 1), ... Streamed unit j always uses slot j mod K. When unit j
    releases its slot, the slot's next tenant is fetched at once: unit j + K, or at the end
    of a pass the first unit of the next pass that maps to the slot, so copies never stop
    between passes.
    """

    def __init__(self, store: HostStore, layers: Sequence[int], slots: int, device):
        self.store, self.layers, self.device = store, list(layers), torch.device(device)
        layout = store.layout
        self.pieces = layout.pieces
        self.units = [(layer, s) for layer in self.layers for s in range(self.pieces)]
        self.index = {unit: j for j, unit in enumerate(self.units)}
        self.n_slots = max(1, min(slots, len(self.units)))
        self.buffers = torch.empty(self.n_slots, layout.slot_numel,
                                   dtype=store.flat.dtype, device=self.device)
        self.plans = [layout.piece_plan(s) for s in range(self.pieces)]
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

    @property
    def unit_numel(self) -> int:
        """Elements one pass copies per streamed layer."""
        if self.pieces == 1:
            return self.store.layout.stream_numel  # one copy, alignment gaps and all
        return sum(n for plan in self.plans for _, _, _, n, _ in plan)

    def slot_of(self, layer: int, piece: int = 0) -> int:
        return self.index[(layer, piece)] % self.n_slots

    def slot_views(self, slot: int, piece: int = 0) -> Dict[str, torch.Tensor]:
        return self.store.layout.piece_views(self.buffers[slot], piece)

    def __contains__(self, layer: int) -> bool:
        return (layer, 0) in self.index

    def _fetch(self, j: int) -> None:
        slot = j % self.n_slots
        layer, piece = self.units[j]
        src, dst = self.store.flat[layer], self.buffers[slot]
        if self.pieces == 1:  # a whole layer's prefix: one copy
            n = self.store.layout.stream_numel
            copies = [(dst[:n], src[:n])]
        else:
            copies = [(dst[d:d + n], src[s:s + n]) for _, s, d, n, _ in self.plans[piece]]
        self.bytes_copied += sum(c[1].numel() for c in copies) * src.element_size()
        if not self.cuda:
            for d, s in copies:
                d.copy_(s)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.released[slot])  # the slot's last reader is done
            for d, s in copies:
                d.copy_(s, non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def reload(self) -> None:
        """Fetch every slot's first tenant again, after the store's values changed."""
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no pass is still reading a slot
        for j in range(self.n_slots):
            self._fetch(j)

    def acquire(self, layer: int, piece: int = 0) -> None:
        """Make the current stream wait until the unit's weights are in its slot."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[self.slot_of(layer, piece)])

    def release(self, layer: int, piece: int = 0) -> None:
        """The unit has been issued; refill its slot with the slot's next tenant."""
        j, n, k = self.index[(layer, piece)], len(self.units), self.n_slots
        if n <= k:
            return  # every streamed unit has a slot of its own: nothing to evict
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


@dataclass
class LoadReport:
    seconds: float
    store_bytes: int
    pinned: bool
    host_peak_bytes: int  # the process's peak RSS after the load
    host_peak_increase_bytes: int  # how much the load raised it

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_host_memory(cfg: ModelConfig, store_bytes: int) -> None:
    """Refuse, before any of it is allocated, a store of the decoder layers that the host's
    free memory cannot hold: past it the kernel kills the process (or pins swap) mid-load."""
    free = available_host_bytes()
    if free is not None and store_bytes > free:
        raise HostMemoryError(
            f"host memory: the target's {cfg.n_layers} decoder layers need {store_bytes / GiB:.1f} "
            f"GiB of (pinned) host memory to stream from, but {max(free, 0) / GiB:.1f} GiB is "
            f"available (MemAvailable less {HOST_MARGIN / GiB:.0f} GiB kept for the process); free "
            f"host memory, use a host with more, or a smaller target")


def build_offloaded(cfg: ModelConfig, source, device, dtype, *, ring_slots: int,
                    resident_attention: bool, resident_layers: int = 0,
                    pinned: Optional[bool] = None, ring_pieces: int = 1):
    """Fill a host store from `source` (weights.checkpoint_source or weights.random_source)
    and return a Transformer whose streamed layers read their weights from ring slots, with
    the ring attached (`model.ring`), and a LoadReport. With ring_pieces > 1 a streamed
    layer's expert tensors stay host views in the module; its `feed_forward.pieces` name the
    slot views each piece computes from (decoder.Transformer runs them piece by piece)."""
    device = torch.device(device)
    pinned = device.type == "cuda" if pinned is None else pinned
    t0, peak0 = time.perf_counter(), peak_host_bytes()
    with torch.device("meta"):
        model = Transformer(cfg)
    layout = LayerLayout.of(model.layers[0], dtype, stream_attention=not resident_attention,
                            pieces=ring_pieces)
    check_host_memory(cfg, cfg.n_layers * layout.numel * torch.empty(0, dtype=dtype).element_size())
    store = HostStore(cfg.n_layers, layout, dtype, pinned)
    dst = {n: torch.empty(p.shape, dtype=dtype, device=device)
           for n, p in model.named_parameters() if not n.startswith("layers.")}
    for i in range(cfg.n_layers):
        dst.update({f"layers.{i}.{n}": t for n, t in store.views(i).items()})
    source(dst)  # checkpoint tensors land straight in the store: no second host copy
    streamed = list(range(resident_layers, cfg.n_layers))
    ring = WeightRing(store, streamed, ring_slots, device) if streamed else None
    pieces = {}
    for i in range(cfg.n_layers):
        streamed_here = ring is not None and i in ring
        slot = ring.slot_views(ring.slot_of(i)) if streamed_here else {}
        for name, host in store.views(i).items():
            key = f"layers.{i}.{name}"
            if streamed_here and ring_pieces > 1 and name in EXPERT_PARAMS:
                dst[key] = host  # the experts only ever compute from the pieces' slots
            else:
                dst[key] = slot[name] if name in slot else host.to(device)
        if streamed_here and ring_pieces > 1:
            per = cfg.n_experts // ring_pieces
            pieces[i] = [(s * per, ring.slot_views(ring.slot_of(i, s), s))
                         for s in range(ring_pieces)]
    model = materialize(model, cfg, dst, device)
    for i, views in pieces.items():
        model.layers[i].feed_forward.pieces = [
            (first, v["feed_forward.w13"], v["feed_forward.w2"]) for first, v in views]
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
