"""The LL all-reduce is a CUDA kernel only (csrc/dda/ll_all_reduce.cu; its tests: csrc/tests and
test_all_reduce_ll_gpu.py). On the Triton kernels the Communicator names what algo="ll" needs, and auto
rules that pick ll run flat."""
from . import ll_checks


def test_ll_without_cuda_kernels_raises_and_auto_runs_flat(worlds):
    for message in worlds(2).run(ll_checks.routing_without_cuda_kernels, "float32", 1003, 4):
        assert "algo='ll'" in message and "CUDA kernels" in message, message
