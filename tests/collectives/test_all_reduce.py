"""DDA flat/tree all-reduce on a CPU world (Triton interpreter on shared memory) against float64."""
import pytest

from . import rank_checks

SIZES = [1, 7, 1000, 4099, 5000]  # 4099 and 5000 elements exceed the 8 KiB workspace below: chunked
SMALL_BUFFER = 8192


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("algo", ["flat", "tree"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_matches_float64_sum(worlds, world_size, algo, dtype):
    digests = worlds(world_size).run(rank_checks.check_all_reduce, algo, dtype, SIZES, SMALL_BUFFER, 7)
    assert all(d == digests[0] for d in digests), "ranks got different bits"


@pytest.mark.parametrize("world_size", [2, 4])
def test_many_calls_in_a_row(worlds, world_size):
    assert worlds(world_size).run(rank_checks.check_many_calls, 200, 11, SMALL_BUFFER) == [200] * world_size


@pytest.mark.parametrize("algo", ["flat", "tree"])
def test_zero_copy(worlds, algo):
    digests = worlds(3).run(rank_checks.check_zero_copy, algo, 3001, 5)
    assert len(set(digests)) == 1
