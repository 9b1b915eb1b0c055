"""auto's LL rules for the fused all-reduce + residual + RMSNorm, one per mode (CUDA graphs: ``ll_max_bytes``,
eager: ``ll_eager_max_bytes``): fitted by the bench from its own records of that mode, stored and read back per
mode, and applied by ``Communicator._rmsnorm_auto`` to the mode of the call (the C++ host path's twin is in
test_host_path_rmsnorm.py)."""
from types import SimpleNamespace

import pytest
import torch

from bench.all_reduce_rmsnorm_bench import ll_max_bytes
from bench.records import record
from shardkit import Communicator, thresholds
from shardkit.kernels.all_reduce import cuda as cuda_dda

TOKENS = (1, 4, 16, 64)
# µs at tokens x 8192 bf16, graph / eager: ll wins in graphs up to 16 tokens, in eager mode everywhere (the
# Triton kernels pay the Python host path there).
TIMES = {"graph": {"fused_ll": (5.1, 5.3, 5.8, 24.0), "fused_flat": (6.6, 6.9, 7.9, 10.6),
                   "fused_tree": (9.7, 11.7, 13.8, 14.2)},
         "eager": {"fused_ll": (7.8, 9.1, 10.2, 30.4), "fused_flat": (50.4, 48.3, 87.9, 89.0),
                   "fused_tree": (51.8, 53.4, 95.2, 83.9)}}


def fake_records() -> list[dict]:
    return [record("all_reduce_rmsnorm", impl, gpu="NVIDIA H200", world=2, dtype=torch.bfloat16, mode=mode,
                   params={"tokens": t, "hidden": 8192, "bytes": t * 8192 * 2}, us=[us], commit="test")
            for mode, impls in TIMES.items() for impl, times in impls.items() for t, us in zip(TOKENS, times)]


def test_bench_fits_one_rule_per_mode():
    records = fake_records()
    assert ll_max_bytes(records, "graph") == 16 * 8192 * 2
    assert ll_max_bytes(records, "eager") == 64 * 8192 * 2
    assert ll_max_bytes([r for r in records if r["impl"] != "fused_ll"], "graph") is None


def test_rules_round_trip_per_mode(tmp_path):
    path = str(tmp_path / "thresholds.json")
    with open(path, "w") as f:
        f.write("{}")
    thresholds.write_rmsnorm_ll_max_bytes("NVIDIA H200", 2, 262144, path, mode="graph")
    thresholds.write_rmsnorm_ll_max_bytes("NVIDIA H200", 2, 1048576, path, mode="eager")
    table = thresholds.load_table(path)
    assert thresholds.rmsnorm_ll_max_bytes("NVIDIA H200", 2, table) == 262144
    assert thresholds.rmsnorm_ll_max_bytes("NVIDIA H200", 2, table, mode="eager") == 1048576
    assert thresholds.rmsnorm_ll_max_bytes("NVIDIA H200", 4, table, mode="eager") is None
    with pytest.raises(KeyError):
        thresholds.rmsnorm_ll_max_bytes("NVIDIA H200", 2, table, mode="graphs")


@pytest.mark.skipif(not cuda_dda.available(), reason="the CUDA library was not built (no nvcc)")
def test_auto_applies_the_rule_of_the_calls_mode():
    comm = SimpleNamespace(kernels="cuda", _rmsnorm_ll_max_bytes={"graph": 256 << 10, "eager": 1 << 20},
                           _rmsnorm_tree_min_bytes=8 << 20, rules=[])
    pick = lambda tokens, capturing: Communicator._rmsnorm_auto(  # noqa: E731
        comm, torch.empty(tokens, 8192, dtype=torch.bfloat16), capturing)
    assert [pick(t, True) for t in TOKENS] == ["ll", "ll", "ll", "flat"]
    assert [pick(t, False) for t in TOKENS] == ["ll", "ll", "ll", "ll"]  # 64 tokens: 4 LL launches
    assert pick(1024, False) == "tree"  # 16 MiB: beyond the eager rule, from the tree crossover on
    comm._rmsnorm_ll_max_bytes = {"graph": None, "eager": None}  # nothing measured: never ll
    assert pick(1, False) == "flat" and pick(1, True) == "flat"
    comm.kernels = "triton"
    comm._rmsnorm_ll_max_bytes = {"graph": 1 << 30, "eager": 1 << 30}
    assert pick(1, False) == "flat"  # the Triton kernels have no ll
