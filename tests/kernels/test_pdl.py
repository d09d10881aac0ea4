"""Programmatic dependent launch (kernels.launch.pdl_launch, KernelOptions.pdl): the decode step's
kernels launched so that each one's setup overlaps the last one's tail, each program waiting
for the launch before it before it reads. On the CPU: plain launches whatever is asked; on a
GPU (Hopper: `gpu` marker) a decode step and a chain of dependent products give the same
bits with and without it, eagerly and replayed from a CUDA graph (a program reading before
its producer ended would show as a difference).
"""
import pytest
import torch
from conftest import DEVICE, gpu

from specoff.kernels import launch as kernels
from specoff.kernels import skinny
from specoff.options import KernelOptions


def test_pdl_is_plain_off_a_gpu():
    x = torch.zeros(2, 4)
    for enabled in (True, False):
        assert kernels.pdl_launch(x, enabled) == dict(USE_PDL=False)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@gpu
def test_gpu_pdl_chain_of_products_equals_plain_launches():
    """40 dependent products (each reads the one before's output), K split so programs race
    for the sum, eagerly and as one graph: the same bits with PDL as without."""
    if not _hopper():
        pytest.skip("programmatic dependent launch needs Hopper or later")
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    w = (torch.randn(4096, 4096, device=DEVICE, generator=gen) * 4096**-0.5).to(torch.bfloat16)
    x = torch.randn(4, 4096, device=DEVICE, generator=gen).to(torch.bfloat16)
    assert skinny.config(4, 4096, 4096, kernels.num_sms(w.device))["SPLIT_K"] == 2

    def chain(x, pdl):
        for _ in range(40):
            x = skinny.skinny_linear(x, w, residual=x, pdl=pdl)
        return x

    expect = chain(x, False)
    assert kernels.pdl_launch(x, True) == dict(USE_PDL=True, launch_pdl=True)
    assert kernels.pdl_launch(x, False) == dict(USE_PDL=False)
    assert torch.equal(chain(x, True), expect)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x, True)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect)


@gpu
def test_gpu_pdl_decode_step_equals_plain_launches(make_checkpoint):
    """A bf16 decode step through every decode fusion (few-rows products, the cache write
    in the rotary launch, verify_attention), PDL off and on, eager and graph-replayed: the
    same logits and the same cache."""
    if not _hopper():
        pytest.skip("programmatic dependent launch needs Hopper or later")
    import specoff

    model = specoff.load_model(make_checkpoint("llama"), device=DEVICE, dtype=torch.bfloat16)
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), device=DEVICE, generator=gen)

    def prefilled():
        cache = model.new_cache(3, 16)
        model(ids[:, :11], cache)
        cache.advance(11)
        return cache

    with torch.inference_mode():
        model.use_kernels(KernelOptions(pdl=False))
        cache = prefilled()
        expect = model(ids[:, 11:12], cache).clone()
        expect_k = cache.k.clone()
        model.use_kernels(KernelOptions())  # the defaults: PDL on
        cache = prefilled()
        assert torch.equal(model(ids[:, 11:12], cache), expect) and torch.equal(cache.k, expect_k)
        cache = prefilled()
        step = ids[:, 11:12].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(step, cache)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model(step, cache)
        for _ in range(3):
            logits.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(logits, expect) and torch.equal(cache.k, expect_k)


@gpu
def test_gpu_pdl_launch_waits_for_a_copy_streams_event():
    """How the target's streamed layers read their weights: a copy stream writes them (here
    the tail of a 512 MB host-to-device copy, milliseconds), the compute stream waits on its
    event after a run of programmatic launches, then a programmatic launch reads them. The
    relaxed ordering is between launches of one stream only: the product sees the copied
    weights, never the zeros before them, eagerly and replayed from a CUDA graph."""
    if not _hopper():
        pytest.skip("programmatic dependent launch needs Hopper or later")
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    N = K = 4096
    w = (torch.randn(N, K, device=DEVICE, generator=gen) * K**-0.5).to(torch.bfloat16)
    x = torch.randn(4, K, device=DEVICE, generator=gen).to(torch.bfloat16)
    host = torch.empty(256 * 2**20, dtype=torch.bfloat16, pin_memory=True)  # 512 MB
    host[-N * K:].copy_(w.reshape(-1).cpu())
    buf = torch.empty(host.shape, dtype=torch.bfloat16, device=DEVICE)
    streamed = buf[-N * K:].view(N, K)
    expect = skinny.skinny_linear(x, w)
    copy = torch.cuda.Stream()

    def step():
        buf[-N * K:].zero_()
        copy.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(copy):
            buf.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        h = x
        for _ in range(8):  # programmatic launches right before the wait
            h = skinny.skinny_linear(h, w, residual=h)
        torch.cuda.current_stream().wait_event(done)
        torch.cuda.current_stream().wait_stream(copy)  # the capture joins the copy stream back
        return skinny.skinny_linear(x, streamed), h

    for _ in range(3):
        out, _ = step()
        torch.cuda.synchronize()
        assert torch.equal(out, expect)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = step()
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect)
