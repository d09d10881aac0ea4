"""Verification attention against its SDPA reference: ragged rows, chain and tree masks, splits.

On the CPU the kernels run in Triton's interpreter (fp32/fp16, tiny sizes); the full grid and
bf16, torch.compile and CUDA-graph capture run under the `gpu` marker.
"""
import zlib

import pytest
import torch
from conftest import DEVICE, TOL, dtype_cases, gpu, rel_err

from specoff.kernels.attention import (_verify_attention_into, attention_mask, launch_config, verify_attention,
                                      verify_attention_ref)



def random_tree_mask(batch, nodes, gen):
    """Ancestor masks of random trees in topological order: parent[j] < j, node 0 the root."""
    mask = torch.zeros(batch, nodes, nodes, dtype=torch.bool)
    for b in range(batch):
        for j in range(nodes):
            mask[b, j, j] = True
            if j > 0:
                parent = int(torch.randint(0, j, (1,), generator=gen))
                mask[b, j] |= mask[b, parent]
    return mask.to(DEVICE)


def make_inputs(B, T, H, KV, hd, S, dtype, tree, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, hd, generator=gen).to(DEVICE, dtype)
    # The cache is a view of a bigger [layers, B, KV, S, hd] buffer, as in the model.
    k_all = torch.randn(2, B, KV, S, hd, generator=gen).to(DEVICE, dtype)
    v_all = torch.randn(2, B, KV, S, hd, generator=gen).to(DEVICE, dtype)
    lengths = torch.randint(0, S - T + 1, (B,), generator=gen)
    lengths[0] = 0  # an empty prefix: only the new tokens are visible
    if B > 2:
        lengths[-1] = S - T  # a full cache
    tree_mask = random_tree_mask(B, T, gen) if tree else None
    return q, k_all[1], v_all[1], lengths.to(DEVICE), tree_mask


def check(B, T, H, KV, hd, S, dtype, tree, num_splits=None, kv_len=None, seed=0):
    q, k_cache, v_cache, lengths, tree_mask = make_inputs(B, T, H, KV, hd, S, dtype, tree, seed)
    if kv_len is not None:
        lengths.clamp_(max=kv_len - T)
    ref = verify_attention_ref(q, k_cache, v_cache, lengths, tree_mask, kv_len=kv_len)
    out = torch.full_like(q, float("nan"))  # an unwritten element stays NaN and fails
    verify_attention(q, k_cache, v_cache, lengths, tree_mask, kv_len=kv_len, out=out, num_splits=num_splits)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    return q, k_cache, v_cache, lengths, tree_mask, ref


# (B, T, H, KV, hd, S, tree): a few tiny cases run on the CPU interpreter.
CPU_CASES = [
    (3, 1, 4, 2, 32, 40, False),  # decode, GQA 2
    (3, 5, 8, 2, 64, 70, False),  # chain of 5 drafts
    (2, 7, 4, 4, 48, 50, True),  # tree, no GQA, head_dim not a power of two
    (1, 20, 2, 1, 32, 60, True),  # bigger tree, query rows past one block
    (2, 40, 4, 1, 16, 200, True),  # 160 rows: 128-row blocks, whole prefix tiles then masked ones
    (1, 33, 4, 1, 48, 120, False),  # 132 rows, head_dim 48: masked head dim in the unmasked loop
    (1, 130, 2, 1, 16, 300, True),  # 130 nodes: tiles of later nodes skipped for early rows
    (2, 9, 6, 2, 32, 50, True),  # GQA 3: the tree mask read per row, not per token
]
GPU_CASES = [(3, T, H, KV, hd, 1000, tree) for T in (1, 5, 33) for H, KV in ((32, 8), (32, 4))
             for hd in (128,) for tree in (False, True) if not (tree and T == 1)]
GPU_CASES += [(2, 16, 8, 8, 64, 300, True), (1, 256, 32, 8, 128, 1500, True), (2, 1024, 32, 8, 128, 3000, True),
              (4, 64, 32, 8, 128, 2500, False)]


@pytest.mark.parametrize("B,T,H,KV,hd,S,tree,dtype", list(dtype_cases(CPU_CASES, GPU_CASES)))
def test_verify_attention_matches_ref(B, T, H, KV, hd, S, tree, dtype):
    seed = zlib.crc32(repr((B, T, H, KV, hd, S, tree, dtype)).encode())
    q, k_cache, v_cache, lengths, tree_mask, ref = check(B, T, H, KV, hd, S, dtype, tree, seed=seed)
    op_out = verify_attention(q, k_cache, v_cache, lengths, tree_mask)  # the registered op
    assert rel_err(op_out, ref) < TOL[dtype]


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_long_prefix_split(tree, num_splits):
    """Prefix long enough that the heuristic splits it; forced single and many splits agree."""
    B, T, H, KV, hd, S = 2, 3, 2, 1, 32, 700
    cfg = launch_config(B, KV, T, H // KV, hd, S, torch.device(DEVICE), num_splits)
    assert (cfg["num_splits"] == 1) == (num_splits == 1)
    check(B, T, H, KV, hd, S, torch.float32, tree, num_splits=num_splits, seed=7)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_tree_queries_over_more_cached_nodes(num_splits):
    """T queries over an N-node tree (N > T, the other nodes already cached, in any order):
    a draft expanding some nodes of its tree; ancestors may sit in later slots."""
    B, T, N, H, KV, hd, S = 2, 3, 9, 4, 2, 32, 60
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(B, T, H, hd, generator=gen).to(DEVICE)
    k_cache = torch.randn(B, KV, S, hd, generator=gen).to(DEVICE)
    v_cache = torch.randn(B, KV, S, hd, generator=gen).to(DEVICE)
    lengths = torch.tensor([4, 30], device=DEVICE)
    full = random_tree_mask(B, N, gen)
    order = torch.randperm(N, generator=gen).to(DEVICE)  # slots in a shuffled order
    full = full[:, order][:, :, order]
    tree_mask = full[:, [7, 0, 4]]  # (B, T, N): three of the nodes as queries
    ref = verify_attention_ref(q, k_cache, v_cache, lengths, tree_mask)
    out = torch.full_like(q, float("nan"))
    verify_attention(q, k_cache, v_cache, lengths, tree_mask, out=out, num_splits=num_splits)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("config", [dict(BLOCK_Q=128, BLOCK_N=32, num_splits=3), dict(BLOCK_Q=16, num_splits=1),
                                    dict(BLOCK_Q=64, BLOCK_N=64, num_splits=2)])
def test_launch_config_overrides(config):
    """Every tile shape the tuner may pick computes the same function (tools/tune_kernels.py --attention)."""
    B, T, H, KV, hd, S = 2, 24, 4, 2, 32, 150
    q, k_cache, v_cache, lengths, tree_mask = make_inputs(B, T, H, KV, hd, S, torch.float32, True, 11)
    ref = verify_attention_ref(q, k_cache, v_cache, lengths, tree_mask)
    out = torch.full_like(q, float("nan"))
    _verify_attention_into(q, k_cache, v_cache, lengths, tree_mask, hd**-0.5, S, out, config=config)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_tree_of_more_cached_nodes_in_any_order():
    """T = 6 queries over N = 10 new keys (4 cached earlier), ancestors in no particular order."""
    B, T, N, H, KV, hd, S = 2, 6, 10, 4, 2, 32, 64
    gen = torch.Generator().manual_seed(5)
    q, k_cache, v_cache, lengths, _ = make_inputs(B, T, H, KV, hd, S, torch.float32, False, 12)
    lengths.clamp_(max=S - N)
    tree_mask = torch.rand(B, T, N, generator=gen).to(DEVICE) < 0.4
    tree_mask[:, :, 0] = False  # a key no query sees
    tree_mask[:, torch.arange(T), torch.arange(T) + N - T] = True  # each query sees itself
    ref = verify_attention_ref(q, k_cache, v_cache, lengths, tree_mask)
    out = torch.full_like(q, float("nan"))
    verify_attention(q, k_cache, v_cache, lengths, tree_mask, out=out)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("B,KV,T,G,keys,splits", [(1, 8, 256, 4, 4352, 2), (1, 4, 256, 8, 4352, 2),
                                                   (8, 8, 64, 4, 2112, 1), (1, 8, 1024, 4, 5120, 1)])
def test_launch_config_fills_whole_waves(monkeypatch, B, KV, T, G, keys, splits):
    """Tree-sized blocks (compute-bound) on a 132-SM GPU, two programs an SM: splits make
    about one whole wave (the splits tools/tune_kernels.py --attention found fastest)."""
    from specoff.kernels import attention

    monkeypatch.setattr(attention, "_num_sms", lambda device: 132)
    cfg = launch_config(B, KV, T, G, 128, keys, torch.device("cpu"))
    assert cfg["BLOCK_Q"] == 64 and cfg["num_warps"] == 4 and cfg["num_stages"] == 3
    assert cfg["num_splits"] == splits
    assert cfg["keys_per_split"] % cfg["BLOCK_N"] == 0 and cfg["keys_per_split"] * splits >= keys


def test_launch_config_stages_fit_shared_memory(monkeypatch):
    """Three K/V stages where the device's shared memory holds them, else two (GPUs with ~100 KB)."""
    from specoff.kernels import attention, moe

    monkeypatch.setattr(attention, "_num_sms", lambda device: 132)
    monkeypatch.setattr(moe, "max_shared_memory", lambda device: 227 * 1024)
    assert launch_config(1, 8, 256, 4, 128, 4352, torch.device("cpu"))["num_stages"] == 3
    assert launch_config(64, 8, 5, 4, 128, 4352, torch.device("cpu"))["num_stages"] == 3  # 32-row blocks
    assert launch_config(64, 4, 5, 8, 128, 4352, torch.device("cpu"))["num_stages"] == 2  # 64-row blocks
    monkeypatch.setattr(moe, "max_shared_memory", lambda device: 99 * 1024)
    assert launch_config(1, 8, 256, 4, 128, 4352, torch.device("cpu"))["num_stages"] == 2


def test_kv_len_bound_smaller_than_cache():
    check(3, 4, 4, 2, 32, 90, torch.float16, False, kv_len=40, seed=9)


@pytest.mark.parametrize("num_splits", [None, 2])
def test_strided_lengths(num_splits):
    """Lengths given as a column of a wider tensor (a strided view) are each row's own."""
    q, k_cache, v_cache, lengths, _ = make_inputs(3, 3, 4, 2, 32, 40, torch.float32, False, seed=4)
    lengths = torch.tensor([0, 30, 11], device=DEVICE)
    wide = torch.stack([torch.full_like(lengths, 7), lengths], dim=1)
    assert not wide[:, 1].is_contiguous()
    ref = verify_attention_ref(q, k_cache, v_cache, lengths)
    out = torch.full_like(q, float("nan"))
    verify_attention(q, k_cache, v_cache, wide[:, 1], out=out, num_splits=num_splits)
    assert rel_err(out, ref) < TOL[torch.float32]
    if num_splits is None:  # the registered op, too
        assert rel_err(verify_attention(q, k_cache, v_cache, wide[:, 1]), ref) < TOL[torch.float32]


def test_mask_chain_equals_full_tree_of_a_chain():
    """A chain is the tree whose node t has every earlier node as ancestor."""
    lengths = torch.tensor([0, 3])
    chain = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    assert torch.equal(attention_mask(lengths, 4, 9), attention_mask(lengths, 4, 9, chain))
    assert attention_mask(lengths, 4, 9)[1].sum(-1).tolist() == [4, 5, 6, 7]


def test_compile_fullgraph_traces_the_op():
    """Dynamo traces a function calling the op without a graph break (opaque op on the CPU)."""
    q, k_cache, v_cache, lengths, tree_mask = make_inputs(2, 3, 4, 2, 32, 20, torch.float32, True, 3)

    def step(q, lengths, tree_mask):
        return verify_attention(q, k_cache, v_cache, lengths, tree_mask) + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(q, lengths, tree_mask), step(q, lengths, tree_mask)) < 1e-6


@gpu
@pytest.mark.parametrize("tree", [False, True])
def test_compile_inductor_matches_eager(tree):
    torch._dynamo.reset()
    q, k_cache, v_cache, lengths, tree_mask = make_inputs(3, 5, 32, 8, 128, 600, torch.bfloat16, tree, 4)

    def step(q, lengths, tree_mask):
        return verify_attention(q * 1.5, k_cache, v_cache, lengths, tree_mask, kv_len=600) + 1

    compiled = torch.compile(step, fullgraph=True)
    assert rel_err(compiled(q, lengths, tree_mask), step(q, lengths, tree_mask)) < TOL[torch.bfloat16]


@gpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_cuda_graph_replay(num_splits):
    dtype = torch.bfloat16
    B, T, H, KV, hd, S = 4, 5, 32, 8, 128, 2048
    q, k_cache, v_cache, lengths, tree_mask = make_inputs(B, T, H, KV, hd, S, dtype, True, 5)
    static_out = torch.empty_like(q)

    def step():
        verify_attention(q, k_cache, v_cache, lengths, tree_mask, out=static_out, num_splits=num_splits)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up: compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2):
        new = make_inputs(B, T, H, KV, hd, S, dtype, True, 100 + seed)
        for static, fresh in zip((q, k_cache, v_cache, lengths, tree_mask), new):
            static.copy_(fresh)
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = verify_attention_ref(q, k_cache, v_cache, lengths, tree_mask)
        assert rel_err(static_out, ref) < TOL[dtype]


def packed_segments(lengths, gen):
    """seg_start [1, T] for prompts of `lengths` packed in one row: each token's prompt start."""
    starts = torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)
    return torch.cat([torch.full((n,), int(s)) for s, n in zip(starts, lengths)])[None]


@pytest.mark.parametrize("prefix,num_splits", [(0, None), (0, 3), (7, None)])
@pytest.mark.parametrize("G", [1, 4])
def test_segmented_chain_attends_within_each_prompt(prefix, num_splits, G):
    """Prompts packed one after another in one row (a prefill without padding): each query
    sees its own prompt's keys up to itself, never another prompt's, whatever the splits. A
    nonzero prefix: a later chunk of the packed row, earlier chunks' keys already cached."""
    gen = torch.Generator().manual_seed(5)
    lengths = [9, 1, 40, 3, 17]
    seg = packed_segments(lengths, gen)  # (1, 70)
    T = seg.shape[1] - prefix
    KV, hd = 2, 32
    H = KV * G
    S = seg.shape[1] + 5
    q = torch.randn(1, T, H, hd, generator=gen).to(DEVICE)
    k = torch.randn(1, KV, S, hd, generator=gen).to(DEVICE)
    v = torch.randn(1, KV, S, hd, generator=gen).to(DEVICE)
    lengths_t = torch.tensor([prefix], device=DEVICE)
    seg_q = seg[:, prefix:].to(DEVICE)
    ref = verify_attention_ref(q, k, v, lengths_t, kv_len=prefix + T, seg_start=seg_q)
    out = torch.full_like(q, float("nan"))
    verify_attention(q, k, v, lengths_t, kv_len=prefix + T, out=out, num_splits=num_splits, seg_start=seg_q)
    assert rel_err(out, ref) < TOL[torch.float32]
    # each prompt alone gives the same rows
    a = int(sum(lengths[:2]))  # the third prompt: 40 tokens from 10
    if a >= prefix:
        alone = verify_attention_ref(q[:, a - prefix:a - prefix + 40], k[:, :, a:a + 40], v[:, :, a:a + 40],
                                     torch.zeros(1, dtype=torch.long, device=DEVICE), kv_len=40)
        assert rel_err(out[:, a - prefix:a - prefix + 40], alone) < TOL[torch.float32]
    with pytest.raises(ValueError, match="tree_mask"):
        verify_attention(q, k, v, lengths_t, torch.ones(1, T, T, dtype=torch.bool, device=DEVICE),
                         seg_start=seg_q)


def test_compiled_kernels_counts_new_specializations():
    """specoff.kernels.compiled_kernels: None under the interpreter (nothing compiles); on a
    GPU a first launch of a new specialization adds to it and a second launch adds nothing
    (what tools/bench.py and tools/profile_pass.py count during timed runs)."""
    from specoff.kernels import compiled_kernels

    if DEVICE != "cuda":
        import os

        assert os.environ.get("TRITON_INTERPRET") != "1" or compiled_kernels() is None
        return
    q, k, v, lengths, _ = make_inputs(2, 37, 8, 2, 64, 301, torch.float16, False, seed=3)
    before = compiled_kernels()
    verify_attention(q, k, v, lengths, out=torch.empty_like(q), num_splits=3)
    once = compiled_kernels()
    verify_attention(q, k, v, lengths, out=torch.empty_like(q), num_splits=3)
    assert once >= before and once > 0 and compiled_kernels() == once


@pytest.mark.parametrize("tree, num_splits", [(False, None), (True, None), (True, 2), (False, 3)])
def test_rows_of_a_shared_pool(tree, num_splits):
    """row_start: each row's keys in its own segment of one pool (kvcache.SegmentKVCache),
    viewed with stride 0 over the rows; the same output as the rows' own dense caches."""
    B, T, H, KV, hd, S = 4, 6, 4, 2, 32, 70
    q, k_cache, v_cache, lengths, tree_mask = make_inputs(B, T, H, KV, hd, S, torch.float32, tree, seed=11)
    sizes = (lengths + T + torch.tensor([0, 3, 9, 1], device=DEVICE)).clamp(max=S).tolist()  # each row's
    order, starts, at = [2, 0, 3, 1], [0] * B, 5  # segments out of row order, with gaps
    for b in order:
        starts[b], at = at, at + sizes[b] + 2
    pool_k = torch.full((KV, at + 4, hd), float("nan"), device=DEVICE)  # never read outside a segment
    pool_v = pool_k.clone()
    for b in range(B):
        pool_k[:, starts[b]:starts[b] + sizes[b]] = k_cache[b, :, :sizes[b]]
        pool_v[:, starts[b]:starts[b] + sizes[b]] = v_cache[b, :, :sizes[b]]
    kv_len = max(sizes)
    ref = verify_attention_ref(q, k_cache, v_cache, lengths, tree_mask, kv_len=kv_len)
    row_start = torch.tensor(starts, device=DEVICE)
    pooled = [p[None].expand(B, *p.shape) for p in (pool_k, pool_v)]
    out = torch.full_like(q, float("nan"))
    verify_attention(q, *pooled, lengths, tree_mask, kv_len=kv_len, out=out, num_splits=num_splits,
                     row_start=row_start)
    assert rel_err(out, ref) < TOL[torch.float32]
    if num_splits is None:  # the registered op, and the reference's own gather
        assert rel_err(verify_attention(q, *pooled, lengths, tree_mask, kv_len=kv_len,
                                        row_start=row_start), ref) < TOL[torch.float32]
        pool_ref = verify_attention_ref(q, *[p.nan_to_num() for p in pooled], lengths, tree_mask,
                                        kv_len=kv_len, row_start=row_start)
        assert rel_err(pool_ref, ref) < TOL[torch.float32]


@pytest.mark.parametrize("q_registers,hd", [(False, 32), (True, 32), (True, 48)])
@pytest.mark.parametrize("T,positions0,dtype", [(1, (5, 30), torch.float32), (5, (0, 17), torch.float16),
                                                  (5, (349, 600), torch.float32), pytest.param(
                                                      5, (349, 600), torch.bfloat16, marks=gpu)])
def test_rope_verify_attention_is_rope_write_then_attention(T, positions0, dtype, q_registers, hd, monkeypatch):
    """One launch (rope_verify_attention: the rotations, the cache write and the chain's
    attention) against fused.rope_write then verify_attention: the same output bits and the
    same cache. (349, 600) on a 700-slot cache: two prefix splits, row 0's new keys on both
    sides of the split boundary (352), so two programs each write their own. With the query
    rows rotated in registers or not (`q_in_registers`; a half head of 24 is not a power of
    two, so head_dim 48 keeps the scratch)."""
    from specoff.kernels.attention import rope_verify_attention
    from specoff.kernels.fused import rope_write

    monkeypatch.setattr("specoff.kernels.attention._num_sms", lambda device: 4)
    B, H, KV, S = 2, 4, 2, 700
    gen = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(repr((T, positions0, dtype)).encode()))
    qkv = torch.randn(B, T, (H + 2 * KV) * hd, device=DEVICE, generator=gen).to(dtype)
    positions = torch.tensor(positions0, device=DEVICE)[:, None] + torch.arange(T, device=DEVICE)
    angles = positions.float()[..., None, None] * torch.linspace(0.01, 1.0, hd, device=DEVICE)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # (B, T, 1, hd)
    caches = [torch.randn(2, B, KV, S, hd, device=DEVICE, generator=gen).to(dtype)]
    caches.append(caches[0].clone())
    kv_len = int(positions.max()) + 1
    cfg = launch_config(B, KV, T, H // KV, hd, kv_len, torch.device(DEVICE), None, qkv.element_size())
    assert cfg["num_splits"] == (2 if positions0[0] == 349 else 1)
    q_raw = qkv[..., :H * hd].view(B, T, H, hd)
    k_raw = qkv[..., H * hd:(H + KV) * hd].view(B, T, KV, hd)
    v_raw = qkv[..., (H + KV) * hd:].view(B, T, KV, hd)
    q = rope_write(q_raw, k_raw, v_raw, cos, sin, caches[0][0], caches[0][1], positions)
    want = verify_attention(q, caches[0][0], caches[0][1], positions[:, 0].contiguous(), kv_len=kv_len)
    got = rope_verify_attention(qkv, H, KV, cos, sin, positions, caches[1][0], caches[1][1], kv_len=kv_len,
                                q_in_registers=q_registers)
    assert torch.equal(caches[1], caches[0])
    assert torch.equal(got, want)


def test_rope_queries_in_registers_from_min_rows():
    """rope_verify_attention rotates the queries in registers by default from
    Q_REGISTERS_MIN_ROWS query rows a launch, never where half the head is not a power of
    two; `q_in_registers` True / False: always / never (where it can)."""
    from specoff.kernels import attention

    rows = attention.Q_REGISTERS_MIN_ROWS
    assert attention._q_in_registers(rows, 128) and not attention._q_in_registers(rows - 1, 128)
    assert not attention._q_in_registers(rows, 48)
    assert attention._q_in_registers(1, 128, True) and not attention._q_in_registers(1, 48, True)
    assert not attention._q_in_registers(4 * rows, 128, False)
