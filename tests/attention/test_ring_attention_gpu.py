"""GPU tests of ring attention and CP decode on NCCL worlds: bf16, larger shapes, against float64.

Run on the device machine:  python -m pytest tests/attention/test_ring_attention_gpu.py -q -m gpu
"""
import os
import re

import pytest
import torch

from shardkit.kernels.attention.sdpa import sdpa_backends

from . import ring_checks

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multigpu,
    pytest.mark.skipif(NGPU < 2, reason="needs 2+ CUDA GPUs"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only"),
]

WORLDS = [w for w in (2, 4) if w <= NGPU]
BOTH = ["pass_kv", "pass_q"]


def _cfg(**kw) -> dict:
    cfg = dict(T=3001, P=0, B=1, Hq=8, Hkv=2, D=128, dtype="bfloat16", causal=True, layout="balanced",
               pass_pos=False, variants=BOTH + ["auto"], seed=1)
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("cfg", [
    _cfg(),
    _cfg(causal=False, T=2048, D=64, seed=2),
    _cfg(T=2500, layout="random", pass_pos=True, seed=3),
    _cfg(dtype="float16", T=1999, Hq=4, Hkv=4, seed=4),
    # Partial prefill: 300 new tokens after 2700 cached ones.
    _cfg(T=300, P=2700, variants=BOTH, seed=5),
])
def test_ring_gpu(worlds, world_size, cfg):
    digests = worlds(world_size, "nccl").run(ring_checks.check_ring, cfg)
    if "auto" in cfg["variants"]:  # no cache: auto is pass-KV, bit for bit
        assert all(d[cfg["variants"].index("auto")] == d[0] for d in digests)


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("backend", ["triton"] + list(sdpa_backends(torch.device("cuda"), torch.bfloat16))
                         if NGPU else ["triton"])
@pytest.mark.parametrize("cfg", [
    _cfg(T=4099, seed=11),                                   # every block shape, uneven shards
    _cfg(T=700, P=3001, variants=BOTH, seed=12),             # cache + new tokens
    _cfg(T=2500, layout="random", pass_pos=True, variants=["pass_kv"], seed=13),  # position fallback
])
def test_ring_local_backends_gpu(worlds, world_size, backend, cfg):
    worlds(world_size, "nccl").run(ring_checks.check_ring, dict(cfg, local_backend=backend))


@pytest.mark.parametrize("world_size", WORLDS)
def test_cp_decode_gpu(worlds, world_size):
    cfg = dict(B=4, Hq=32, Hkv=8, D=128, n=1, prefix=5000, generated=37, causal=False, dtype="bfloat16", seed=6)
    digests = worlds(world_size, "nccl").run(ring_checks.check_decode, cfg)
    assert len(set(digests)) == 1, "ranks got different decode outputs"
    cfg.update(n=4, causal=True, seed=7)
    worlds(world_size, "nccl").run(ring_checks.check_decode, cfg)


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("backend", ["triton"] + list(sdpa_backends(torch.device("cuda"), torch.bfloat16))
                         if NGPU else ["triton"])
@pytest.mark.parametrize("cfg", [
    # NaN in q (batch 0), a key (batch 1) and a value (batch 2): the output's NaN pattern is the reference's.
    _cfg(T=2048, B=3, variants=BOTH, nan=[("q", 0, 700), ("k", 1, 1500), ("v", 2, 1000)], seed=9),
    _cfg(T=300, P=2700, B=3, variants=BOTH, nan=[("q", 0, 100), ("k", 1, 2000), ("v", 2, 2900)], seed=10),
])
def test_ring_nan_gpu(worlds, world_size, backend, cfg):
    worlds(world_size, "nccl").run(ring_checks.check_ring, dict(cfg, local_backend=backend))


@pytest.mark.parametrize("world_size", WORLDS)
def test_cp_decode_nan_gpu(worlds, world_size):
    cfg = dict(B=4, Hq=32, Hkv=8, D=128, n=4, prefix=5000, generated=37, causal=True, dtype="bfloat16", seed=8,
               nan=[("q", 0, 1), ("k", 1, 5034), ("v", 2, 100)])  # k[5034]: hidden from query row 0 (5033)
    digests = worlds(world_size, "nccl").run(ring_checks.check_decode, cfg)
    assert len(set(digests)) == 1, "ranks got different decode outputs"


@pytest.mark.parametrize("world_size", WORLDS)
def test_cp_decode_cuda_graph(worlds, world_size):
    cfg = dict(B=2, Hq=16, Hkv=4, D=128, L=4097, dtype="bfloat16", seed=8)
    worst = worlds(world_size, "nccl").run(ring_checks.check_decode_graph, cfg, 5)
    assert all(w == 0.0 for w in worst), worst  # not max(): it skips a NaN that is not first


@pytest.mark.parametrize("case", ["q_len", "empty_q", "one_bad_rank", "unsorted_kv_pos"])
def test_cp_decode_bad_inputs_gpu(worlds, case):
    """On NCCL too, every rank raises (the metadata row travels on the GPU); an unsorted CUDA kv_pos
    is found by the device-side flag, so every rank names the bad rank."""
    results = worlds(2, "nccl").run(ring_checks.expect_decode_error, case, timeout=120)
    assert all(t == "ValueError" for t, _ in results), results
    if case == "one_bad_rank":
        assert "v_cache_shard shape" in results[1][1] and "rank(s) [1] rejected" in results[0][1], results
    elif case == "unsorted_kv_pos":
        assert all("kv_pos must be sorted ascending; it is not on rank(s) [1]" in m for _, m in results), results
    else:
        assert all(re.search("number of query tokens", m) for _, m in results), results
