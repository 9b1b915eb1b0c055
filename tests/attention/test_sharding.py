"""Load-balanced causal sharding: chunk layout, shard/unshard round trip, positions."""
import pytest
import torch

from shardkit.collectives.attention.sharding import chunk_bounds, shard, shard_positions, shard_ranges, unshard

LENGTHS = [0, 1, 3, 8, 37, 64, 101]
WORLDS = [1, 2, 3, 4, 8]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_chunk_bounds_cover_and_balance(seq_len, world):
    b = chunk_bounds(seq_len, world)
    assert len(b) == 2 * world
    assert b[0][0] == 0 and b[-1][1] == seq_len
    assert all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
    sizes = [e - s for s, e in b]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger chunks come first


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_rank_holds_chunks_i_and_mirror(seq_len, world):
    b = chunk_bounds(seq_len, world)
    for r in range(world):
        assert shard_ranges(seq_len, r, world) == (b[r], b[2 * world - 1 - r])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("dim", [0, 1, -1, -2])
def test_shard_unshard_roundtrip(seq_len, world, dim):
    shape = {0: (seq_len, 3, 4), 1: (2, seq_len, 4), -1: (2, 3, seq_len), -2: (2, 3, seq_len, 5)}[dim]
    x = torch.randn(*shape)
    before = x.clone()
    parts = [shard(x, r, world, dim=dim) for r in range(world)]
    assert torch.equal(x, before), "shard modified its input"
    assert sum(p.shape[dim] for p in parts) == seq_len
    for r, p in enumerate(parts):
        assert p.shape[dim] == shard_positions(seq_len, r, world).numel()
    assert torch.equal(unshard(parts, world, dim=dim), x)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_positions_match_shard_of_arange(seq_len, world):
    seen = []
    for r in range(world):
        p32 = shard_positions(seq_len, r, world)
        p64 = shard_positions(seq_len, r, world, dtype=torch.int64)
        assert p32.dtype == torch.int32 and p64.dtype == torch.int64
        assert torch.equal(p64, shard(torch.arange(seq_len), r, world, dim=0))
        assert torch.equal(p32.long(), p64)
        assert bool((p64[1:] >= p64[:-1]).all()), "positions must be sorted (kv_pos requirement)"
        seen.append(p64)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(seq_len))


@pytest.mark.parametrize("world", [2, 4, 8])
def test_causal_work_is_balanced(world):
    """Causal cost of a token = its position + 1 keys; ranks differ by little."""
    seq_len = 1000 * 2 * world + 7
    work = [int((shard_positions(seq_len, r, world, dtype=torch.int64) + 1).sum()) for r in range(world)]
    assert max(work) / min(work) < 1.001
    # the contiguous split would be ~(2 * world - 1) times unbalanced
    contiguous = [sum(range(r * seq_len // world + 1, (r + 1) * seq_len // world + 1)) for r in range(world)]
    assert max(contiguous) / min(contiguous) > 2


def test_unshard_of_gpu_style_list_and_3d():
    x = torch.arange(2 * 13 * 3).reshape(2, 13, 3)
    parts = [shard(x, r, 3, dim=1) for r in range(3)]
    assert torch.equal(unshard(parts, 3, dim=1), x)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: shard(torch.zeros(4, 5), 2, 2), ValueError, "rank must be"),
    (lambda: shard(torch.zeros(4, 5), -1, 2), ValueError, "rank must be"),
    (lambda: shard(torch.zeros(4, 5), 0, 0), ValueError, "world must be"),
    (lambda: shard(torch.zeros(4, 5), 0, 2, dim=3), ValueError, "dim 3 is out of range"),
    (lambda: shard([1, 2], 0, 2), TypeError, "x must be a torch.Tensor"),
    (lambda: unshard([torch.zeros(3, 2)], 2), ValueError, "one tensor per rank"),
    (lambda: unshard([torch.zeros(3, 2), torch.zeros(3, 3)], 2, dim=0), ValueError, "only dim 0 may differ"),
    (lambda: unshard([torch.zeros(3, 2), torch.zeros(1, 2)], 2, dim=0), ValueError, r"locals_\[0\] has length 3"),
    (lambda: unshard([torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int64)], 2, dim=0), ValueError, "locals_"),
    (lambda: shard_positions(10, 0, 2, dtype=torch.float32), ValueError, "dtype must be"),
    (lambda: chunk_bounds(-1, 2), ValueError, "seq_len must be"),
])
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
