"""torch.ops.shardkit.moe_dispatch / moe_combine on a CPU world, and their fake implementations."""
import pytest

from . import moe_checks

SMALL = dict(num_experts=4, hidden=32, max_tokens=8, topk=2)


@pytest.mark.parametrize("mode", ["graph", "exact"])
def test_ops_match_float64_loop(worlds, mode):
    rows = worlds(2).run(moe_checks.check_ops, dict(SMALL, mode=mode), [5, 8], 21)
    if mode == "graph":
        assert rows[0] == [16, 32]  # capacity: world * max_tokens rows, topk expert rows each
