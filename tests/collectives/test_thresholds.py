"""Auto-selection tables: lookups with fallbacks, and round trips through the writers."""
import json

from shardkit.collectives import thresholds

TABLE = {
    "default": {"default": [[1024, "flat"], [None, "nccl"]], "2": [[4096, "flat"], [None, "tree"]]},
    "GPU-X": {"4": [[2048, "flat"], [65536, "tree"], [None, "nccl"]]},
    "ring_pass_q_miss_rate": {"GPU-X": {"4": 0.3}},
}


def test_all_reduce_rules_fall_back_to_defaults():
    assert thresholds.select_rules("GPU-X", 4, TABLE) == [(2048, "flat"), (65536, "tree"), (None, "nccl")]
    assert thresholds.select_rules("GPU-Y", 2, TABLE) == [(4096, "flat"), (None, "tree")]
    assert thresholds.select_rules("GPU-Y", 8, TABLE) == [(1024, "flat"), (None, "nccl")]
    rules = thresholds.select_rules("GPU-X", 4, TABLE)
    assert [thresholds.choose(rules, n) for n in (1, 2048, 2049, 65536, 1 << 30)] == \
        ["flat", "flat", "tree", "tree", "nccl"]


def test_pass_q_threshold_measured_or_meta_default():
    assert thresholds.pass_q_miss_rate("GPU-X", 4, TABLE) == 0.3
    assert thresholds.pass_q_miss_rate("GPU-X", 2, TABLE) == thresholds.DEFAULT_PASS_Q_MISS_RATE
    assert thresholds.pass_q_miss_rate("cpu", 4, TABLE) == 0.05


def test_writers_round_trip(tmp_path):
    path = str(tmp_path / "t.json")
    with open(path, "w") as f:
        json.dump(TABLE, f)
    thresholds.write_rules("GPU-Z", 2, [(512, "flat"), (None, "nccl")], path=path)
    thresholds.write_pass_q_miss_rate("GPU-Z", 2, 0.25, path=path)
    table = thresholds.load_table(path)
    assert thresholds.select_rules("GPU-Z", 2, table) == [(512, "flat"), (None, "nccl")]
    assert thresholds.pass_q_miss_rate("GPU-Z", 2, table) == 0.25
    assert thresholds.select_rules("GPU-X", 4, table) == thresholds.select_rules("GPU-X", 4, TABLE)
    thresholds.load_table.cache_clear()
