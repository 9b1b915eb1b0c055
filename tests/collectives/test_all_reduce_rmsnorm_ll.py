"""The LL fused all-reduce + residual + RMSNorm is a CUDA kernel only (csrc/dda/ll_rmsnorm.cu; its tests:
csrc/tests and test_all_reduce_rmsnorm_ll_gpu.py). On the Triton kernels the Communicator names what
algo="ll" needs; a world of one runs it as add + RMSNorm (test_world_one.py)."""
from . import rmsnorm_ll_checks


def test_ll_without_cuda_kernels_raises(worlds):
    for message in worlds(2).run(rmsnorm_ll_checks.ll_without_cuda_kernels):
        assert "all_reduce_residual_rmsnorm(algo='ll') needs the CUDA kernels" in message, message
