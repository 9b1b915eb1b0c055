"""Auto-selection tables, measured per (device, world size), in ``thresholds.json`` beside this file.

* all-reduce: algorithm by message size; ``bench/all_reduce_sweep.py --write-thresholds`` rewrites
  the entry of the GPU it ran on from measured crossovers.
* fused all-reduce + residual + RMSNorm: the x size from which the two-shot kernel beats the
  one-shot one (key ``"rmsnorm_twoshot_min_bytes"``); ``bench/all_reduce_rmsnorm_bench.py
  --write-thresholds`` stores it. Where none was measured, the all-reduce rule decides (flat ->
  one-shot).
* ring attention: the KV-cache miss rate below which pass-Q beats pass-KV (key
  ``"ring_pass_q_miss_rate"``); ``bench/ring_attention_bench.py --write-thresholds`` stores it.
  Where none was measured for a device and group size, Meta's cost model decides with the
  device's measured rates (key ``"ring_model"``: ``attention_tflops`` from
  ``bench/attention_chunk_bench.py``, ``p2p_gbps`` from ``bench/ring_transfer_bench.py``, both
  ``--write-thresholds``); unknown devices get Meta's 5%.
* ring attention's local chunk kernel: the fastest of the Triton kernel and torch's SDPA
  kernels with the LSE (key ``"chunk_backend"``); ``bench/attention_chunk_bench.py
  --write-thresholds`` stores it. Unknown GPUs get torch's flash kernel where available; CPU
  runs get the Triton kernel (the interpreter runs the kernels under test).
"""
from __future__ import annotations

import functools
import json
import os

PATH = os.path.join(os.path.dirname(__file__), "thresholds.json")
ALGOS = ("flat", "tree", "nccl")


@functools.lru_cache(maxsize=None)
def load_table(path: str = PATH) -> dict:
    with open(path) as f:
        return json.load(f)


def _store(table: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    load_table.cache_clear()


def select_rules(device_name: str, world_size: int, table: dict | None = None) -> list[tuple[int | None, str]]:
    """The [(max_bytes or None, algo)] rules for a device name and world size (falling back to defaults)."""
    table = load_table() if table is None else table
    per_device = table.get(device_name, table["default"])
    rules = per_device.get(str(world_size), per_device.get("default", table["default"]["default"]))
    return [(None if b is None else int(b), a) for b, a in rules]


def choose(rules: list[tuple[int | None, str]], nbytes: int) -> str:
    """The first algorithm whose max_bytes admits ``nbytes``."""
    for max_bytes, algo in rules:
        if max_bytes is None or nbytes <= max_bytes:
            return algo
    return rules[-1][1]


def write_rules(device_name: str, world_size: int, rules: list[tuple[int | None, str]], path: str = PATH) -> None:
    """Store measured rules for a device and world size in the table file."""
    table = dict(load_table(path))
    entry = dict(table.get(device_name, {}))
    entry[str(world_size)] = [[b, a] for b, a in rules]
    table[device_name] = entry
    _store(table, path)


RING_KEY = "ring_pass_q_miss_rate"
DEFAULT_PASS_Q_MISS_RATE = 0.05  # Meta (arXiv 2411.01783), H100 hosts


def _per_world(key: str, device_name: str, world_size: int, table: dict | None) -> float | None:
    """table[key][device_name][world_size] (or its "default"), or None."""
    table = load_table() if table is None else table
    per_device = table.get(key, {}).get(device_name, {})
    value = per_device.get(str(world_size), per_device.get("default"))
    return None if value is None else float(value)


def _write_per_world(key: str, device_name: str, world_size: int, value: float, path: str) -> None:
    table = dict(load_table(path))
    entries = dict(table.get(key, {}))
    entries[device_name] = {**entries.get(device_name, {}), str(world_size): value}
    table[key] = entries
    _store(table, path)


def measured_pass_q_miss_rate(device_name: str, world_size: int, table: dict | None = None) -> float | None:
    """The measured pass-Q / pass-KV crossover for a device and world size, or None."""
    return _per_world(RING_KEY, device_name, world_size, table)


def pass_q_miss_rate(device_name: str, world_size: int, table: dict | None = None) -> float:
    """The measured pass-Q / pass-KV crossover for a device and world size, else Meta's 5%."""
    value = measured_pass_q_miss_rate(device_name, world_size, table)
    return DEFAULT_PASS_Q_MISS_RATE if value is None else value


RING_MODEL_KEY = "ring_model"


def ring_costs(device_name: str, table: dict | None = None) -> dict | None:
    """The measured rates of a device for Meta's ring cost model (``{"attention_tflops": ...,
    "p2p_gbps": ...}``, the fields of ``collectives.attention.variant.RingCosts``), or None if
    either is missing."""
    table = load_table() if table is None else table
    entry = table.get(RING_MODEL_KEY, {}).get(device_name, {})
    if "attention_tflops" not in entry or "p2p_gbps" not in entry:
        return None
    return {"attention_tflops": float(entry["attention_tflops"]), "p2p_gbps": float(entry["p2p_gbps"])}


def ring_variant_rule(device_name: str, world_size: int, table: dict | None = None) -> tuple[float, dict | None]:
    """How ``ring_attention(variant="auto")`` decides on a device and group size:
    ``(threshold, None)`` for a measured crossover, ``(5%, costs)`` for Meta's cost model with the
    device's measured rates (the threshold unused), ``(5%, None)`` for Meta's published rule."""
    measured = measured_pass_q_miss_rate(device_name, world_size, table)
    if measured is not None:
        return measured, None
    return DEFAULT_PASS_Q_MISS_RATE, ring_costs(device_name, table)


def write_ring_costs(device_name: str, path: str = PATH, **rates: float) -> None:
    """Store measured ``attention_tflops`` and/or ``p2p_gbps`` of a device for the ring cost model."""
    unknown = set(rates) - {"attention_tflops", "p2p_gbps"}
    if unknown:
        raise ValueError(f"unknown ring_model rates {sorted(unknown)}")
    table = dict(load_table(path))
    models = dict(table.get(RING_MODEL_KEY, {}))
    models[device_name] = {**models.get(device_name, {}), **{k: round(float(v), 1) for k, v in rates.items()}}
    table[RING_MODEL_KEY] = models
    _store(table, path)


def write_pass_q_miss_rate(device_name: str, world_size: int, miss_rate: float, path: str = PATH) -> None:
    """Store a measured pass-Q / pass-KV crossover."""
    _write_per_world(RING_KEY, device_name, world_size, float(miss_rate), path)


RMSNORM_KEY = "rmsnorm_twoshot_min_bytes"


def rmsnorm_twoshot_min_bytes(device_name: str, world_size: int, table: dict | None = None) -> int | None:
    """Bytes of x from which the fused all-reduce + RMSNorm's two-shot kernel was measured faster
    than its one-shot kernel on a device and world size, or None if not measured."""
    value = _per_world(RMSNORM_KEY, device_name, world_size, table)
    return None if value is None else int(value)


def write_rmsnorm_twoshot_min_bytes(device_name: str, world_size: int, nbytes: int, path: str = PATH) -> None:
    """Store the measured one-shot / two-shot crossover of the fused kernels."""
    _write_per_world(RMSNORM_KEY, device_name, world_size, int(nbytes), path)


CHUNK_KEY = "chunk_backend"


def chunk_backend(device_name: str, available: tuple, table: dict | None = None) -> str:
    """The local attention kernel for ring attention on a device: the measured winner if it is
    ``available`` (SDPA backends of this torch for the dtype), else "flash" on GPUs that have
    it, else "triton". ``device_name`` "cpu" always gets "triton"."""
    if device_name == "cpu":
        return "triton"
    table = load_table() if table is None else table
    best = table.get(CHUNK_KEY, {}).get(device_name)
    if best == "triton" or best in available:
        return best
    return "flash" if "flash" in available else "triton"


def write_chunk_backend(device_name: str, backend: str, path: str = PATH) -> None:
    """Store the measured fastest local attention kernel of a device."""
    table = dict(load_table(path))
    table[CHUNK_KEY] = {**table.get(CHUNK_KEY, {}), device_name: backend}
    _store(table, path)
