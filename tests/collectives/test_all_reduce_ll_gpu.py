"""The LL all-reduce (one synchronisation per call, flags in the data: csrc/dda/ll_all_reduce.cu) on real
GPUs: float64 reference and bitwise equality with the CUDA flat kernel at sizes with tails, up to the
largest single call and chunked beyond it; CUDA-graph replays next to flat; the LL counter across its
cleaning calls and its 2**32 wrap; ranks that disagree and an absent peer fail. Skipped without 2+ GPUs
or without the CUDA library (csrc/tests/test_all_reduce.cu is the kernel's unit test)."""
import pytest

from ..conftest import gpu_count
from . import ll_checks, rank_checks


def _cuda_kernels_built() -> bool:
    from shardkit.kernels.all_reduce import cuda as cuda_dda
    return cuda_dda.available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() < 2, reason="needs 2+ CUDA GPUs"),
              pytest.mark.skipif(gpu_count() >= 2 and not _cuda_kernels_built(), reason="CUDA library not built")]

WORLDS = sorted({2, min(4, gpu_count())}) if gpu_count() >= 2 else []
# Tails of every pack and line size; 131_072 bf16 = LL_MAX_BYTES (one call); 300_001 goes in chunks.
SIZES = [1, 7, 1000, 4099, 65_536 + 5, 131_072, 300_001]


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_matches_float64_sum_and_flat_bitwise(worlds, world_size, dtype):
    world = worlds(world_size, "nccl")
    ll = world.run(rank_checks.check_all_reduce, "ll", dtype, SIZES, 1 << 20, 3, "cuda")
    flat = world.run(rank_checks.check_all_reduce, "flat", dtype, SIZES, 1 << 20, 3, "cuda")
    assert all(d == ll[0] for d in ll), "ranks got different bits"
    assert ll[0] == flat[0], "ll differs bitwise from flat"


@pytest.mark.parametrize("world_size", WORLDS)
def test_cuda_graph_replays_next_to_flat(worlds, world_size):
    for worst, apart in worlds(world_size, "nccl").run(ll_checks.graph_replays_next_to_flat, 30_000 + 3, 2000, 31):
        assert worst < 2e-2, worst
        assert apart == 0.0, apart


@pytest.mark.parametrize("before", [(1 << 20) - 4, (1 << 32) - 4], ids=["cleaning", "wrap"])
def test_across_the_counter_cleaning_and_wrap(worlds, before):
    digests = worlds(2, "nccl").run(ll_checks.across_counter_wrap, before, 9, 5)
    assert digests[0] == digests[1]


@pytest.mark.parametrize("kind", ["numel", "dtype"])
def test_ranks_disagreeing_all_raise(worlds, kind):
    for m in worlds(WORLDS[-1], "nccl").run(rank_checks.mismatched_call, kind, "ll", "cuda", timeout=120):
        assert "different element count, dtype" in m, m


def test_absent_peer_times_out_naming_it(worlds):
    results = worlds(WORLDS[-1], "nccl").run(ll_checks.absent_peer, 1, 2.0, timeout=120)
    for rank, (text, seconds) in enumerate(results):
        if rank != 1:
            assert "rank(s) [1] did not arrive" in text, text
            print(f"rank {rank}: gave up after {seconds:.2f} s (timeout_s=2)")
