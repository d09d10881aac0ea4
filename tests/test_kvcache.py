"""The preallocated cache: per-row offsets, advance, rollback, reset."""
import pytest
import torch

from specoff.kvcache import KVCache, SegmentAllocator, SegmentKVCache, device_alias


def entries(n_rows, T, value_of):
    return torch.stack([torch.stack([torch.full((2, 3), float(value_of(b, t))) for t in range(T)], 1)
                        for b in range(n_rows)])  # (B, KV=2, T, hd=3)


def test_rows_write_at_their_own_offsets():
    cache = KVCache(n_layers=2, rows=3, max_len=8, n_kv_heads=2, head_dim=3, dtype=torch.float32,
                    device="cpu")
    cache.advance(torch.tensor([0, 2, 5]))
    k = entries(3, 2, lambda b, t: 10 * b + t + 1)
    cache.write(1, k, -k, cache.positions(2))
    for b, start in enumerate([0, 2, 5]):
        assert torch.equal(cache.k[1, b, :, start:start + 2], k[b])
        assert torch.equal(cache.v[1, b, :, start:start + 2], -k[b])
        assert cache.k[1, b, :, :start].abs().sum() == 0  # earlier entries untouched
    assert cache.k[0].abs().sum() == 0  # other layers untouched


def test_advance_by_row_and_rollback_overwrites_rejected_tokens():
    cache = KVCache(1, 2, 10, 2, 3, torch.float32, "cpu")
    cache.write(0, entries(2, 4, lambda b, t: 1), entries(2, 4, lambda b, t: 1), cache.positions(4))
    cache.advance(torch.tensor([4, 1]))  # row 1 keeps only 1 of its 4 tokens
    assert cache.lengths.tolist() == [4, 1]
    assert cache.positions(2).tolist() == [[4, 5], [1, 2]]
    cache.write(0, entries(2, 2, lambda b, t: 7), entries(2, 2, lambda b, t: 7), cache.positions(2))
    assert cache.k[0, 1, 0, :4, 0].tolist() == [1, 7, 7, 1]  # the rejected slots are reused
    cache.rollback(torch.tensor([1, 0]))
    assert cache.lengths.tolist() == [3, 1]
    cache.reset(torch.tensor([0]))
    assert cache.lengths.tolist() == [0, 1]
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]


def test_device_alias_needs_pinned_memory():
    with pytest.raises(ValueError, match="pinned host memory"):
        device_alias(torch.zeros(4), "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mapped_cache_is_written_and_read_by_device_kernels(dtype):
    """KVCache.mapped: device tensors over a pinned host cache. A scatter on the device lands
    in host memory (seen on the host after the stream's work is done), a device read sees
    what the host wrote, and an asynchronous copy issued after the write on the same stream
    carries the written values (the order streamed_attention relies on)."""
    cache = KVCache(2, 3, 8, 2, 4, dtype, "cpu", pin_memory=True, lengths_device="cuda")
    k, v = cache.mapped()
    assert k.is_cuda and k.shape == cache.k.shape and k.dtype == dtype
    assert k.data_ptr() == cache.k.data_ptr()  # the same memory, no copy
    new = torch.randn(3, 2, 2, 4, device="cuda").to(dtype)
    positions = torch.tensor([[0, 1], [4, 5], [6, 7]], device="cuda")
    idx = positions[:, None, :, None].expand(3, 2, 2, 4)
    k[1].scatter_(2, idx, new)
    v[1].scatter_(2, idx, -new)
    layer = cache.k[1].to("cuda", non_blocking=True)  # after the write, same stream
    torch.cuda.synchronize()
    for b, (p0, p1) in enumerate(positions.tolist()):
        assert torch.equal(cache.k[1, b, :, p0:p1 + 1], new[b].cpu())
        assert torch.equal(cache.v[1, b, :, p0:p1 + 1], -new[b].cpu())
    assert torch.equal(layer.cpu(), cache.k[1])
    assert cache.k[0].abs().sum() == 0 and cache.k[1, 0, :, 2:].abs().sum() == 0
    cache.v[0, 2, 1, 3] = 5.0  # a host write, read by a device kernel
    assert torch.equal(v[0, 2, 1, 3].cpu(), torch.full((4,), 5.0, dtype=dtype))


def test_segment_cache_rows_hold_what_a_dense_cache_holds():
    """Rows in segments of one pool: writes at per-row positions, prompts put by row and by
    token, and the dense view of a layer give what a KVCache of the same rows gives; a write
    past a row's segment stays in its last slot."""
    B, KV, hd = 3, 2, 4
    dense = KVCache(2, B, 12, KV, hd, torch.float32, "cpu")
    seg = SegmentKVCache(2, B, 40, 12, KV, hd, torch.float32, "cpu")
    sizes, starts = [12, 7, 9], [20, 3, 11]
    seg.assign(range(B), starts, sizes)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, KV, 5, hd, generator=g), torch.randn(B, KV, 5, hd, generator=g)
    for c in (dense, seg):
        c.put_rows(1, None, k, v) if c is seg else (c.k[1, :, :, :5].copy_(k), c.v[1, :, :, :5].copy_(v))
        c.advance(torch.tensor([5, 2, 4]))
    new = torch.randn(B, KV, 2, hd, generator=g)
    for c in (dense, seg):
        c.write(1, new, -new, c.positions(2))
    rows, pos = torch.tensor([2, 0]), torch.tensor([6, 7])
    tok = torch.randn(KV, 2, hd, generator=g)
    seg.put_tokens(1, rows, pos, tok, -tok)
    dense.k[1][rows, :, pos], dense.v[1][rows, :, pos] = tok.transpose(0, 1), -tok.transpose(0, 1)
    keys, values = seg.dense(1, 8)
    assert keys.shape == (B, KV, 8, hd)
    for b in range(B):
        n = min(8, sizes[b])
        assert torch.equal(keys[b, :, :n], dense.k[1, b, :, :n])
        assert torch.equal(values[b, :, :n], dense.v[1, b, :, :n])
    assert seg.k_pool[0].abs().sum() == 0  # other layers untouched
    assert seg.k_pool[1, :, :3].abs().sum() == 0 and seg.k_pool[1, :, 32:].abs().sum() == 0
    seg.write(1, new[1:2].expand(B, -1, -1, -1), new[1:2].expand(B, -1, -1, -1),
              torch.tensor([[0, 1]] * B) + 30)  # past every row's segment
    assert torch.equal(seg.k_pool[1, :, starts[1] + sizes[1] - 1], new[1, :, 1])
    assert torch.equal(seg.k_pool[1, :, 10], torch.zeros(KV, hd))  # between segments: untouched
    with pytest.raises(ValueError, match="past the pool"):
        seg.assign([0], [35], [8])
    with pytest.raises(ValueError, match="device"):
        seg.mapped()


def test_segment_allocator_first_fit_and_merges():
    a = SegmentAllocator(10, 50)
    assert [a.alloc(n) for n in (15, 10, 20)] == [10, 25, None]
    a.release(10, 15)
    assert a.alloc(20) is None and a.largest == 15  # two free runs: 10..25 and 35..50
    a.release(25, 10)  # merges both
    assert a.free == [(10, 50)] and a.alloc(40) == 10 and a.alloc(1) is None
    with pytest.raises(ValueError, match="twice"):
        a.release(10, 40) or a.release(12, 3)


@pytest.mark.parametrize("tree", [False, True])
def test_streamed_segments_attend_as_over_a_dense_cache(tree):
    """models.host_cache.streamed_segments (a host pool streamed to the device, here both the CPU):
    the new tokens land in each row's segment and attention equals cached attention over a
    dense cache of the same rows."""
    from specoff.models.attention import TreeMask, cached_attention, causal_mask
    from specoff.models.host_cache import streamed_segments

    B, KV, H, hd, T = 3, 2, 4, 8, 3
    g = torch.Generator().manual_seed(1)
    dense = KVCache(1, B, 20, KV, hd, torch.float32, "cpu")
    seg = SegmentKVCache(1, B, 64, 20, KV, hd, torch.float32, "cpu")
    seg.assign(range(B), [40, 2, 20], [20, 15, 18])
    lengths = torch.tensor([5, 0, 9])
    prefix = torch.randn(B, KV, 10, hd, generator=g), torch.randn(B, KV, 10, hd, generator=g)
    dense.k[0, :, :, :10], dense.v[0, :, :, :10] = prefix
    seg.put_rows(0, None, *prefix)
    for c in (dense, seg):
        c.advance(lengths)
    q = torch.randn(B, H, T, hd, generator=g)
    k, v = torch.randn(B, KV, T, hd, generator=g), torch.randn(B, KV, T, hd, generator=g)
    positions = dense.positions(T)
    if tree:
        ancestors = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool).expand(B, T, T)
        mask = TreeMask(dense.lengths, ancestors)
        expect = cached_attention(q, k, v, mask.dense(20), dense, 0, positions, 20, causal=False)
    else:
        mask = causal_mask(positions, 20)
        expect = cached_attention(q, k, v, mask, dense, 0, positions, 20)
    got = streamed_segments(q, k, v, TreeMask(seg.lengths, mask.ancestors) if tree else mask, seg,
                            0, positions, 20, causal=not tree)
    assert torch.allclose(got, expect, atol=1e-5)
    keys, _ = seg.dense(0, 20)
    for b in range(B):
        n = int(lengths[b]) + T
        assert torch.equal(keys[b, :, :n], dense.k[0, b, :, :n])


def test_host_pool_reuses_blocks_once_their_caches_are_gone(monkeypatch):
    """hostmem.HostPool (host caches' page-locked memory, kept across generate calls): a
    block goes back when its tensor is collected, the smallest free block that holds a
    request serves it, a block reused for the same dtype keeps its contents and is zeroed
    for another; failing a fit the free blocks go and a new one comes. (Registering is
    cudaHostRegister on a GPU host: a no-op here.)"""
    import gc

    from specoff import hostmem

    monkeypatch.setattr(hostmem, "pin", lambda t: None)
    pool = hostmem.HostPool()
    a = pool.zeros((4, 8), torch.float32)
    assert a.abs().sum() == 0 and pool.nbytes == 128
    a.fill_(3.0)
    b = pool.zeros((2, 8), torch.float32)  # a is leased: a new block
    assert pool.nbytes == 128 + 64
    ptr_a = a.data_ptr()
    del a
    gc.collect()
    c = pool.zeros((2, 8), torch.float32)  # the free 128-byte block holds 64 bytes
    assert c.data_ptr() == ptr_a and (c == 3.0).all()  # same dtype: not rewritten
    assert pool.holds(c[1]) and not pool.holds(torch.zeros(3))
    del c
    gc.collect()
    d = pool.zeros((16,), torch.bfloat16)  # another dtype: zeroed
    assert d.data_ptr() == ptr_a and d.abs().sum() == 0
    del d
    gc.collect()
    e = pool.zeros((64,), torch.float32)  # 256 bytes: no block holds it
    assert pool.nbytes == 64 + 256  # the free 128-byte block went, b's stays
    del b, e
    gc.collect()
    pool.clear()
    assert pool.nbytes == 0


@pytest.mark.gpu
def test_gpu_host_pool_blocks_are_page_locked_and_reused():
    """host_zeros on a GPU host: registered blocks that torch sees as pinned (asynchronous
    copies, device aliases), handed out again once their tensor is gone."""
    import gc

    from specoff import hostmem

    t = hostmem.host_zeros((3, 1 << 20), torch.bfloat16)
    assert t.is_pinned() and hostmem.HOST_BLOCKS.holds(t)
    t.fill_(2.0)
    assert (device_alias(t, "cuda").sum() == 6 * (1 << 20)).item()
    ptr = t.data_ptr()
    del t
    gc.collect()
    again = hostmem.host_zeros((3, 1 << 20), torch.bfloat16)
    assert again.data_ptr() == ptr
    copied = again.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert (copied == 2.0).all()


def test_host_cache_reads_copy_each_layer_once_for_every_reader():
    """models.host_cache.HostCacheReads (here without a copy stream: the CPU): a layer's blocks are
    copied once for all the parts of a pass that read them, a SegmentKVCache's as its pools,
    the layer before let go as the next begins; readers of a pass see each other's writes to
    the copy; outside a pass a read copies the layer afresh."""
    from specoff.models.host_cache import HostCacheReads

    dense = KVCache(3, 2, 6, 2, 4, torch.float32, "cpu")
    dense.k.copy_(torch.randn(dense.k.shape))
    seg = SegmentKVCache(3, 2, 16, 6, 2, 4, torch.float32, "cpu")
    seg.k_pool.copy_(torch.randn(seg.k_pool.shape))
    assert HostCacheReads.for_parts([dense, seg], 3, "cpu") is None  # a cache beside its device
    reads = HostCacheReads([dense, dense, seg], 3, "cpu")
    assert reads.ahead == 0 and len(reads.sources) == 2
    for c in (dense, seg):
        c.host_reads = reads
    reads.begin(0)
    keys, values = HostCacheReads.blocks(dense, 0, "cpu")
    assert torch.equal(keys, dense.k[0]) and keys.data_ptr() != dense.k.data_ptr()
    keys[0, 0, 0] += 1  # a part's new token: the next reader of the layer sees it
    again, _ = HostCacheReads.blocks(dense, 0, "cpu")
    assert again is keys
    pool, _ = HostCacheReads.blocks(seg, 0, "cpu")
    assert torch.equal(pool, seg.k_pool[0]) and pool.shape == seg.k_pool.shape[1:]
    reads.begin(1)
    assert set(reads.fetched) == {1}
    reads.close()
    assert dense.host_reads is None and seg.host_reads is None and not reads.fetched
    fresh, _ = HostCacheReads.blocks(dense, 0, "cpu")  # no pass: straight from the cache
    assert torch.equal(fresh, dense.k[0])
