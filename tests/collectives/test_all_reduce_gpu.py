"""DDA flat/tree all-reduce on real GPUs (NCCL group, torch symmetric memory): the CPU checks at
GPU sizes, CUDA-graph capture with 10,000 replays, and the error paths. Skipped without 2+ GPUs."""
import pytest

from ..conftest import gpu_count
from . import rank_checks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() < 2, reason="needs 2+ CUDA GPUs")]

WORLDS = sorted({2, min(4, gpu_count())}) if gpu_count() >= 2 else []


def _cuda_kernels_built() -> bool:
    from shardkit.kernels.all_reduce import cuda as cuda_dda
    return cuda_dda.available()


# Every check runs on both kernel families; the CUDA one only where csrc was built.
KERNELS = [pytest.param("triton"),
           pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_kernels_built(), reason="CUDA library not built"))]
SIZES = [1, 7, 1000, 4099, 65_536 + 5, 1_000_003, 3_000_017]  # the last ones exceed 1 MiB halves: chunked


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("algo", ["flat", "tree"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_matches_float64_sum(worlds, world_size, algo, dtype, kernels):
    digests = worlds(world_size, "nccl").run(rank_checks.check_all_reduce, algo, dtype, SIZES, 1 << 20, 3, kernels)
    assert all(d == digests[0] for d in digests), "ranks got different bits"


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("world_size", WORLDS)
def test_many_calls_in_a_row(worlds, world_size, kernels):
    assert worlds(world_size, "nccl").run(rank_checks.check_many_calls, 200, 5, 1 << 16, kernels) == [200] * world_size


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("algo", ["flat", "tree"])
def test_zero_copy(worlds, algo, kernels):
    assert len(set(worlds(WORLDS[-1], "nccl").run(rank_checks.check_zero_copy, algo, 300_001, 9, kernels))) == 1


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("world_size", WORLDS)
def test_cuda_graph_10000_replays(worlds, world_size, kernels):
    for worst in worlds(world_size, "nccl").run(rank_checks.graph_replays, 40_000 + 3, 10_000, 21, kernels):
        assert worst < 2e-2, worst


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("kind", ["numel", "dtype"])
def test_ranks_disagreeing_all_raise(worlds, kind, kernels):
    for m in worlds(WORLDS[-1], "nccl").run(rank_checks.mismatched_call, kind, "flat", kernels, timeout=120):
        assert "different element count, dtype" in m, m


@pytest.mark.skipif(not _cuda_kernels_built(), reason="CUDA library not built")
def test_ranks_disagreeing_about_kernels_all_raise(worlds):
    for m in worlds(WORLDS[-1], "nccl").run(rank_checks.mismatched_call, "kernels", "flat", timeout=120):
        assert "different element count, dtype" in m, m


@pytest.mark.parametrize("kernels", KERNELS)
def test_absent_peer_times_out_naming_it(worlds, kernels):
    results = worlds(WORLDS[-1], "nccl").run(rank_checks.timed_absent_peer, 1, 2.0, kernels, timeout=120)
    for rank, (text, seconds) in enumerate(results):
        if rank != 1:
            assert "rank(s) [1] did not arrive" in text, text
            print(f"rank {rank}: gave up after {seconds:.2f} s (timeout_s=2)")
