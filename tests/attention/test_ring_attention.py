"""Ring attention (pass-KV / pass-Q / auto), partial prefill with a cache, CP decode, bad inputs:
multi-process CPU worlds (gloo, Triton interpreter) against float64 attention on the whole sequence.

Tiny shapes on purpose (every kernel runs in the interpreter): the file runs in well under a minute.
"""
import re

import pytest

from shardkit.collectives.attention.cp_decode import decode_cache_rank
from shardkit.collectives.attention.ring import PASS_Q_MISS_RATE, choose_variant

from . import ring_checks

BOTH = ["pass_kv", "pass_q"]


def _cfg(**kw) -> dict:
    cfg = dict(T=23, P=0, B=1, Hq=2, Hkv=1, D=16, dtype="float32", causal=True, layout="balanced",
               pass_pos=False, variants=BOTH, seed=1)
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("world_size,cfg", [
    # Load-balanced shards without positions; 23 tokens over 4 chunks / 6 chunks: uneven shards.
    (2, _cfg()),
    (3, _cfg(T=29, Hq=4, Hkv=2, variants=BOTH + ["auto"], seed=2)),
    # Non-causal, fp16, GQA 4:1, batch 2.
    (2, _cfg(causal=False, dtype="float16", B=2, Hq=4, Hkv=1, seed=3)),
    # Explicit positions: uneven contiguous pieces (fully masked chunk pairs are skipped).
    (3, _cfg(T=26, layout="contiguous", pass_pos=True, seed=4)),
    # Tokens on random ranks (sorted per rank; a rank may hold few or none), head dim 32.
    (4, _cfg(T=21, layout="random", pass_pos=True, D=32, seed=5)),
])
def test_ring_matches_full_attention(worlds, world_size, cfg):
    digests = worlds(world_size).run(ring_checks.check_ring, cfg)
    assert all(len(d) == len(cfg["variants"]) for d in digests)
    if "auto" in cfg["variants"]:  # no cache: auto is pass-KV, bit for bit
        assert all(d[cfg["variants"].index("auto")] == d[0] for d in digests)


@pytest.mark.parametrize("world_size,cfg", [
    # Partial prefill: P cached tokens (load-balanced, no positions) + T new tokens; auto with a
    # miss rate (9 / 26) below its threshold picks pass-Q.
    (2, _cfg(T=9, P=17, variants=BOTH + ["auto"], threshold=0.5, seed=6)),
    # Cache and new tokens on random ranks with explicit positions, GQA.
    (3, _cfg(T=10, P=19, Hq=4, Hkv=2, layout="random", pass_pos=True, seed=7)),
    # Non-causal with a cache.
    (2, _cfg(T=8, P=13, causal=False, seed=8)),
])
def test_partial_prefill_with_cache(worlds, world_size, cfg):
    digests = worlds(world_size).run(ring_checks.check_ring, cfg)
    if "auto" in cfg["variants"]:
        assert all(d[cfg["variants"].index("auto")] == d[cfg["variants"].index("pass_q")] for d in digests)


@pytest.mark.parametrize("world_size,cfg", [
    # torch's CPU flash kernel for the chunk pairs: every block shape of the load-balanced
    # layout (diagonal, key prefix of an earlier rank, row suffix for a later rank), uneven
    # and empty shards (5 tokens in 8 chunks), a cache, non-causal; with explicit positions
    # the masked pairs fall back to the Triton kernel.
    (2, _cfg(local_backend="flash", Hq=4, Hkv=2, seed=12)),
    (4, _cfg(T=5, local_backend="flash", seed=13)),
    (3, _cfg(T=31, P=31, local_backend="flash", dtype="float16", variants=BOTH, seed=14)),
    (2, _cfg(causal=False, T=9, P=6, local_backend="flash", seed=15)),
    (3, _cfg(T=20, P=7, layout="random", pass_pos=True, local_backend="flash", seed=16)),
])
def test_ring_with_torch_local_kernel(worlds, world_size, cfg):
    worlds(world_size).run(ring_checks.check_ring, cfg)


@pytest.mark.parametrize("world_size,cfg", [
    (2, dict(B=1, Hq=2, Hkv=1, D=16, n=1, prefix=11, generated=5, causal=False, dtype="float32", seed=9)),
    # Speculative-decoding style: 3 query rows, causal among them; GQA; fp16.
    (3, dict(B=2, Hq=4, Hkv=2, D=16, n=3, prefix=13, generated=7, causal=True, dtype="float16", seed=10)),
    # More ranks than prompt tokens: some shards are empty.
    (4, dict(B=1, Hq=2, Hkv=2, D=16, n=1, prefix=2, generated=1, causal=True, dtype="float32", seed=11)),
])
def test_cp_decode(worlds, world_size, cfg):
    digests = worlds(world_size).run(ring_checks.check_decode, cfg)
    assert len(set(digests)) == 1, "ranks got different decode outputs"


def test_decode_cache_rank():
    assert [decode_cache_rank(t, 3) for t in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="world"):
        decode_cache_rank(3, 0)
    with pytest.raises(ValueError, match="token_index"):
        decode_cache_rank(-1, 2)


def test_choose_variant():
    assert choose_variant(100, 0) == "pass_kv"  # no cache: miss rate 1
    assert choose_variant(4, 96) == "pass_q"    # 4% < 5%
    assert choose_variant(5, 95) == "pass_kv"   # 5% is not below 5%
    assert choose_variant(20, 80, pass_q_threshold=0.25) == "pass_q"
    assert PASS_Q_MISS_RATE == 0.05


@pytest.mark.parametrize("case,match,everywhere", [
    ("head_multiple", r"q heads \(3\) must be a multiple of k/v heads \(2\)", True),
    ("head_mismatch", "number of q heads must be the same on every rank", True),
    ("head_dim", "head_dim", True),
    ("uneven_no_pos", "q_pos and kv_pos", True),
    ("missing_kv_pos", "missing: \\['kv_pos'\\]", True),
    ("unsorted_kv_pos", "kv_pos and cache_pos must be sorted", True),
    ("bad_variant", "variant must be one of", True),
    ("one_bad_rank", "v shape", False),
])
def test_bad_inputs_raise_on_every_rank(worlds, case, match, everywhere):
    """Every rank raises (no rank hangs in the ring); the message names the argument."""
    results = worlds(2).run(ring_checks.expect_error, case, timeout=60)
    assert all(t in ("ValueError", "TypeError") for t, _ in results), results
    if everywhere:
        for _, msg in results:
            assert re.search(match, msg), msg
    else:  # the bad rank names its argument; the others name the bad rank
        assert re.search(match, results[-1][1]), results
        assert all("rank(s) [1] rejected their inputs" in msg for _, msg in results[:-1]), results


# NaN arithmetic warns in the interpreter's numpy (in the rank processes; harmless here).
@pytest.mark.parametrize("world_size,cfg", [
    # One NaN per batch entry: in q (batch 0), in k (batch 1), in v (batch 2); each reaches the
    # rows that attend to it, on every rank that holds such rows, and no other row.
    (2, _cfg(T=19, B=3, nan=[("q", 0, 5), ("k", 1, 9), ("v", 2, 14)], seed=17)),
    # Cache + new tokens on random ranks with positions, NaN in a cached key and a new value.
    (3, _cfg(T=10, P=11, B=3, layout="random", pass_pos=True, nan=[("q", 0, 2), ("k", 1, 4), ("v", 2, 15)],
             seed=18)),
    # torch's CPU flash kernel for the chunk pairs (its own NaN handling differs: see sdpa_with_lse).
    (2, _cfg(T=19, B=3, local_backend="flash", nan=[("q", 0, 12), ("k", 1, 3), ("v", 2, 10)], seed=19)),
])
def test_ring_propagates_nan_like_full_attention(worlds, world_size, cfg):
    worlds(world_size).run(ring_checks.check_ring, cfg)


@pytest.mark.parametrize("world_size,cfg", [
    (2, dict(B=3, Hq=2, Hkv=1, D=16, n=2, prefix=9, generated=3, causal=True, dtype="float32", seed=20,
             nan=[("q", 0, 1), ("k", 1, 10), ("v", 2, 4)])),  # k[10]: hidden from query row 0 (position 10)
    (3, dict(B=2, Hq=2, Hkv=1, D=16, n=1, prefix=8, generated=2, causal=False, dtype="float32", seed=21,
             nan=[("v", 0, 7), ("k", 1, 0)])),
])
def test_cp_decode_propagates_nan(worlds, world_size, cfg):
    digests = worlds(world_size).run(ring_checks.check_decode, cfg)
    assert len(set(digests)) == 1, "ranks got different decode outputs"


@pytest.mark.parametrize("world_size,cfg", [
    # The last rank's q, k, v and cache are stored with a non-unit stride in the head dim (torch's
    # kernels need a unit one): accepted on every rank; before, that rank raised inside the ring and
    # its peers hung.
    (2, _cfg(T=9, P=6, local_backend="flash", strided=True, seed=22)),
])
def test_ring_torch_local_kernel_any_strides(worlds, world_size, cfg):
    worlds(world_size).run(ring_checks.check_ring, cfg, timeout=60)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case,match", [
    ("q_len", r"number of query tokens \(q.shape\[2\]\) must be the same on every rank"),
    ("empty_q", r"number of query tokens .* per rank: \[1, (1, )?0\]"),
    ("q_heads", "number of q heads must be the same"),
    ("kv_heads", "number of k_cache_shard/v_cache_shard heads must be the same"),
    ("dtype", "dtype of q and the cache must be the same"),
    ("scale", "softmax_scale must be the same"),
    ("causal", "whether q_pos/kv_pos are given must be the same"),
    ("one_bad_rank", "v_cache_shard shape"),
    ("unsorted_kv_pos", "kv_pos must be non-decreasing"),
])
def test_cp_decode_bad_inputs_raise_on_every_rank(worlds, world_size, case, match):
    """Ranks that disagree, or one rank's bad input, raise a ValueError on every rank (before: gloo
    aborted the process, or the peers waited in the all-gather); the world stays usable."""
    results = worlds(world_size).run(ring_checks.expect_decode_error, case, timeout=60)
    assert all(t == "ValueError" for t, _ in results), results
    if case in ("one_bad_rank", "unsorted_kv_pos"):  # the bad rank names its argument, the others the rank
        assert re.search(match, results[-1][1]), results
        assert all(f"rank(s) [{world_size - 1}] rejected their inputs" in m for _, m in results[:-1]), results
    else:
        assert all(re.search(match, m) and m.startswith("cp_decode_attention: ") for _, m in results), results


def test_cp_decode_empty_query_everywhere(worlds):
    worlds(2).run(ring_checks.check_decode, dict(B=1, Hq=2, Hkv=1, D=16, n=0, prefix=5, generated=1, causal=False,
                                                 dtype="float32", seed=23))
