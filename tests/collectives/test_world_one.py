"""A world of one rank: the all-reduce is a copy and the fused op an add + RMSNorm, for every algo
(the kernels, CUDA ones above all, need two ranks)."""
import pytest
import torch
import torch.distributed as dist

from shardkit import Communicator
from shardkit.collectives.communicator import ALGOS
from shardkit.reference.all_reduce import all_reduce_residual_rmsnorm_reference, rank_inputs

from ..conftest import gpu_count
from ..tolerances import ROUNDING, tol
from .rank_checks import DTYPES, device


def world_of_one(dtype_name: str, n: int, tokens: int, hidden: int, kernels: str = "auto") -> int:
    """Every algo of both ops on a world of 1 against float64, outputs poisoned first; returns the
    number of calls checked."""
    assert dist.get_world_size() == 1
    dtype = DTYPES[dtype_name]
    comm = Communicator(kernels=kernels)
    calls = 0
    try:
        x = rank_inputs(1, n, dtype, seed=n, device=device())[0]
        x_before = x.clone()
        for algo in ALGOS:
            out = torch.full_like(x, float("nan"))
            assert comm.all_reduce(x, algo=algo, out=out) is out
            assert torch.equal(out, x) and torch.equal(x, x_before), algo
            assert torch.equal(comm.all_reduce(x, algo=algo), x), algo
            inplace = x.clone()
            assert comm.all_reduce_(inplace, algo=algo) is inplace and torch.equal(inplace, x), algo
            staged = comm.staging_buffer(x.shape, dtype)
            staged.copy_(x)
            assert torch.equal(comm.all_reduce(staged, algo=algo), x), algo
            calls += 4

        xs = [t.view(tokens, hidden) for t in rank_inputs(1, tokens * hidden, dtype, seed=1, device=device())]
        residual = rank_inputs(1, tokens * hidden, dtype, seed=2, device=device())[0].view(tokens, hidden)
        weight = rank_inputs(1, hidden, dtype, seed=3, device=device())[0]
        ref_out, ref_res = all_reduce_residual_rmsnorm_reference(xs, residual, weight, 1e-5)
        for algo in Communicator.RMSNORM_ALGOS:
            out, res_out = torch.full_like(xs[0], float("nan")), torch.full_like(xs[0], float("nan"))
            comm.all_reduce_residual_rmsnorm(xs[0], residual, weight, 1e-5, algo, out=out, residual_out=res_out)
            torch.testing.assert_close(res_out.double(), ref_res, **tol(ROUNDING, dtype), msg=lambda m: f"{algo}: {m}")
            # out is normed from residual_out rounded to the dtype: two roundings
            atol, rtol = (2 * v for v in ROUNDING[dtype])
            torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol, msg=lambda m: f"{algo}: {m}")
            calls += 1
    finally:
        comm.close()
    return calls


CALLS = 4 * len(ALGOS) + len(Communicator.RMSNORM_ALGOS)  # calls per world_of_one


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_world_of_one_is_a_copy(worlds, dtype_name):
    assert worlds(1).run(world_of_one, dtype_name, 1000, 5, 96) == [CALLS]


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a GPU")
@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_world_of_one_gpu(worlds, kernels):
    from shardkit.kernels.all_reduce import cuda as cuda_dda

    if kernels == "cuda" and not cuda_dda.available():
        pytest.skip("CUDA library not built")
    assert worlds(1, "nccl").run(world_of_one, "bfloat16", 1 << 20, 64, 4096, kernels) == [CALLS]
