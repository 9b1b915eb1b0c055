"""The C++ host path of the all-reduce (shardkit._C) on real GPUs: bitwise the Python path's results on
the same kernels (out of place, new tensor, in place, out as a view of x, unaligned x, chunked sizes,
zero copy), ranks mixing the two paths, CUDA-graph replays, and the error paths (ranks that disagree,
an absent peer). Skipped without 2+ GPUs or without the binding. (The older GPU tests with
kernels='cuda' run through the C++ path too: it is the default where built.)"""
import pytest

from ..conftest import gpu_count
from . import host_checks


def _binding_built() -> bool:
    from shardkit.collectives import host_path
    return host_path.available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() < 2, reason="needs 2+ CUDA GPUs"),
              pytest.mark.skipif(gpu_count() >= 2 and not _binding_built(), reason="torch binding not built")]

WORLD = min(4, gpu_count())
# Tails of every pack size; 300_017 x 4 bytes exceeds the 1 MiB buffer below: chunked.
SIZES = [1, 7, 1000, 4099, 65_536 + 5, 300_017]
ALGOS = ["flat", "tree", "ll", "auto"]  # ll: chunked above protocol.LL_MAX_BYTES


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cpp_path_is_the_python_path_bitwise(worlds, dtype, algo):
    digests = worlds(WORLD, "nccl").run(host_checks.cpp_matches_python, algo, dtype, SIZES, 1 << 20, 5)
    assert all(d == digests[0] for d in digests), "ranks got different bits"


@pytest.mark.parametrize("algo", ALGOS[:3])
def test_ranks_may_mix_the_paths(worlds, algo):
    digests = worlds(WORLD, "nccl").run(host_checks.mixed_paths, algo, [7, 4099, 300_017], 6)
    assert all(d == digests[0] for d in digests), "ranks got different bits"


@pytest.mark.parametrize("algo", ["flat", "tree"])
def test_zero_copy(worlds, algo):
    assert len(set(worlds(WORLD, "nccl").run(host_checks.cpp_zero_copy, algo, 300_001, 9))) == 1


def test_cuda_graph_replays(worlds):
    for worst in worlds(WORLD, "nccl").run(host_checks.cpp_graph_replays, 40_000 + 3, 2_000, 21):
        assert worst < 2e-2, worst


@pytest.mark.parametrize("kind", ["numel", "dtype"])
def test_ranks_disagreeing_all_raise(worlds, kind):
    for m in worlds(WORLD, "nccl").run(host_checks.cpp_mismatch, kind, timeout=120):
        assert "different element count, dtype" in m, m


def test_absent_peer_times_out_naming_it(worlds):
    for rank, text in enumerate(worlds(WORLD, "nccl").run(host_checks.cpp_absent_peer, 1, 2.0, timeout=120)):
        if rank != 1:
            assert "rank(s) [1] did not arrive" in text, text
