"""Auto-selection tables: lookups with fallbacks, and round trips through the writers."""
import json

import pytest

from shardkit import thresholds

TABLE = {
    "all_reduce": {
        "default": {"default": [[1024, "flat"], [None, "nccl"]], "2": [[4096, "flat"], [None, "tree"]]},
        "GPU-X": {"4": [[2048, "flat"], [65536, "tree"], [None, "nccl"]]},
    },
    "rmsnorm": {"tree_min_bytes": {"GPU-X": {"4": 524288}}},
    "ring": {
        "pass_q_miss_rate": {"GPU-X": {"4": 0.3}},
        "model": {"GPU-X": {"attention_tflops": 500.0, "p2p_gbps": 250.0}, "GPU-Y": {"p2p_gbps": 100.0}},
        "chunk_backend": {"GPU-X": "cudnn"},
    },
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


def test_ring_variant_rule_precedence():
    # A measured crossover first; else the cost model if both rates were measured; else Meta's 5%.
    assert thresholds.ring_variant_rule("GPU-X", 4, TABLE) == (0.3, None)
    assert thresholds.ring_variant_rule("GPU-X", 2, TABLE) == (0.05, {"attention_tflops": 500.0, "p2p_gbps": 250.0})
    assert thresholds.ring_variant_rule("GPU-Y", 2, TABLE) == (0.05, None)  # one rate only
    assert thresholds.ring_variant_rule("cpu", 2, TABLE) == (0.05, None)


def test_rmsnorm_tree_crossover_measured_or_none():
    assert thresholds.rmsnorm_tree_min_bytes("GPU-X", 4, TABLE) == 524288
    assert thresholds.rmsnorm_tree_min_bytes("GPU-X", 2, TABLE) is None
    assert thresholds.rmsnorm_tree_min_bytes("GPU-Y", 4, TABLE) is None


def test_chunk_backend_choice():
    assert thresholds.chunk_backend("GPU-X", ("flash", "cudnn"), TABLE) == "cudnn"
    assert thresholds.chunk_backend("GPU-X", ("flash",), TABLE) == "flash"   # measured one not available
    assert thresholds.chunk_backend("GPU-Y", ("flash", "cudnn"), TABLE) == "flash"
    assert thresholds.chunk_backend("GPU-Y", (), TABLE) == "triton"
    assert thresholds.chunk_backend("cpu", ("flash",), TABLE) == "triton"


def test_writers_round_trip(tmp_path):
    path = str(tmp_path / "t.json")
    with open(path, "w") as f:
        json.dump(TABLE, f)
    thresholds.write_rules("GPU-Z", 2, [(512, "flat"), (None, "nccl")], path=path)
    thresholds.write_pass_q_miss_rate("GPU-Z", 2, 0.25, path=path)
    thresholds.write_ring_costs("GPU-Z", path=path, attention_tflops=401.23)
    assert thresholds.ring_costs("GPU-Z", thresholds.load_table(path)) is None  # one rate is not a model
    thresholds.write_ring_costs("GPU-Z", path=path, p2p_gbps=99.0)
    thresholds.write_chunk_backend("GPU-Z", "flash", path=path)
    thresholds.write_rmsnorm_tree_min_bytes("GPU-Z", 2, 1 << 20, path=path)
    table = thresholds.load_table(path)
    assert thresholds.rmsnorm_tree_min_bytes("GPU-Z", 2, table) == 1 << 20
    assert thresholds.select_rules("GPU-Z", 2, table) == [(512, "flat"), (None, "nccl")]
    assert thresholds.pass_q_miss_rate("GPU-Z", 2, table) == 0.25
    assert thresholds.ring_costs("GPU-Z", table) == {"attention_tflops": 401.2, "p2p_gbps": 99.0}
    assert thresholds.chunk_backend("GPU-Z", ("flash", "cudnn"), table) == "flash"
    assert thresholds.select_rules("GPU-X", 4, table) == thresholds.select_rules("GPU-X", 4, TABLE)
    assert set(table) == set(TABLE)  # every entry under its feature
    thresholds.load_table.cache_clear()


def test_shipped_table_is_keyed_by_feature():
    table = thresholds.load_table()
    assert {"all_reduce", "rmsnorm", "ring"} <= set(table)
    for device, worlds in table["all_reduce"].items():
        for world, rules in worlds.items():
            assert rules[-1][0] is None and all(a in thresholds.ALGOS for _, a in rules), (device, world)


def test_write_ring_costs_rejects_unknown_rates(tmp_path):
    with pytest.raises(ValueError, match="unknown ring_model rates"):
        thresholds.write_ring_costs("GPU-Z", path=str(tmp_path / "t.json"), tflops=1.0)


def test_best_threshold_fit():
    from bench.ring_attention_bench import best_threshold

    def rows(q_wins):
        return [{"miss_rate": r, "pass_kv_ms": 10.0, "pass_q_ms": 9.0 if w else 11.0} for r, w in q_wins]

    assert best_threshold(rows([(0.01, True), (0.1, True), (0.5, False), (1.0, False)])) == 0.3
    assert best_threshold(rows([(0.01, False), (1.0, False)])) == 0.0
    assert best_threshold(rows([(0.01, True), (1.0, True)])) == 1.0
    # One point against the trend (pass-Q slower at the smallest miss rate only) does not pull the
    # threshold to 0 when pass-Q wins clearly at the next three.
    noisy = rows([(0.005, False), (0.01, True), (0.05, True), (0.2, True), (0.5, False), (1.0, False)])
    assert best_threshold(noisy) == 0.35


def test_rmsnorm_crossover_fit():
    from bench.all_reduce_rmsnorm_bench import tree_min_bytes

    def records(points):  # (tokens, hidden, one-shot us, two-shot us), 2-byte elements
        return [{"mode": "graph", "tokens": t, "hidden": h, "bytes": 2 * t * h, "variant": v, "us_median": us}
                for t, h, one, two in points for v, us in (("fused_flat", one), ("fused_tree", two))]

    assert tree_min_bytes(records([(1, 4096, 6.0, 9.0), (64, 4096, 12.0, 10.0), (64, 8192, 17.0, 13.0)])) \
        == 2 * 64 * 4096
    # Two shapes of one size count together; two-shot never ahead: twice the largest size.
    assert tree_min_bytes(records([(16, 8192, 9.0, 15.0), (32, 4096, 9.0, 15.0)])) == 2 * 2 * 16 * 8192
    assert tree_min_bytes([]) is None


def test_sweep_rules_take_copy_where_fastest():
    """bench/all_reduce_sweep.derive_rules: the fastest of flat/tree/ll/copy/nccl per size in graph mode
    (copy timed on the default communicator, as auto would run it), merged into ranges."""
    from bench.all_reduce_sweep import derive_rules

    def rec(impl, nbytes, us, mode="graph"):
        return {"impl": impl, "mode": mode, "params": {"bytes": nbytes}, "us_median": us}

    mib = 1 << 20
    records = [rec("ll_cuda", 1024, 4.0), rec("flat_cuda", 1024, 5.0), rec("copy", 1024, 40.0),
               rec("flat_cuda", 16 * mib, 60.0), rec("copy", 16 * mib, 55.0), rec("nccl", 16 * mib, 80.0),
               rec("flat_cuda", 64 * mib, 250.0), rec("copy", 64 * mib, 190.0), rec("nccl", 64 * mib, 250.0),
               rec("copy", 256 * mib, None), rec("nccl", 256 * mib, 900.0), rec("copy_zc", 256 * mib, 1.0),
               rec("copy", 256 * mib, 1.0, mode="eager")]
    assert derive_rules(records, "cuda") == [(1024, "ll"), (64 * mib, "copy"), (None, "nccl")]
    assert derive_rules(records, "cuda", "eager") == [(None, "copy")]  # the eager records alone
    records[9] = rec("copy", 256 * mib, 700.0)
    assert derive_rules(records, "cuda") == [(1024, "ll"), (None, "copy")]


def test_sweep_rules_spliced_into_the_stored_ones():
    """A sweep from 16 MiB on refits the rules from 16 MiB on and keeps the stored ones below."""
    from bench.all_reduce_sweep import splice_rules

    mib = 1 << 20
    old = [(256 << 10, "ll"), (16 * mib, "flat"), (None, "nccl")]
    assert splice_rules(old, [(16 * mib, "flat"), (None, "copy")], 16 * mib) == \
        [(256 << 10, "ll"), (16 * mib, "flat"), (None, "copy")]
    assert splice_rules(old, [(None, "copy")], 16 * mib) == [(256 << 10, "ll"), (16 * mib - 1, "flat"), (None, "copy")]
    assert splice_rules(old, [(None, "copy")], 4 * mib) == [(256 << 10, "ll"), (4 * mib - 1, "flat"), (None, "copy")]
    assert splice_rules(old, [(4096, "ll"), (None, "tree")], 1024) == [(4096, "ll"), (None, "tree")]
    assert splice_rules([(None, "nccl")], [(None, "copy")], 16 * mib) == [(16 * mib - 1, "nccl"), (None, "copy")]


def test_eager_rules_where_measured_and_the_host_path_rules():
    """all_reduce_eager rules apply where stored for the device and world size, else the graph ones; the
    C++ host path gets the sizes where both modes agree and hands the others back ("nccl")."""
    mib = 1 << 20
    table = json.loads(json.dumps(TABLE))
    table["all_reduce_eager"] = {"GPU-X": {"4": [[2048, "flat"], [None, "tree"]]}}
    assert thresholds.select_rules("GPU-X", 4, table, mode="eager") == [(2048, "flat"), (None, "tree")]
    assert thresholds.select_rules("GPU-X", 2, table, mode="eager") == thresholds.select_rules("GPU-X", 2, table)
    assert thresholds.select_rules("GPU-Y", 4, TABLE, mode="eager") == thresholds.select_rules("GPU-Y", 4, TABLE)
    with pytest.raises(ValueError, match="mode must be"):
        thresholds.select_rules("GPU-X", 4, table, mode="graphs")
    graph = [(256 << 10, "ll"), (8 * mib, "flat"), (None, "copy")]
    eager = [(256 << 10, "ll"), (32 * mib, "flat"), (None, "copy")]
    assert thresholds.agreed_rules(graph, eager) == [(256 << 10, "ll"), (8 * mib, "flat"), (32 * mib, "nccl"),
                                                     (None, "copy")]
    assert thresholds.agreed_rules(graph, graph) == graph
    assert thresholds.agreed_rules([(None, "copy")], [(1024, "flat"), (None, "copy")]) == [(1024, "nccl"),
                                                                                           (None, "copy")]


def test_eager_rules_round_trip(tmp_path):
    path = str(tmp_path / "t.json")
    with open(path, "w") as f:
        json.dump(TABLE, f)
    thresholds.write_rules("GPU-Z", 2, [(512, "flat"), (None, "copy")], path=path, mode="eager")
    table = thresholds.load_table(path)
    assert thresholds.select_rules("GPU-Z", 2, table, mode="eager") == [(512, "flat"), (None, "copy")]
    assert thresholds.select_rules("GPU-Z", 2, table) == thresholds.select_rules("GPU-Z", 2, TABLE)
    thresholds.load_table.cache_clear()
