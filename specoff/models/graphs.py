"""CUDA graphs of decoder layers: one capture per layer for a fixed (rows, tokens) shape.

A decode pass then replays one graph per layer, with the ring's event waits between the
replays, instead of launching every kernel of every layer from Python. Each graph reads
its weights where they sit: resident tensors, or the ring slot that the layer always
streams through (see offload.WeightRing).
"""
from __future__ import annotations

import weakref

import torch

from ..kvcache import KVCache


class LayerGraphs:
    def __init__(self, model, cache: KVCache, rows: int, tokens: int):
        cfg, device = model.config, cache.k.device
        dtype = model.tok_embeddings.weight.dtype
        # A weak reference: the graphs must not keep their cache (the dictionary key) alive.
        self.model, self.cache = model, weakref.proxy(cache)
        self.h = torch.zeros(rows, tokens, cfg.dim, dtype=dtype, device=device)
        self.cos = torch.zeros(rows, tokens, 1, cfg.head_dim, dtype=dtype, device=device)
        self.sin = torch.zeros_like(self.cos)
        self.mask = torch.zeros(rows, 1, tokens, cache.max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(rows, tokens, dtype=torch.long, device=device)
        self.graphs = None

    def _load(self, h, cos, sin, mask, positions):
        self.h.copy_(h)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.mask.copy_(mask)
        self.positions.copy_(positions)

    def _layer(self, i):
        out = self.model.layers[i](self.h, self.cos, self.sin, self.mask, self.cache, i,
                                   self.positions, self.cache.max_len)
        self.h.copy_(out)

    def _capture(self):
        # Warm-up writes K/V at this step's own positions, which the first replay rewrites.
        inputs = self.h.clone()
        side = torch.cuda.Stream(self.h.device)
        side.wait_stream(torch.cuda.current_stream(self.h.device))
        with torch.cuda.stream(side):
            for i in range(len(self.model.layers)):
                self._layer(i)
        torch.cuda.current_stream(self.h.device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self.graphs = []
        for i in range(len(self.model.layers)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._layer(i)
            self.graphs.append(graph)
        self.h.copy_(inputs)

    def run(self, h, cos, sin, mask, positions) -> torch.Tensor:
        self._load(h, cos, sin, mask, positions)
        if self.graphs is None:
            self._capture()
        ring = self.model.ring
        for i, graph in enumerate(self.graphs):
            if ring is not None and i in ring:
                ring.acquire(i)
            graph.replay()
            if ring is not None and i in ring:
                ring.release(i)
        return self.h
