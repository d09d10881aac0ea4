"""The preallocated cache: per-row offsets, advance, rollback, reset."""
import pytest
import torch

from specoff.kvcache import KVCache, device_alias


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
