"""Fused all-reduce + residual add + RMSNorm on CPU worlds (Triton interpreter on shared memory)
against a float64 reference; bad inputs, ranks that disagree, and the torch op."""
import pytest
import torch

from . import rmsnorm_checks

# Hidden sizes that are not powers of two (masked columns, padded workspace rows); 17 tokens exceed
# the 4 KiB workspace below in fp32 (one-shot) and in every dtype (two-shot): chunked.
CASES = [(1, 100), (3, 96), (17, 100)]
TINY_BUFFER = 4096


# Every world size and every dtype once: the interpreter is slow, and the kernels' dtype handling does
# not depend on the world size.
@pytest.mark.parametrize("world_size, dtype", [(2, "float32"), (3, "float16"), (4, "bfloat16")])
def test_matches_float64_reference(worlds, world_size, dtype):
    digests = worlds(world_size).run(rmsnorm_checks.check_fused, dtype, CASES, ["flat", "tree"], TINY_BUFFER,
                                     5)
    assert all(d == digests[0] for d in digests), "ranks got different bits"


def test_auto_and_nccl_algos_match_reference(worlds):
    errors = worlds(3).run(rmsnorm_checks.check_auto_and_nccl, 5, 100, 3)
    assert all(e < 1e-4 for e in errors), errors  # not max(): it skips a NaN that is not first


def test_bad_inputs_raise_clear_errors(worlds):
    messages = worlds(2).run(rmsnorm_checks.bad_inputs)[0]
    expected = ["int32", "contiguous", "residual must have x's shape", "residual must have", "weight must be [hidden]",
                "weight must be", "eps", "algo must be one of", "out must have x's shape", "different buffers",
                "exceeds", "does not fit the epoch buffer", "0-d"]
    assert len(messages) == len(expected)
    for text, message in zip(expected, messages):
        assert text in message, (text, message)


@pytest.mark.parametrize("algo", ["flat", "tree"])
def test_ranks_disagreeing_all_raise(worlds, algo):
    for m in worlds(2).run(rmsnorm_checks.mismatched_tokens, algo, timeout=120):
        assert "different element count" in m and "Create a new Communicator" in m, m


def test_row_wait_that_cannot_finish_raises_instead_of_hanging(worlds):
    for m in worlds(2).run(rmsnorm_checks.programs_that_cannot_all_run, timeout=120):
        assert "programs of this rank's own launch did not all run" in m, m


def test_op_matches_method_and_compiles(worlds):
    errors = worlds(2).run(rmsnorm_checks.op_matches_method, 5, 96, 9)
    assert all(e == 0.0 for e in errors), errors


def test_fake_impl_gives_shapes_and_dtypes():
    import shardkit.ops  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5, dtype=torch.bfloat16)
        out, res_out = torch.ops.shardkit.all_reduce_residual_rmsnorm(x, x, torch.empty(5, dtype=torch.bfloat16),
                                                                      "any-group", 1e-6, "auto")
    assert out.shape == res_out.shape == (3, 5) and out.dtype == res_out.dtype == torch.bfloat16
