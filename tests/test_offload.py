"""Offloaded execution: the packed store, the ring, and tokens equal to the resident run."""
import pytest
import torch

import specoff
from specoff.offload import ALIGN_BYTES, LayerLayout, build_offloaded
from specoff.models.decoder import Transformer
from specoff.weights import checkpoint_source

PROMPTS = ["def fibonacci(n):", "Beautiful is better than", "x", "import os\nimport sys\n"]
GREEDY = specoff.SamplingParams(max_new_tokens=12, ignore_eos=True)


def test_layout_packs_the_feed_forward_first_and_aligned(make_checkpoint):
    cfg = specoff.ModelConfig.from_hf(make_checkpoint("mixtral"))
    with torch.device("meta"):
        block = Transformer(cfg).layers[0]
    for stream_attention in (False, True):
        layout = LayerLayout.of(block, torch.float32, stream_attention)
        offsets = sorted(off for off, _ in layout.entries.values())
        assert all(off * 4 % ALIGN_BYTES == 0 for off in offsets)
        assert offsets[0] == 0 and layout.numel >= sum(torch.Size(s).numel() for _, s in layout.entries.values())
        streamed = {n for n in layout.entries if layout.streams(n)}
        if stream_attention:
            assert streamed == set(layout.entries) and layout.stream_numel == layout.numel
        else:
            assert streamed == {"feed_forward.w13", "feed_forward.w2"}
    # views are disjoint: writing one tensor leaves the others untouched
    flat = torch.zeros(layout.numel)
    views = layout.views(flat)
    views["feed_forward.w2"].fill_(1)
    assert flat.sum() == views["feed_forward.w2"].numel()


@pytest.mark.parametrize("family", ["mixtral", "llama", "qwen3_moe"])
@pytest.mark.parametrize("slots, resident_attention, resident_layers",
                         [(1, True, 0), (2, False, 0), (3, True, 1), (2, True, 3)])
def test_offloaded_logits_equal_resident(family, slots, resident_attention, resident_layers,
                                         make_checkpoint):
    path = make_checkpoint(family, layers=4)
    cfg = specoff.ModelConfig.from_hf(path)
    resident = specoff.load_model(path, "cpu")
    model, report = build_offloaded(cfg, checkpoint_source(path, cfg), "cpu", torch.float32,
                                    ring_slots=slots,
                                    resident_attention=resident_attention,
                                    resident_layers=resident_layers)
    assert report.store_bytes == model.store.nbytes and not report.pinned
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.inference_mode():
        for _ in range(3):  # several passes: the ring wraps around between them
            torch.testing.assert_close(model(ids), resident(ids), rtol=0, atol=0)
    streamed = cfg.n_layers - resident_layers
    assert model.ring.n_slots == min(slots, streamed)
    if streamed > slots:
        per_layer = model.store.layout.stream_numel * 4
        # the first `slots` layers at start-up, then one refill per layer per pass
        assert model.ring.bytes_copied == per_layer * (model.ring.n_slots + 3 * streamed)


@pytest.mark.parametrize("family, pieces", [("mixtral", 2), ("mixtral", 4), ("qwen3_moe", 2)])
@pytest.mark.parametrize("slots, resident_attention", [(2, True), (3, False), (1, False)])
def test_layers_streamed_in_pieces_give_the_resident_logits(family, pieces, slots,
                                                           resident_attention, make_checkpoint):
    """A layer split by its experts into ring units (ring_pieces): each slot holds a share of
    the experts (piece 0 the attention too, when it streams); logits match the resident
    model up to the order of the expert sums, and each pass copies each layer once."""
    path = make_checkpoint(family, layers=3)
    cfg = specoff.ModelConfig.from_hf(path)
    resident = specoff.load_model(path, "cpu")
    model, _ = build_offloaded(cfg, checkpoint_source(path, cfg), "cpu", torch.float32,
                               ring_slots=slots, resident_attention=resident_attention,
                               ring_pieces=pieces)
    ring = model.ring
    assert ring.pieces == pieces and len(model.layers[0].feed_forward.pieces) == pieces
    assert ring.slot_bytes < model.store.layout.stream_numel * 4 * 0.75  # a fraction of a layer
    assert model.layers[0].feed_forward.w13.device.type == "cpu"  # the experts stay in the store
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.inference_mode():
        for _ in range(3):
            torch.testing.assert_close(model(ids), resident(ids), rtol=1e-5, atol=1e-5)
    per_layer = ring.unit_numel * 4
    assert ring.unit_numel >= cfg.n_experts * 3 * cfg.dim * cfg.ffn_size
    first = sum(n for j in range(ring.n_slots) for *_, n, _ in ring.plans[ring.units[j][1]]) * 4
    assert ring.bytes_copied == first + 3 * cfg.n_layers * per_layer


@pytest.mark.parametrize("resident_attention", [True, False])
def test_resident_layers_beside_layers_streamed_in_pieces(resident_attention, make_checkpoint):
    """The planner's choice where memory is short but not scarce (planner.plan_weights): the
    first layers resident, the rest streamed in expert pieces; the same logits, and only the
    streamed layers cross the bus."""
    path = make_checkpoint("mixtral", layers=4)
    cfg = specoff.ModelConfig.from_hf(path)
    resident = specoff.load_model(path, "cpu")
    model, _ = build_offloaded(cfg, checkpoint_source(path, cfg), "cpu", torch.float32,
                               ring_slots=2, resident_attention=resident_attention,
                               resident_layers=2, ring_pieces=2)
    ring = model.ring
    assert model.layers[1].feed_forward.pieces is None  # resident: its own experts
    assert len(model.layers[3].feed_forward.pieces) == 2
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.inference_mode():
        for _ in range(3):
            torch.testing.assert_close(model(ids), resident(ids), rtol=1e-5, atol=1e-5)
    first = sum(n for j in range(ring.n_slots) for *_, n, _ in ring.plans[ring.units[j][1]]) * 4
    assert ring.bytes_copied == first + 3 * 2 * ring.unit_numel * 4  # 2 streamed layers a pass


def test_ring_pieces_must_split_the_experts(make_checkpoint):
    with pytest.raises(ValueError, match="ring_pieces=2 does not split"):
        specoff.LLM(make_checkpoint("llama", layers=2), device="cpu", offload=True, ring_pieces=2)


def test_a_store_the_host_cannot_hold_is_refused_before_loading(make_checkpoint, monkeypatch):
    """An offloaded target whose layers do not fit the host's free memory (Mixtral 8x22B's
    281 GB on a 128 GiB host) fails at once with the sizes and the fix, before the store is
    allocated; the CLI prints it (a BudgetError)."""
    from specoff.planner import BudgetError, HostMemoryError

    path = make_checkpoint("mixtral", layers=2)
    monkeypatch.setattr(specoff.offload, "available_host_bytes", lambda: 1000)
    allocated = []
    monkeypatch.setattr(specoff.offload, "HostStore",
                        lambda *a, **k: allocated.append(a) or pytest.fail("allocated"))
    with pytest.raises(HostMemoryError, match=r"2 decoder layers need .* GiB .* 0\.0 GiB is available.*free host memory"):
        specoff.LLM(path, device="cpu", offload=True)
    assert not allocated and issubclass(HostMemoryError, BudgetError)
    monkeypatch.undo()
    monkeypatch.setattr(specoff.offload, "available_host_bytes", lambda: None)  # the system does not say
    assert specoff.LLM(path, device="cpu", offload=True).model.store.nbytes > 1000


@pytest.mark.parametrize("family", ["mixtral", "qwen2"])
def test_offloaded_generation_equals_resident(family, make_checkpoint):
    path = make_checkpoint(family, layers=3)
    resident = specoff.LLM(path, device="cpu", offload=False)
    offloaded = specoff.LLM(path, device="cpu", offload=True, ring_slots=2, prefill_chunk=4)
    assert not resident.weight_plan.offload and offloaded.weight_plan.offload
    a = resident.generate(PROMPTS, GREEDY)
    b = offloaded.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    if family == "mixtral":  # streamed in pieces of its experts: the same tokens
        pieces = specoff.LLM(path, device="cpu", offload=True, ring_slots=2, ring_pieces=2,
                             prefill_chunk=4)
        assert pieces.weight_plan.ring_pieces == 2
        assert [o.token_ids for o in pieces.generate(PROMPTS, GREEDY)] == [o.token_ids for o in a]
    stats = offloaded.last_stats
    layer_bytes = offloaded.model.store.layout.stream_numel * 4
    # prefill streams each layer once (whatever the chunk count), then once per decode pass
    assert stats.bytes_streamed == layer_bytes * 3 * (stats.prefill_passes + stats.decode_passes)
    assert stats.plan["offload"] and stats.plan["ring_slots"] == 2
    assert resident.last_stats.bytes_streamed == 0


@pytest.mark.parametrize("into_rows", [False, True])
@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_packed_prefill_equals_the_padded_one(into_rows, attention, make_checkpoint):
    """Prompts of far-apart lengths prefill packed in one row (no padding, each token seeing
    its own prompt only; the Triton kernel or the dense mask), in parts of the size the
    caller asked for: logits and cached K/V match the batch padded to its longest."""
    from specoff.models.passes import PrefillBatch
    from specoff.options import KernelOptions

    model = specoff.LLM(make_checkpoint("mixtral", layers=3), device="cpu").model
    model.use_kernels(KernelOptions(interpret=True, chain_attention=attention == "triton", fused_elementwise=False,
                                    skinny_products=False))
    gen = torch.Generator().manual_seed(0)
    host = [23, 4, 19, 2, 11, 22]
    ids = torch.randint(3, 200, (len(host), max(host)), generator=gen)
    lens = torch.tensor(host)
    rows = torch.tensor([6, 0, 3, 1, 7, 2]) if into_rows else None
    caches = []
    with torch.inference_mode():
        for lengths_host in (None, host):
            cache = model.new_cache(8 if into_rows else len(host), 32)
            before = cache.k.clone()
            logits = model.prefill(ids, lens, cache, chunk=5, rows=rows, lengths_host=lengths_host)
            caches.append((logits, cache, before))
    (a, plain, _), (b, packed, before) = caches
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.lengths, plain.lengths)
    for i, n in enumerate(host):
        r = int(rows[i]) if into_rows else i
        torch.testing.assert_close(packed.k[:, r, :, :n], plain.k[:, r, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed.v[:, r, :, :n], plain.v[:, r, :, :n], rtol=1e-5, atol=1e-5)
        r_past = packed.k[:, r, :, n:]  # nothing written past a prompt's end
        assert torch.equal(r_past, before[:, r, :, n:])
    if into_rows:  # rows no prompt went to are untouched
        assert torch.equal(packed.k[:, [4, 5]], before[:, [4, 5]])
    batch = PrefillBatch(ids, model.new_cache(len(host), 32), 5, lengths_host=host)
    assert batch.packed and batch.padded_tokens == sum(host)
    # every part holds at most the tokens the caller sized a part for (chunk x rows)
    assert max(p.input_ids.numel() for p in batch.parts) <= 5 * len(host)
    assert len(batch.parts) == -(-sum(host) // (5 * len(host)))
    # equal lengths: nothing to gain, the plain padded batch
    assert not PrefillBatch(ids[:, :4], model.new_cache(len(host), 32), 5, lengths_host=[4] * 6).packed


def test_staged_prefill_fills_rows_of_a_larger_cache(make_checkpoint):
    """Prompts prefilled straight into rows of a bigger cache (PrefillStage: the K/V are built
    one layer at a time in a scratch, then moved) match a plain prefill, chunks and all."""
    model = specoff.LLM(make_checkpoint("mixtral", layers=3), device="cpu").model
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    lens = torch.tensor([5, 3])
    plain = model.new_cache(2, 12)
    expect = model.prefill(ids, lens, plain, chunk=2)
    big = model.new_cache(4, 12)
    big.lengths[:] = torch.tensor([4, 0, 7, 0])  # rows 0 and 2 hold other prompts
    before = big.k[:, [0, 2]].clone()
    rows = torch.tensor([3, 1])
    got = model.prefill(ids, lens, big, chunk=2, rows=rows)
    torch.testing.assert_close(got, expect)
    assert big.lengths.tolist() == [4, 3, 7, 5]
    for b, r in enumerate(rows.tolist()):
        n = lens[b]
        torch.testing.assert_close(big.k[:, r, :, :n], plain.k[:, b, :, :n])
        torch.testing.assert_close(big.v[:, r, :, :n], plain.v[:, b, :, :n])
    assert torch.equal(big.k[:, [0, 2]], before)  # the other rows are untouched
    with pytest.raises(ValueError, match="empty rows"):
        model.prefill(ids, lens, big, chunk=2, kv_start=4, rows=rows)


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_plain_batches_with_the_cache_in_row_segments(mode, make_checkpoint):
    """CacheOptions.segment_host_cache: a plain batch's cache as rows in segments of one pool
    (each its prompt and new tokens long) gives the tokens the dense cache gives; "auto"
    keeps the dense cache where it is on the compute device."""
    path = make_checkpoint("mixtral", layers=3)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    expect = [o.token_ids for o in specoff.LLM(path, device="cpu").generate(prompts, GREEDY)]
    llm = specoff.LLM(path, device="cpu", segment_host_cache=mode)
    cache = llm._batch_cache(prompts, 6, torch.device("cpu"))
    assert (cache.row_start is not None) == (mode == "on")
    if mode == "on":
        assert cache.pool == sum(len(p) + 7 for p in prompts)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expect
    with pytest.raises(ValueError, match="segment_host_cache takes 'auto' or 'on' or 'off'"):
        llm.reconfigure(segment_host_cache="sometimes")


def _gpu_runs(path, **kw):
    llm = specoff.LLM(path, device="cuda", dtype="float32", **kw)
    outs = llm.generate(PROMPTS, GREEDY)
    return [o.token_ids for o in outs], llm


def _gpu_pair(tmp_path, prompts, new_tokens):
    """A small upcycled pair (σ 0.3, 4 layers), greedy params, and the target's own tokens
    for `prompts` on the GPU: what the speculative runs must give."""
    from specoff.bench.synthetic import make_upcycled_pair

    draft, target = make_upcycled_pair(tmp_path, 0.3, layers=4)
    params = specoff.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    expect = [o.token_ids for o in specoff.LLM(target, device="cuda", dtype="float32")
              .generate(prompts, params)]
    return draft, target, params, expect


@pytest.mark.gpu
@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("kv", ["gpu", "host", "host-segments"])
def test_gpu_offloaded_equals_resident(slots, kv, make_checkpoint, monkeypatch):
    """Streamed layers equal resident ones, the cache on the GPU or in host memory (dense,
    or as row segments streamed as a pool: engine.SEGMENT_HOST_CACHE)."""
    from specoff import engine

    path = make_checkpoint("mixtral", layers=5)
    expect, _ = _gpu_runs(path, offload=False, cuda_graphs=False)
    if kv == "host-segments":
        monkeypatch.setattr(engine, "SEGMENT_HOST_CACHE", "auto")  # host memory: segments
        kv = "host"
    got, llm = _gpu_runs(path, offload=True, ring_slots=slots, kv_placement=kv)
    assert got == expect
    assert llm.model.ring.n_slots == slots and llm.last_stats.plan["kv_on_gpu"] == (kv == "gpu")
    eager, _ = _gpu_runs(path, offload=True, ring_slots=slots, kv_placement=kv, cuda_graphs=False)
    assert eager == expect
    # layers streamed in pieces of their experts (the copy stream refills a slot per piece)
    for pieces in (2, 4):  # 4 experts: one a slot
        got, llm = _gpu_runs(path, offload=True, ring_slots=slots, kv_placement=kv,
                             ring_pieces=pieces)
        assert got == expect and llm.model.ring.pieces == pieces


@pytest.mark.gpu
def test_gpu_budget_is_never_exceeded(make_checkpoint):
    path = make_checkpoint("mixtral", layers=6, dim=256, intermediate=512, experts=8)
    budget = 640 << 20
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    llm = specoff.LLM(path, device="cuda", gpu_memory=budget, offload=True)
    assert llm.weight_plan.offload
    llm.generate(PROMPTS * 8, specoff.SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert torch.cuda.max_memory_allocated() - base <= budget
    s = llm.last_stats  # the workload's prediction: a prefill and 15 decode passes a batch
    batches = -(-len(PROMPTS) * 8 // s.plan["rows_per_pass"])
    assert s.predicted_passes == 16 * batches and s.predicted_tokens_per_second > 0


@pytest.mark.gpu
@pytest.mark.parametrize("interleave,ahead", [(True, 1), (False, 1), (True, 0), (True, 3)])
def test_gpu_speculation_with_host_kv_keeps_the_budget(interleave, ahead, make_checkpoint, tmp_path):
    """Chain speculation with the target's cache in host memory (streamed to the GPU, refills
    prefilled on the GPU through a PrefillStage, in the pass that verifies the group's other
    rows) gives the target's tokens, within budget: the cache's layers copied on the compute
    stream (ahead 0) or fetched 1 or 3 layers ahead on their own stream."""
    draft, target, params, expect = _gpu_pair(tmp_path, PROMPTS * 3, 20)
    budget = 1 << 30
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    for pieces in (1, 2):
        llm = specoff.LLM(target, draft=draft, device="cuda", dtype="float32", offload=True,
                          gpu_memory=budget, kv_placement="host", max_rows=4, draft_len=3,
                          interleave=interleave, spec="chain", ring_pieces=pieces)
        llm.model.host_cache_ahead = ahead
        assert [o.token_ids for o in llm.generate(PROMPTS * 3, params)] == expect
        assert not llm.last_stats.plan["kv_on_gpu"] and llm.model.ring.pieces == pieces
        assert torch.cuda.max_memory_allocated() - base <= budget
        del llm


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_gpu_tree_throughput_keeps_the_budget(overlap, make_checkpoint, tmp_path):
    """Tree mode over many prompts (rows refilled, the target's cache in host memory, the
    target's picks taken in chunks, the draft's refill prefill after or under the pass):
    the target's tokens, within budget."""
    prompts = PROMPTS * 6
    draft, target, params, expect = _gpu_pair(tmp_path, prompts, 20)
    budget = 1 << 30
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    llm = specoff.LLM(target, draft=draft, device="cuda", dtype="float32", offload=True,
                      gpu_memory=budget, kv_placement="host", max_rows=8, spec="tree",
                      tree_budget=8, draft_prefill_stream=overlap, logit_rows=16)
    assert [o.token_ids for o in llm.generate(prompts, params)] == expect
    assert not llm.last_stats.plan["kv_on_gpu"] and llm.last_stats.rows_per_group == 8
    assert torch.cuda.max_memory_allocated() - base <= budget


def test_a_config_alone_gives_seeded_random_weights():
    cfg = specoff.ModelConfig.from_dict(dict(
        model_type="mixtral", vocab_size=300, hidden_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, num_local_experts=4,
        num_experts_per_tok=2))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    a = specoff.LLM(cfg, device="cpu", offload=False, seed=3).generate(prompts, GREEDY)
    b = specoff.LLM(cfg, device="cpu", offload=True, seed=3, ring_slots=2).generate(prompts, GREEDY)
    c = specoff.LLM(cfg, device="cpu", offload=False, seed=4)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert a[0].text == "" and c.tokenizer is None
    assert not torch.equal(c.model.layers[0].feed_forward.w13,
                           specoff.LLM(cfg, device="cpu", seed=3).model.layers[0].feed_forward.w13)
