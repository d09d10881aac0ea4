"""The preallocated cache: per-row offsets, advance, rollback, reset."""
import pytest
import torch

from specoff.kvcache import KVCache


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


@pytest.mark.parametrize("inference", [True, False])
def test_staged_writes_land_in_order_once_finished(inference):
    """stage_write (a host cache's new tokens, computed on the device) hands the write to a
    host thread; finish_writes(layer) waits for that layer's, finish_writes() for all; writes
    to one place land in the order issued, in or out of inference mode."""
    with torch.inference_mode(inference):  # the engine builds its caches in inference mode
        cache = KVCache(2, 3, 8, 2, 4, torch.float32, "cpu")
    first = torch.randn(3, 2, 2, 4)
    second = torch.randn(3, 2, 2, 4)
    positions = torch.tensor([[0, 1], [4, 5], [6, 7]])
    mode = torch.inference_mode() if inference else torch.no_grad()
    with mode:
        cache.stage_write(1, first, -first, positions)
        cache.stage_write(0, first, first, positions)
        cache.stage_write(1, second[:, :, :1], -second[:, :, :1], positions[:, :1])  # over column 0
        cache.finish_writes(layer=1)
        assert [layer for layer, _ in cache._pending] in ([0], [])
        cache.finish_writes()
    assert not cache._pending
    for b in range(3):
        p0, p1 = positions[b].tolist()
        assert torch.equal(cache.k[1, b, :, p0], second[b, :, 0])
        assert torch.equal(cache.k[1, b, :, p1], first[b, :, 1])
        assert torch.equal(cache.v[1, b, :, p0], -second[b, :, 0])
        assert torch.equal(cache.k[0, b, :, p1], first[b, :, 1])
    assert cache.k[1, 0, :, 2:].abs().sum() == 0  # nothing else written
