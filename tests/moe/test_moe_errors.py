"""Bad input to the MoE dispatcher: a clear error on every rank, never a hang, nothing out of bounds."""
import re

import pytest

from . import moe_checks

SMALL = dict(num_experts=4, hidden=32, max_tokens=8, topk=2)
DISPATCH_KINDS = ["ids_out_of_range", "ids_below_minus_one", "dtype", "hidden", "tokens_above_max", "non_contiguous",
                  "idx_dtype", "weights_shape"]
COMBINE_KINDS = ["combine_dtype", "combine_rows", "combine_residual"]


@pytest.mark.parametrize("transport", ["peer", "nccl"])
def test_bad_input_on_one_rank_fails_every_rank(worlds, transport):
    kwargs = dict(SMALL, transport=transport, mode="graph" if transport == "peer" else "exact")
    results = worlds(3).run(moe_checks.bad_input_rounds, DISPATCH_KINDS + COMBINE_KINDS, 1, kwargs, 3, timeout=600)
    culprit = dict(zip(DISPATCH_KINDS + COMBINE_KINDS, results[1]))
    expected = {"ids_out_of_range": "expert ids outside [-1, 4)", "ids_below_minus_one": "expert ids outside",
                "dtype": "x must be torch.bfloat16", "hidden": "hidden=32", "tokens_above_max": "max_tokens=8",
                "non_contiguous": "contiguous", "idx_dtype": "int32 or int64", "weights_shape": "topk_weights must be",
                "combine_dtype": "expert_out must be torch.bfloat16", "combine_rows": "expert_out must be [rows >=",
                "combine_residual": "residual must be [tokens=5"}
    for kind, text in expected.items():
        assert text in culprit[kind], (kind, culprit[kind])
    for rank in (0, 2):
        for kind, message in zip(DISPATCH_KINDS + COMBINE_KINDS, results[rank]):
            named = re.search(r"rank\(s\) \[([\d, ]*)\]", message)
            # A barrier names the rank with the other signature and any rank that had not arrived yet.
            assert named and "1" in named.group(1).split(", "), (kind, message)


def test_ranks_disagreeing_about_the_configuration_all_raise(worlds):
    kinds = ["hidden", "dtype", "placement", "topk", "mode"]
    for messages in worlds(2).run(moe_checks.config_disagreement, kinds):
        for kind, message in zip(kinds, messages):
            assert f"ranks disagree about {kind}" in message, (kind, message)


def test_bad_constructor_arguments(worlds):
    messages = worlds(2).run(moe_checks.bad_constructor_args)[0]
    expected = ["num_experts must be an int >= 1", "topk (5) exceeds", "dtype must be one of", "placement must list",
                "placement must list", "mode must be one of", "transport must be one of", "use mode='exact'",
                "align must be an int >= 1", "timeout_s must be positive", "launch_config must be a MoeLaunchConfig"]
    assert len(messages) == len(expected)
    for text, message in zip(expected, messages):
        assert text in message, (text, message)


@pytest.mark.parametrize("transport", ["peer", "nccl"])
def test_receive_capacity_exceeded_fails_every_rank(worlds, transport):
    kwargs = dict(SMALL, transport=transport, mode="exact", max_recv_tokens=4)
    results = worlds(2).run(moe_checks.bad_input_rounds, ["overflow"], 0, kwargs, 4, timeout=300)
    for messages in results:
        assert "would receive more rows than max_recv_tokens=4" in messages[0], messages


def test_absent_peer_times_out_naming_it(worlds):
    messages = worlds(2).run(moe_checks.absent_peer, 1, 1.0, timeout=300)
    assert messages[1] == ""
    assert "rank(s) [1] did not arrive" in messages[0], messages[0]


def test_bad_launch_config_names_the_field():
    import dataclasses

    from shardkit.kernels.moe.launch_config import moe_launch_config

    good = moe_launch_config(64, 7168, 2, True, 132, interpret=False)
    good.check(fp8=True)
    cases = [(dict(programs=0), "programs must be in [1, 256]"), (dict(layout_programs=512), "layout_programs"),
             (dict(combine_block_t=3), "combine_block_t must be a power of two"),
             (dict(combine_item_chunks=0), "combine_item_chunks must be an int >= 1"),
             (dict(combine_pushers=-1), "combine_pushers must be an int >= 0"),
             (dict(combine_block_h=32), "combine_block_h must be >= 64"),
             (dict(dispatch_block_h=64), "multiple of 128")]
    for change, text in cases:
        with pytest.raises(ValueError, match=re.escape(text)):
            dataclasses.replace(good, **change).check(fp8=True)
