"""MoE dispatch + combine on CPU worlds (Triton interpreter on shared memory, and the gloo transport)
against a float64 per-token loop: random routings, all tokens to one rank, all dropped, duplicate
ids, token counts that differ between ranks (0 too), any placement, fp8 dispatch, both modes."""
import dataclasses

import pytest

from . import moe_checks

BASE = dict(num_experts=6, hidden=100, max_tokens=40, topk=3)
WIDE = dict(BASE, hidden=200)  # two chunks of channels per row in the interpreter
# (tokens per rank, routing, with residual): one dispatcher runs the cases in a row.
CASES = {
    2: [([7, 33], "random", True), ([1, 0], "uniform", False), ([33, 7], "one_rank", False),
        ([7, 7], "dropped", True), ([7, 1], "duplicates", False)],
    3: [([7, 0, 33], "duplicates", True)],
    4: [([7, 1, 5, 3], "random", True)],
}


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_peer_graph_mode_matches_float64_loop(worlds, world_size):
    dtype = {2: "bfloat16", 3: "float16", 4: "bfloat16"}[world_size]
    worlds(world_size).run(moe_checks.check_round, dict(BASE, dtype=dtype), CASES[world_size], 11)


def test_exact_mode_any_placement_aligned_fp32(worlds):
    """Experts scattered over the ranks (not blocks), expert-major blocks padded to 4 rows."""
    kwargs = dict(WIDE, mode="exact", placement=[1, 0, 0, 1, 1, 0], align=4, dtype="float32")
    worlds(2).run(moe_checks.check_round, kwargs, [([33, 7], "random", True), ([0, 5], "duplicates", False)], 12)


def test_333_tokens(worlds):
    kwargs = dict(num_experts=4, hidden=16, max_tokens=333, topk=2)
    worlds(2).run(moe_checks.check_round, kwargs, [([333, 100], "random", True)], 13)


def test_fp8_dispatch(worlds):
    """e4m3 rows with one scale per 128 channels (hidden 200: a partial last group)."""
    kwargs = dict(WIDE, fp8=True)
    worlds(2).run(moe_checks.check_round, kwargs, [([7, 33], "random", True)], 14)


@pytest.mark.parametrize("fp8", [False, True])
def test_nccl_transport_on_gloo(worlds, fp8):
    kwargs = dict(BASE, mode="exact", transport="nccl", fp8=fp8, placement=[2, 0, 1, 1, 0, 2], align=2)
    worlds(3).run(moe_checks.check_round, kwargs, CASES[3] + [([3, 5, 1], "one_rank", False)], 15)


def test_combine_bitwise_identical_whatever_the_arrival_order(worlds):
    """The same round with other program counts (another map of items to programs; a combine whose every
    program pushes, then sums) and with ranks delayed in turn: the outputs must not change by one bit."""
    from shardkit.kernels.moe.launch_config import moe_launch_config

    unified = dataclasses.replace(moe_launch_config(40, 100, 2, False, 0, interpret=True), programs=3,
                                  combine_pushers=3)
    case = [([7, 5, 9], "random", True)]
    runs = [worlds(3).run(moe_checks.check_round, dict(BASE, **grid), case, 16, delays)
            for grid, delays in ((dict(programs=2), [0.0, 0.0, 0.0]), (dict(programs=3), [0.6, 0.0, 0.3]),
                                 (dict(programs=1), [0.0, 0.5, 0.0]), (dict(launch_config=unified), [0.0, 0.0, 0.4]))]
    assert all(r == runs[0] for r in runs[1:])


def test_static_buffers_with_changing_routing(worlds):
    """The CUDA-graph test's rounds (host-sync-free experts, static inputs rewritten between rounds)
    eagerly on a CPU world."""
    for worst in worlds(2).run(moe_checks.graph_replays, dict(BASE), 9, 6, 17):
        assert worst < 1.0, worst


def test_peer_and_nccl_transports_lay_out_rounds_alike(worlds):
    kwargs = dict(BASE, placement=[2, 0, 1, 1, 0, 2], align=2)
    worlds(3).run(moe_checks.compare_transports, kwargs, [9, 0, 33], "duplicates", 18)


def test_launch_grids_do_not_change_the_result(worlds):
    """Other grids (items of several chunks, a partial last item; other token blocks; more layout chunks,
    33 of one token: the counts exchange scans them in three tiles; a combine whose every program pushes,
    then sums; a pipelined combine: its summers wait before the chunk loop) give bitwise the same round;
    hidden 300 is three chunks of 128 channels, the last one partial."""
    from shardkit.kernels.moe.launch_config import moe_launch_config

    default = moe_launch_config(40, 300, 2, False, 0, interpret=True)
    grids = [default, dataclasses.replace(default, dispatch_item_chunks=2, combine_item_chunks=2, combine_stages=2),
             dataclasses.replace(default, dispatch_item_chunks=3, combine_item_chunks=5, dispatch_block_t=8,
                                 combine_block_t=4, combine_block_h=64, meta_t=4, layout_block_t=2,
                                 layout_programs=8, programs=3),
             dataclasses.replace(default, programs=3, combine_pushers=3, combine_block_t=8, layout_block_t=1,
                                 layout_programs=64)]
    case = [([33, 7], "random", True)]
    runs = [worlds(2).run(moe_checks.check_round, dict(BASE, hidden=300, launch_config=g), case, 19) for g in grids]
    assert all(r == runs[0] for r in runs[1:])
