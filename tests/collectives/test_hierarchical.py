"""Hierarchical all-reduce (nodes x local ranks) on emulated nodes: CPU 2 nodes x 2 processes
(gloo across, shared memory inside), GPU 2 processes as 2 one-GPU nodes (NCCL across)."""
import pytest

from ..conftest import gpu_count
from . import hierarchical_checks


@pytest.mark.parametrize("use_mesh,dtype,sizes", [
    (True, "float32", [7, 3001]),   # DeviceMesh (node, local); 3001 fp32 goes in call-chunks of 8 KiB
    (False, "bfloat16", [1000]),    # explicit groups
])
def test_two_nodes_of_two_match_float64(worlds, use_mesh, dtype, sizes):
    digests = worlds(4).run(hierarchical_checks.check_hierarchical, 2, dtype, sizes, 8192, use_mesh, 8)
    assert all(d == digests[0] for d in digests), "ranks got different bits"


def test_bad_inputs_raise(worlds):
    for messages in worlds(4).run(hierarchical_checks.hierarchical_bad_inputs, 2):
        assert "algo must be one of" in messages[0] and "x must be float32" in messages[1]
        assert "out must have x's shape" in messages[2] and "both intra_group and inter_group" in messages[3]
        assert "full_max_bytes" in messages[4]


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 2, reason="needs 2+ CUDA GPUs")
def test_gpu_two_one_gpu_nodes(worlds):
    digests = worlds(2, "nccl").run(hierarchical_checks.check_hierarchical, 2, "bfloat16",
                                    [1, 4099, 3_000_017], 1 << 20, True, 9)
    assert all(d == digests[0] for d in digests), "ranks got different bits"
