"""The LL fused all-reduce + residual + RMSNorm (one synchronisation per call: csrc/dda/ll_rmsnorm.cu) on real
GPUs: float64 reference, the Triton flat kernel (residual_out bitwise, out within one rounding; the share of
out bitwise equal is printed), both host paths bitwise, in place, chunked calls, every dtype; CUDA-graph replays
beside the Triton kernel and the LL all-reduce; auto with a measured rule (graph and eager); ranks that disagree,
an absent peer; grids of 1..8 blocks per row. Skipped without 2+ GPUs or without the torch binding
(csrc/tests/test_all_reduce.cu is the kernel's unit test)."""
import pytest

from ..conftest import gpu_count
from . import rmsnorm_ll_checks


def _binding_built() -> bool:
    from shardkit.collectives import host_path
    return host_path.available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() < 2, reason="needs 2+ CUDA GPUs"),
              pytest.mark.skipif(gpu_count() >= 2 and not _binding_built(), reason="torch binding not built")]

WORLDS = sorted({2, min(4, gpu_count())}) if gpu_count() >= 2 else []
# Decode shapes of a 70B model (hidden 8192: 16 rows per launch, each row split over 8 blocks of a cluster; 17 and
# 64 go in chunks), tails of every line size (4100, 1001), rows wider than 16 KiB (16384: 32 KiB in bf16, 64 KiB in
# fp32, 4 rows per launch), many rows per block (96: 300 rows on one block per SM). Segments wider than a thread's
# registers (the two-pass path) run in test_every_grid_matches_the_policys and the CUDA unit test.
CASES = [(1, 8192), (16, 8192), (17, 8192), (64, 8192), (33, 4100), (5, 1001), (9, 4096), (40, 4096), (5, 16384),
         (300, 96)]


@pytest.mark.parametrize("world_size", WORLDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_matches_float64_reference_and_triton(worlds, world_size, dtype):
    results = worlds(world_size, "nccl").run(rmsnorm_ll_checks.matches_reference_and_triton, dtype, CASES, 3)
    assert all(d == results[0][0] for d, _ in results), "ranks got different bits"
    print(f"world {world_size} {dtype}: out bitwise equal to the Triton flat kernel's for "
          f"{100 * results[0][1]:.2f}% of elements")


@pytest.mark.parametrize("world_size", WORLDS)
def test_cuda_graph_replays(worlds, world_size):
    for worst, apart in worlds(world_size, "nccl").run(rmsnorm_ll_checks.graph_replays, 16, 8192, 2000, 41):
        assert worst < 2e-2, worst
        assert apart == 0.0, apart


def test_auto_picks_ll_under_a_measured_rule(worlds):
    digests = worlds(WORLDS[-1], "nccl").run(rmsnorm_ll_checks.auto_picks_ll, 8, 8192, 5)
    assert all(d == digests[0] for d in digests)


def test_ranks_disagreeing_all_raise(worlds):
    for m in worlds(WORLDS[-1], "nccl").run(rmsnorm_ll_checks.mismatched_rows, timeout=120):
        assert "different element count" in m, m


def test_absent_peer_times_out_naming_it(worlds):
    results = worlds(WORLDS[-1], "nccl").run(rmsnorm_ll_checks.absent_peer, 1, 2.0, timeout=120)
    for rank, (text, seconds) in enumerate(results):
        if rank != 1:
            assert "rank(s) [1] did not arrive" in text, text
            print(f"rank {rank}: gave up after {seconds:.2f} s (timeout_s=2)")


@pytest.mark.parametrize("segments", [1, 2, 8])
def test_every_grid_matches_the_policys(worlds, segments):
    """The kernel on grids of 1, 2 and 8 blocks per row (1: whole rows per block, wide rows in two passes) gives
    the policy's grid's bits."""
    worlds(2, "nccl").run(rmsnorm_ll_checks.grids_agree, segments, [(1, 8192), (5, 8192), (16, 8192), (3, 4099)])
