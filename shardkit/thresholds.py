"""Auto-selection tables, measured per (device, world size), in ``thresholds.json`` beside this file.

The table is keyed by feature first, then GPU name (``"default"`` where unmeasured), then world size:

* ``all_reduce``: algorithm by message size, ``[[max_bytes, algo], ...]`` (max_bytes null = beyond);
  ``bench/all_reduce_sweep.py --write-thresholds`` rewrites the entry of the GPU it ran on from
  measured crossovers (CUDA-graph times). ``all_reduce_eager``: the same fitted to eager times, where
  measured (GPU name -> world size only); ``auto`` applies it to calls outside a graph capture.
* ``rmsnorm`` / ``ll_max_bytes`` (CUDA graphs) and ``ll_eager_max_bytes`` (eager): the x size up to which the
  fused op's LL kernel (CUDA kernels; in row chunks where x exceeds one LL slot) beats its flat and tree kernels
  in that mode (``bench/all_reduce_rmsnorm_bench.py --write-thresholds``); none measured: ``auto`` does not pick
  it in that mode.
* ``rmsnorm`` / ``tree_min_bytes``: the x size from which the fused all-reduce + residual + RMSNorm's
  tree kernel beats its flat one (``bench/all_reduce_rmsnorm_bench.py --write-thresholds``). Where
  none was measured, the all-reduce rule decides.
* ``ring`` / ``pass_q_miss_rate``: the KV-cache miss rate below which pass-Q beats pass-KV
  (``bench/ring_attention_bench.py --write-thresholds``). Where none was measured for a device and
  group size, Meta's cost model decides with the device's measured rates (``ring`` / ``model``:
  ``attention_tflops`` from ``bench/attention_chunk_bench.py``, ``p2p_gbps`` from
  ``bench/ring_transfer_bench.py``, both ``--write-thresholds``); unknown devices get Meta's 5%.
* ``ring`` / ``chunk_backend``: ring attention's local chunk kernel, the fastest of the Triton kernel
  and torch's SDPA kernels with the LSE (``bench/attention_chunk_bench.py --write-thresholds``).
  Unknown GPUs get torch's flash kernel where available; CPU runs get the Triton kernel (the
  interpreter runs the kernels under test).

This module reads and writes the table only: it imports nothing from the rest of shardkit.
"""
from __future__ import annotations

import functools
import json
import os

PATH = os.path.join(os.path.dirname(__file__), "thresholds.json")
ALGOS = ("flat", "tree", "nccl", "copy", "ll")
DEFAULT_PASS_Q_MISS_RATE = 0.05  # Meta (arXiv 2411.01783), H100 hosts
RING_RATES = ("attention_tflops", "p2p_gbps")


@functools.lru_cache(maxsize=None)
def load_table(path: str = PATH) -> dict:
    with open(path) as f:
        return json.load(f)


def _update(path: str, keys: tuple[str, ...], value) -> None:
    """Set table[k0][k1]...[kn] = value in the file (creating the levels), then drop the cache."""
    table = json.loads(json.dumps(load_table(path)))  # a deep copy: the cached table stays as read
    node = table
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    load_table.cache_clear()


def _per_world(feature: str, key: str, device_name: str, world_size: int, table: dict | None):
    """table[feature][key][device_name][world_size] (or that device's "default"), or None."""
    table = load_table() if table is None else table
    per_device = table.get(feature, {}).get(key, {}).get(device_name, {})
    return per_device.get(str(world_size), per_device.get("default"))


# ----------------------------------------------------------------------------- all-reduce
ALL_REDUCE_KEYS = {"graph": "all_reduce", "eager": "all_reduce_eager"}


def select_rules(device_name: str, world_size: int, table: dict | None = None, *,
                 mode: str = "graph") -> list[tuple[int | None, str]]:
    """The [(max_bytes or None, algo)] rules for a device name and world size (falling back to defaults).
    mode "eager": the rules measured in eager mode for exactly this device and world size where stored,
    else the graph ones."""
    if mode not in ALL_REDUCE_KEYS:
        raise ValueError(f"select_rules: mode must be 'graph' or 'eager', got {mode!r}")
    table = load_table() if table is None else table
    rules = (table.get(ALL_REDUCE_KEYS["eager"], {}).get(device_name, {}).get(str(world_size))
             if mode == "eager" else None)
    if rules is None:
        graph = table["all_reduce"]
        per_device = graph.get(device_name, graph["default"])
        rules = per_device.get(str(world_size), per_device.get("default", graph["default"]["default"]))
    return [(None if b is None else int(b), a) for b, a in rules]


def agreed_rules(a: list[tuple[int | None, str]], b: list[tuple[int | None, str]],
                 otherwise: str = "nccl") -> list[tuple[int | None, str]]:
    """Rules that pick what ``a`` and ``b`` both pick, and ``otherwise`` at sizes where they differ (e.g. the
    C++ host path's rules: it hands "nccl" back to Python, which then applies the rules of the call's mode)."""
    bounds = sorted({x for x, _ in a + b if x is not None}) + [None]
    merged: list[tuple[int | None, str]] = []
    for bound in bounds:
        probe = bound if bound is not None else (bounds[-2] + 1 if len(bounds) > 1 else 0)
        pick = choose(a, probe) if choose(a, probe) == choose(b, probe) else otherwise
        if merged and merged[-1][1] == pick:
            merged[-1] = (bound, pick)
        else:
            merged.append((bound, pick))
    return merged


def choose(rules: list[tuple[int | None, str]], nbytes: int) -> str:
    """The first algorithm whose max_bytes admits ``nbytes``."""
    for max_bytes, algo in rules:
        if max_bytes is None or nbytes <= max_bytes:
            return algo
    return rules[-1][1]


def write_rules(device_name: str, world_size: int, rules: list[tuple[int | None, str]], path: str = PATH, *,
                mode: str = "graph") -> None:
    """Store measured rules for a device and world size (``mode``: measured in CUDA graphs or eager)."""
    bad = [a for _, a in rules if a not in ALGOS]
    if bad:
        raise ValueError(f"write_rules: algorithms must be in {ALGOS}, got {bad}")
    _update(path, (ALL_REDUCE_KEYS[mode], device_name, str(world_size)), [[b, a] for b, a in rules])


# ----------------------------------------------------------------------------- fused RMSNorm
def rmsnorm_tree_min_bytes(device_name: str, world_size: int, table: dict | None = None) -> int | None:
    """Bytes of x from which the fused all-reduce + RMSNorm's tree kernel was measured faster than
    its flat kernel on a device and world size, or None if not measured."""
    value = _per_world("rmsnorm", "tree_min_bytes", device_name, world_size, table)
    return None if value is None else int(value)


def write_rmsnorm_tree_min_bytes(device_name: str, world_size: int, nbytes: int, path: str = PATH) -> None:
    """Store the measured flat / tree crossover of the fused kernels."""
    _update(path, ("rmsnorm", "tree_min_bytes", device_name, str(world_size)), int(nbytes))


RMSNORM_LL_KEYS = {"graph": "ll_max_bytes", "eager": "ll_eager_max_bytes"}


def rmsnorm_ll_max_bytes(device_name: str, world_size: int, table: dict | None = None, *,
                         mode: str = "graph") -> int | None:
    """Bytes of x up to which the fused op's LL kernel (CUDA kernels only) was measured faster than the flat and
    tree kernels on a device and world size in ``mode`` ("graph": CUDA graphs, "eager"), or None if not
    measured (then ``auto`` never picks it in that mode)."""
    value = _per_world("rmsnorm", RMSNORM_LL_KEYS[mode], device_name, world_size, table)
    return None if value is None else int(value)


def write_rmsnorm_ll_max_bytes(device_name: str, world_size: int, nbytes: int, path: str = PATH, *,
                               mode: str = "graph") -> None:
    """Store the measured LL / (flat, tree) crossover of the fused kernels in ``mode``."""
    _update(path, ("rmsnorm", RMSNORM_LL_KEYS[mode], device_name, str(world_size)), int(nbytes))


# ----------------------------------------------------------------------------- ring attention
def measured_pass_q_miss_rate(device_name: str, world_size: int, table: dict | None = None) -> float | None:
    """The measured pass-Q / pass-KV crossover for a device and world size, or None."""
    value = _per_world("ring", "pass_q_miss_rate", device_name, world_size, table)
    return None if value is None else float(value)


def pass_q_miss_rate(device_name: str, world_size: int, table: dict | None = None) -> float:
    """The measured pass-Q / pass-KV crossover for a device and world size, else Meta's 5%."""
    value = measured_pass_q_miss_rate(device_name, world_size, table)
    return DEFAULT_PASS_Q_MISS_RATE if value is None else value


def write_pass_q_miss_rate(device_name: str, world_size: int, miss_rate: float, path: str = PATH) -> None:
    """Store a measured pass-Q / pass-KV crossover."""
    _update(path, ("ring", "pass_q_miss_rate", device_name, str(world_size)), float(miss_rate))


def ring_costs(device_name: str, table: dict | None = None) -> dict | None:
    """The measured rates of a device for Meta's ring cost model (``{"attention_tflops": ...,
    "p2p_gbps": ...}``, the fields of ``collectives.attention.variant.RingCosts``), or None if
    either is missing."""
    table = load_table() if table is None else table
    entry = table.get("ring", {}).get("model", {}).get(device_name, {})
    if any(k not in entry for k in RING_RATES):
        return None
    return {k: float(entry[k]) for k in RING_RATES}


def ring_variant_rule(device_name: str, world_size: int, table: dict | None = None) -> tuple[float, dict | None]:
    """How ``ring_attention(variant="auto")`` decides on a device and group size:
    ``(threshold, None)`` for a measured crossover, ``(5%, rates)`` for Meta's cost model with the
    device's measured rates (the threshold unused), ``(5%, None)`` for Meta's published rule."""
    measured = measured_pass_q_miss_rate(device_name, world_size, table)
    if measured is not None:
        return measured, None
    return DEFAULT_PASS_Q_MISS_RATE, ring_costs(device_name, table)


def write_ring_costs(device_name: str, path: str = PATH, **rates: float) -> None:
    """Store measured ``attention_tflops`` and/or ``p2p_gbps`` of a device for the ring cost model."""
    unknown = set(rates) - set(RING_RATES)
    if unknown:
        raise ValueError(f"unknown ring_model rates {sorted(unknown)}")
    entry = dict(load_table(path).get("ring", {}).get("model", {}).get(device_name, {}))
    entry.update({k: round(float(v), 1) for k, v in rates.items()})
    _update(path, ("ring", "model", device_name), entry)


def chunk_backend(device_name: str, available: tuple, table: dict | None = None) -> str:
    """The local attention kernel for ring attention on a device: the measured winner if it is
    ``available`` (SDPA backends of this torch for the dtype), else "flash" on GPUs that have
    it, else "triton". ``device_name`` "cpu" always gets "triton"."""
    if device_name == "cpu":
        return "triton"
    table = load_table() if table is None else table
    best = table.get("ring", {}).get("chunk_backend", {}).get(device_name)
    if best == "triton" or best in available:
        return best
    return "flash" if "flash" in available else "triton"


def write_chunk_backend(device_name: str, backend: str, path: str = PATH) -> None:
    """Store the measured fastest local attention kernel of a device."""
    _update(path, ("ring", "chunk_backend", device_name), backend)
