"""Fused MoE kernel against its plain-torch reference: odd sizes, every dtype, routing, grouping.

On the CPU the kernels run in Triton's interpreter (fp32/fp16, tiny sizes); the full grid and
bf16, torch.compile and CUDA-graph capture run under the `gpu` marker.
"""
import json
import zlib

import pytest
import torch
from conftest import DEVICE, TOL, dtype_cases, gpu, rel_err

from specoff.kernels import moe
from specoff.kernels.moe import fused_moe, fused_moe_ref, moe_align, moe_route



def make_inputs(tokens, hidden, inter, experts, top_k, dtype, seed, renormalize=True):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(tokens, hidden, device=DEVICE, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=DEVICE, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=DEVICE, generator=gen) / inter**0.5).to(dtype)
    logits = torch.randn(tokens, experts, device=DEVICE, generator=gen)
    topk_weights, topk_ids = moe_route(logits, top_k, renormalize)
    return x, w13, w2, topk_weights, topk_ids


# (tokens, hidden, intermediate, experts, top_k): a few tiny cases run on the CPU interpreter.
CPU_CASES = [(1, 128, 48, 8, 2), (33, 97, 40, 8, 2), (5, 64, 32, 128, 8),
             (600, 64, 32, 2, 1)]  # 300 rows an expert: the 128-row default tiles
GPU_CASES = [(n, d, i, e, k) for n in (1, 33, 222) for d, i in ((128, 256), (97, 72)) for e, k in ((8, 2), (128, 8))]
GPU_CASES += [(300, 128, 256, 8, 2), (1100, 256, 128, 8, 2)]  # 75 and 275 rows an expert: 64- and 128-row tiles


@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k,dtype", list(dtype_cases(CPU_CASES, GPU_CASES)))
def test_fused_moe_matches_ref(tokens, hidden, inter, experts, top_k, dtype):
    seed = zlib.crc32(repr((tokens, hidden, inter, experts, top_k, dtype)).encode())
    x, w13, w2, topk_weights, topk_ids = make_inputs(tokens, hidden, inter, experts, top_k, dtype, seed)
    ref = fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
    out = torch.full_like(x, float("nan"))  # an unwritten element stays NaN and fails
    fused_moe(x, w13, w2, topk_weights, topk_ids, out=out)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    op_out = fused_moe(x, w13, w2, topk_weights, topk_ids)  # the registered op
    assert rel_err(op_out, ref) < TOL[dtype]


def test_fused_moe_on_views_of_a_flat_buffer():
    """Weights as views at an offset into one packed buffer, int32 ids, no renormalisation."""
    tokens, hidden, inter, experts, top_k = 9, 64, 32, 8, 2
    x, w13, w2, topk_weights, topk_ids = make_inputs(tokens, hidden, inter, experts, top_k, torch.float32, 3,
                                                     renormalize=False)
    flat = torch.randn(7 + w13.numel() + w2.numel(), device=DEVICE)
    w13_view = flat[7:7 + w13.numel()].view_as(w13).copy_(w13)
    w2_view = flat[7 + w13.numel():].view_as(w2).copy_(w2)
    out = torch.full_like(x, float("nan"))
    fused_moe(x, w13_view, w2_view, topk_weights, topk_ids.int(), out=out)
    assert rel_err(out, fused_moe_ref(x, w13, w2, topk_weights, topk_ids)) < TOL[torch.float32]



# SHRINK: blocks whose second half is padding multiply their first half only. 32-row blocks
# on the CPU (16-row halves): ~8, ~25 and ~37 pairs an expert (every block shrunk, none, the
# last of two); Mixtral-like 128-row tiles on the GPU.
SHRINK_CPU_CASES = [(33, 64, 32, 8, 2), (100, 64, 48, 8, 2), (150, 96, 32, 8, 2)]
SHRINK_GPU_CASES = [(256, 512, 256, 8, 2), (300, 128, 256, 8, 2), (1100, 256, 128, 8, 2), (1280, 4096, 1024, 8, 2)]


@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k,dtype", list(dtype_cases(SHRINK_CPU_CASES, SHRINK_GPU_CASES)))
@pytest.mark.parametrize("which", ["both", "gate-up", "down"])
def test_shrunk_blocks_compute_the_moe(tokens, hidden, inter, experts, top_k, dtype, which):
    seed = zlib.crc32(repr(("shrink", tokens, hidden, inter, experts, top_k, dtype)).encode())
    x, w13, w2, topk_weights, topk_ids = make_inputs(tokens, hidden, inter, experts, top_k, dtype, seed)
    tiles = (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2) if DEVICE == "cpu" else
             dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3))
    configs = [dict(tiles, SHRINK=int(which in ("both", part))) for part in ("gate-up", "down")]
    out = torch.full_like(x, float("nan"))
    moe._fused_moe_into(x, w13, w2, topk_weights, topk_ids, out, *configs, descriptors=False)
    assert rel_err(out, fused_moe_ref(x, w13, w2, topk_weights, topk_ids)) < TOL[dtype]


# Descriptor (TMA) launches: sizes whose rows are 16-byte multiples; tiles chosen so the K
# loop has a tail (hidden 80 by 32), the gate tile runs into the up half (inter 40 by 32)
# and a group needs several row blocks.
TMA_CPU_CASES = [(1, 128, 48, 8, 2), (33, 80, 40, 8, 2), (600, 64, 32, 2, 1)]
TMA_GPU_CASES = [(222, 128, 256, 8, 2), (300, 128, 256, 8, 2), (1100, 256, 128, 8, 2), (1280, 4096, 1024, 8, 2)]
TMA_TILES = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)


def _must_not_launch(*args, **kwargs):
    raise AssertionError("a launch ran that this path should not make")


def with_descriptors(x, w13, w2, top_k, gate_up=None, down=None):
    """(gate-up, down) configs asking for the descriptor launches ("TMA": 1, as the tuner
    writes where they time faster): `gate_up` and `down`, or the defaults for x's tokens."""
    E, I, D = w13.shape[0], w2.shape[2], x.shape[1]
    name, shared = moe.device_name(x.device), moe.max_shared_memory(x.device)
    gate_up = gate_up or moe.get_config(E, 2 * I, D, x.dtype, name, x.shape[0], top_k, shared)
    down = down or moe.get_config(E, D, I, x.dtype, name, x.shape[0], top_k, shared)
    return dict(gate_up, TMA=1), dict(down)


@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k,dtype", list(dtype_cases(TMA_CPU_CASES, TMA_GPU_CASES)))
@pytest.mark.parametrize("tiles", ["default", "small", "small-one-dot"])
def test_fused_moe_by_descriptors_matches_ref(tokens, hidden, inter, experts, top_k, dtype, tiles, monkeypatch):
    """Configs saying "TMA": x gathered into grouped order, both grouped GEMMs loading whole
    tiles through tensor descriptors (Triton's interpreter on the CPU), the intermediate kept
    grouped; "one-dot": the gate-up launch loads a tile's gate and up rows as one box of w13
    seen as [E, 2, I, K] and multiplies once."""
    monkeypatch.setattr(moe, "_launch_gemm", _must_not_launch)
    seed = zlib.crc32(repr(("tma", tokens, hidden, inter, experts, top_k, dtype)).encode())
    x, w13, w2, topk_weights, topk_ids = make_inputs(tokens, hidden, inter, experts, top_k, dtype, seed)
    assert moe.tma_usable(x, w13, w2)
    configs = {"default": with_descriptors(x, w13, w2, top_k),
               "small": with_descriptors(x, w13, w2, top_k, TMA_TILES, TMA_TILES),
               "small-one-dot": with_descriptors(x, w13, w2, top_k, dict(TMA_TILES, ONE_DOT=1), TMA_TILES)}[tiles]
    out = torch.full_like(x, float("nan"))
    moe._fused_moe_into(x, w13, w2, topk_weights, topk_ids, out, *configs)
    assert rel_err(out, fused_moe_ref(x, w13, w2, topk_weights, topk_ids)) < TOL[dtype]


def test_descriptor_launches_follow_the_tuned_config_and_fall_back_where_they_cannot_run(monkeypatch):
    """Descriptors where a config says TMA: 1, and never with descriptors=False (the op too);
    rows that are no 16-byte multiple (97 fp16 values) or weights whose experts stack into no
    2-D tensor keep the pointer kernels, still exact."""
    x, w13, w2, topk_weights, topk_ids = make_inputs(9, 64, 32, 8, 2, torch.float32, 5)
    ref = fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
    ran = []
    real = moe._launch_gemm_tma
    monkeypatch.setattr(moe, "_launch_gemm_tma", lambda *a, **k: (ran.append(1), real(*a, **k)))
    out = torch.full_like(x, float("nan"))
    moe._fused_moe_into(x, w13, w2, topk_weights, topk_ids, out, TMA_TILES, TMA_TILES)  # no TMA key
    assert not ran and rel_err(out, ref) < TOL[torch.float32]
    tuned = dict(TMA_TILES, TMA=1)
    moe._fused_moe_into(x, w13, w2, topk_weights, topk_ids, out.fill_(float("nan")), tuned, TMA_TILES)
    assert len(ran) == 2 and rel_err(out, ref) < TOL[torch.float32]
    ran.clear()
    moe._fused_moe_into(x, w13, w2, topk_weights, topk_ids, out.fill_(float("nan")), tuned, TMA_TILES,
                        descriptors=False)
    assert not ran and rel_err(out, ref) < TOL[torch.float32]
    fused_moe(x, w13, w2, topk_weights, topk_ids, out=out.fill_(float("nan")), configs=(tuned, TMA_TILES))
    assert len(ran) == 2 and rel_err(out, ref) < TOL[torch.float32]
    ran.clear()
    assert rel_err(fused_moe(x, w13, w2, topk_weights, topk_ids, configs=(tuned, TMA_TILES), descriptors=False),
                   ref) < TOL[torch.float32] and not ran

    x, w13, w2, topk_weights, topk_ids = make_inputs(9, 97, 32, 8, 2, torch.float16, 6)
    assert not moe.tma_usable(x, w13, w2)
    out = torch.full_like(x, float("nan"))
    fused_moe(x, w13, w2, topk_weights, topk_ids, out=out, configs=with_descriptors(x, w13, w2, 2))
    assert not ran and rel_err(out, fused_moe_ref(x, w13, w2, topk_weights, topk_ids)) < TOL[torch.float16]
    assert not moe.tma_usable(x[:, :64], w13[:, :, :64], w2)  # strided weights: no one 2-D view


@pytest.mark.parametrize("tokens,experts,top_k,pieces", [(1, 8, 2, 2), (33, 8, 2, 4), (20, 16, 4, 8)])
@pytest.mark.parametrize("tma", [False, True])
def test_fused_moe_in_pieces_sums_to_the_whole(tokens, experts, top_k, pieces, tma, monkeypatch):
    """A layer streamed in pieces (offload ring_pieces): each call computes the pairs routed
    to its share of the experts, from that share's weights alone; the pieces sum to the
    whole, and a pair of no expert in the share contributes nothing (pointer kernels, or
    descriptor launches over the share's weights)."""
    ran = []
    real = moe._launch_gemm_tma
    monkeypatch.setattr(moe, "_launch_gemm_tma", lambda *a, **k: (ran.append(1), real(*a, **k)))
    hidden, inter, dtype = 64, 32, torch.float32
    x, w13, w2, topk_weights, topk_ids = make_inputs(tokens, hidden, inter, experts, top_k, dtype, tokens)
    per = experts // pieces
    total = torch.zeros_like(x)
    for s in range(pieces):
        lo = s * per
        out = torch.full_like(x, float("nan"))
        w13_piece, w2_piece = w13[lo:lo + per].clone(), w2[lo:lo + per].clone()
        configs = with_descriptors(x, w13_piece, w2_piece, top_k) if tma else None
        fused_moe(x, w13_piece, w2_piece, topk_weights, topk_ids, out=out, experts_from=lo, configs=configs)
        own = torch.where((topk_ids >= lo) & (topk_ids < lo + per), topk_weights, 0.0)
        assert rel_err(out, fused_moe_ref(x, w13, w2, own, topk_ids)) < TOL[dtype]
        total += out
    assert rel_err(total, fused_moe_ref(x, w13, w2, topk_weights, topk_ids)) < TOL[dtype]
    assert bool(ran) == tma


@pytest.mark.parametrize("block_m", [16, 64])
def test_moe_align_skips_pairs_of_no_expert(block_m):
    """Ids -1 (routed to experts another piece computes) get no row, in both aligns."""
    gen = torch.Generator().manual_seed(block_m)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(23)])
    local = torch.where(ids < 4, ids, -1).to(DEVICE)
    sorted_pairs, block_expert = moe_align(local, 4, block_m)
    sorted_ref, block_ref = moe.moe_align_torch(local, 4, block_m)
    assert torch.equal(sorted_pairs, sorted_ref) and torch.equal(block_expert, block_ref)
    valid = sorted_pairs < local.numel()
    expected = torch.nonzero(local.reshape(-1) >= 0).flatten().to(torch.int32)
    assert torch.equal(sorted_pairs[valid].sort().values, expected.to(sorted_pairs.device))


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_route(renormalize):
    logits = torch.randn(17, 8, generator=torch.Generator().manual_seed(1))
    topk_weights, topk_ids = moe_route(logits.half(), 2, renormalize)
    probs = torch.softmax(logits.half().float(), dim=-1)
    expected = probs.gather(1, topk_ids)
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
    assert topk_weights.dtype == torch.float32
    torch.testing.assert_close(topk_weights, expected)
    assert torch.equal(topk_ids[:, 0], probs.argmax(-1))
    assert (topk_weights[:, 0] >= topk_weights[:, 1]).all()


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 8, 2, 16), (37, 8, 2, 16), (20, 128, 8, 64)])
def test_moe_align_groups_every_pair_once(tokens, experts, top_k, block_m):
    topk_ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    sorted_pairs, block_expert = moe_align(topk_ids, experts, block_m)
    pairs = tokens * top_k
    valid = sorted_pairs < pairs
    assert torch.equal(sorted_pairs[valid].sort().values, torch.arange(pairs, dtype=torch.int32))
    rows_expert = block_expert.repeat_interleave(block_m)
    assert torch.equal(rows_expert[valid].long(), topk_ids.reshape(-1)[sorted_pairs[valid].long()])
    used = block_expert[block_expert >= 0]
    assert (used[:-1] <= used[1:]).all() and (block_expert[len(used):] == -1).all()


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 8, 2, 16), (37, 8, 2, 16), (300, 8, 2, 64),
                                                          (20, 128, 8, 64), (9, 128, 8, 16)])
def test_moe_align_kernel_equals_torch(tokens, experts, top_k, block_m):
    """The one-program Triton align and the torch-ops align give the same arrays, element for element."""
    gen = torch.Generator().manual_seed(tokens)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(DEVICE)
    for ids in (topk_ids, topk_ids.int()):
        sorted_pairs, block_expert = moe_align(ids, experts, block_m)
        sorted_ref, block_ref = moe.moe_align_torch(ids, experts, block_m)
        assert torch.equal(sorted_pairs, sorted_ref) and torch.equal(block_expert, block_ref)


def test_get_config_nearest_token_count(tmp_path):
    name = moe.config_file_name(8, 256, 128, torch.float16, "Test GPU")
    tuned = {"1": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3),
             "64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4)}
    (tmp_path / name).write_text(json.dumps(tuned))
    folder = str(tmp_path)
    assert moe.get_config(8, 256, 128, torch.float16, "Test_GPU", 5, config_dir=folder)["BLOCK_M"] == 16
    assert moe.get_config(8, 256, 128, torch.float16, "Test_GPU", 50, config_dir=folder)["BLOCK_M"] == 64
    assert (moe.get_config(8, 256, 128, torch.bfloat16, "Test_GPU", 50, config_dir=folder)
            == moe._default_config(8, 256, 128, 50))
    assert moe.get_config(8, 256, 128, torch.float16, "Test_GPU", 50) == moe._default_config(8, 256, 128, 50,
                                                                                             dtype=torch.float16)


def test_compile_fullgraph_traces_the_op():
    """Dynamo traces a function calling the op without a graph break (opaque op on the CPU)."""
    x, w13, w2, _, _ = make_inputs(6, 32, 24, 4, 2, torch.float32, 5)
    logits = torch.randn(6, 4, device=DEVICE)

    def moe_block(x, logits):
        topk_weights, topk_ids = moe_route(logits, 2, True)
        return fused_moe(x, w13, w2, topk_weights, topk_ids)

    compiled = torch.compile(moe_block, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x, logits), moe_block(x, logits)) < 1e-6


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compile_inductor_matches_eager(dtype):
    torch._dynamo.reset()
    x, w13, w2, _, _ = make_inputs(33, 256, 128, 8, 2, dtype, 11)
    logits = torch.randn(33, 8, device=DEVICE)

    def moe_block(x, logits):
        topk_weights, topk_ids = moe_route(logits, 2, True)
        return fused_moe(x, w13, w2, topk_weights, topk_ids) * 2

    compiled = torch.compile(moe_block, fullgraph=True)
    assert rel_err(compiled(x, logits), moe_block(x, logits)) < TOL[dtype]


@gpu
@pytest.mark.parametrize("tokens, tma", [(17, False), (moe.FUSED_ALIGN_MAX_PAIRS // 2 + 5, False), (17, True)])
def test_cuda_graph_replay(tokens, tma):
    # past FUSED_ALIGN_MAX_PAIRS pairs: the pairs sort in plain torch (moe_align_torch);
    # tma: descriptor launches, their descriptors (and the grouped copy of x) in the graph
    dtype = torch.bfloat16
    hidden, inter, experts, top_k = 256, 128, 8, 2
    x, w13, w2, _, _ = make_inputs(tokens, hidden, inter, experts, top_k, dtype, 21)
    configs = with_descriptors(x, w13, w2, top_k) if tma else None
    static_x = x.clone()
    static_logits = torch.randn(tokens, experts, device=DEVICE)
    static_out = torch.empty_like(x)

    def step():
        topk_weights, topk_ids = moe_route(static_logits, top_k, True)
        fused_moe(static_x, w13, w2, topk_weights, topk_ids, out=static_out, configs=configs)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up: compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2):
        new_x, _, _, _, _ = make_inputs(tokens, hidden, inter, experts, top_k, dtype, 100 + seed)
        static_x.copy_(new_x)
        static_logits.copy_(torch.randn(tokens, experts, device=DEVICE))
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        topk_weights, topk_ids = moe_route(static_logits, top_k, True)
        assert rel_err(static_out, fused_moe_ref(static_x, w13, w2, topk_weights, topk_ids)) < TOL[dtype]


def _bench_kernels():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "bench_kernels", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "bench_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_torch_composition_computes_the_moe():
    """The plain-torch MoE baseline tools/bench_kernels.py times the kernel against (a
    baseline that computes something else would make its ratios meaningless); an expert no
    token picks included."""
    bench = _bench_kernels()
    x, w13, w2, topk_weights, topk_ids = make_inputs(21, 64, 48, 8, 2, torch.float32, 9)
    topk_ids = torch.where(topk_ids == 5, 6, topk_ids)  # expert 5: no rows
    out = bench.moe_torch_grouped(x, w13, w2, topk_weights, topk_ids)
    assert rel_err(out, fused_moe_ref(x, w13, w2, topk_weights, topk_ids)) < TOL[torch.float32]
