"""MoE dispatch + combine on GPUs (NCCL group, torch symmetric memory): the CPU checks at GPU sizes,
fp8, the NCCL transport, bitwise reproducibility, CUDA-graph replays with the routing changing
between replays, and the error paths. Skipped without 2 GPUs.

    pytest -q -m gpu tests/moe/test_moe_gpu.py
"""
import pytest

from ..conftest import gpu_count
from . import moe_checks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() < 2, reason="needs 2+ CUDA GPUs")]

GPU = dict(num_experts=16, hidden=2048, max_tokens=512, topk=4)
CASES = [([1, 7], "random", True), ([333, 512], "uniform", False), ([512, 0], "one_rank", True),
         ([64, 64], "dropped", True), ([100, 200], "duplicates", False)]


@pytest.mark.parametrize("mode,dtype", [("graph", "bfloat16"), ("exact", "bfloat16"), ("graph", "float32")])
def test_matches_float64_loop(worlds, mode, dtype):
    digests = worlds(2, "nccl").run(moe_checks.check_round, dict(GPU, mode=mode, dtype=dtype), CASES, 31)
    assert len(digests[0]) == len(CASES)


def test_deepseek_shape_fp8_and_any_placement(worlds):
    """hidden 7168, 256 experts scattered over the ranks, top-8, fp8 dispatch, aligned expert blocks."""
    kwargs = dict(num_experts=256, hidden=7168, max_tokens=256, topk=8, fp8=True, align=16,
                  placement=[(e * 7) % 2 for e in range(256)])
    worlds(2, "nccl").run(moe_checks.check_round, kwargs, [([256, 33], "uniform", True), ([1, 0], "random", False)], 32)


def test_nccl_transport(worlds):
    kwargs = dict(GPU, mode="exact", transport="nccl")
    worlds(2, "nccl").run(moe_checks.check_round, kwargs, CASES[:3], 33)


def test_combine_bitwise_identical_whatever_the_arrival_order(worlds):
    runs = [worlds(2, "nccl").run(moe_checks.check_round, dict(GPU, programs=programs), CASES[1:2], 34, delays)
            for programs, delays in ((None, None), (64, [0.2, 0.0]), (7, [0.0, 0.2]))]
    assert runs[0] == runs[1] == runs[2]


def test_launch_grids_do_not_change_the_result(worlds):
    """Whole-row items (2 chunks of 1024 channels; in the combine 4 of 512 in a software-pipelined loop, 3
    cp.async stages), 3-chunk items of 512 (a partial last one), other token blocks and layout chunks, a
    combine whose every program pushes then sums (the default's pushers and summers are split at 512
    tokens): bitwise the same outputs as the default grid."""
    import dataclasses

    from shardkit.kernels.moe.launch_config import moe_launch_config

    default = moe_launch_config(GPU["max_tokens"], GPU["hidden"], 2, False, 132, interpret=False)
    grids = [None, dataclasses.replace(default, dispatch_item_chunks=2, combine_item_chunks=4, combine_block_t=8,
                                       combine_block_h=512, combine_stages=3, combine_warps=8),
             dataclasses.replace(default, dispatch_block_h=512, dispatch_item_chunks=3, combine_block_h=512,
                                 combine_item_chunks=3, dispatch_block_t=2, layout_block_t=16, layout_programs=8,
                                 programs=96, combine_pushers=96)]
    runs = [worlds(2, "nccl").run(moe_checks.check_round, dict(GPU, launch_config=g), CASES[1:3], 37) for g in grids]
    assert all(r == runs[0] for r in runs[1:])


@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_graph_replays_with_changing_routing(worlds, fp8):
    for worst in worlds(2, "nccl").run(moe_checks.graph_replays, dict(GPU, fp8=fp8), 333, 60, 35):
        assert worst < 1.0, worst


@pytest.mark.parametrize("mode", ["graph", "exact"])
def test_bad_input_on_one_rank_fails_every_rank(worlds, mode):
    kinds = ["ids_out_of_range", "dtype", "tokens_above_max", "combine_rows"]
    kwargs = dict(num_experts=4, hidden=256, max_tokens=8, topk=2, mode=mode)
    results = worlds(2, "nccl").run(moe_checks.bad_input_rounds, kinds, 1, kwargs, 36, timeout=300)
    for message in results[0]:
        assert "1" in message, message
