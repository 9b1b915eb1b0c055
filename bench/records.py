"""The results store: ``bench/results/records.jsonl``, one JSON object per measurement, appended by
every benchmark and versioned by git. Tables and plots are regenerated from it (``bench/report.py``).

A record::

    {"bench": "all_reduce", "impl": "shardkit_flat", "gpu": "NVIDIA H200", "world": 2,
     "dtype": "bfloat16", "mode": "graph", "params": {"bytes": 65536},
     "us_median": 5.4, "us_min": 5.3, "us_max": 5.9, "commit": "2945300", "date": "2026-11-30",
     "metrics": {"busbw_gbps": 12.1}}

``mode`` is "graph" (calls captured in a CUDA graph and replayed), "eager", or "cpu" (a functional
run in the Triton interpreter: its times say nothing about speed). ``params`` holds what identifies
the case (``bytes``, ``tokens``, ``hidden``, ...), ``metrics`` what was derived from the time
(``busbw_gbps``, ``tflops``, ``efficiency``, ``speedup``, ...) or counted (``copies_per_token``).
Records without a time (a quality study) leave ``us_*`` as None.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
from typing import Iterable, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STORE = os.path.join(RESULTS_DIR, "records.jsonl")
REQUIRED = ("bench", "impl", "gpu", "world", "dtype", "mode", "params", "us_median", "us_min", "us_max", "commit",
            "date")
MODES = ("graph", "eager", "cpu")


def current_commit() -> str:
    """The short hash of the checkout's HEAD, with ``+dirty`` when tracked files differ from it, or
    ``SHARDKIT_COMMIT`` where set (a device machine whose copy of the tree has no .git)."""
    if os.environ.get("SHARDKIT_COMMIT"):
        return os.environ["SHARDKIT_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "shardkit", "csrc"],
                               capture_output=True).returncode != 0
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(bench: str, impl: str, *, gpu: str, world: int, dtype: str, mode: str, params: dict,
           us: Sequence[float] | None, metrics: dict | None = None, commit: str | None = None,
           date: str | None = None) -> dict:
    """One measurement as a store record; ``us``: the per-repetition microseconds (median, min and
    max are taken of them; for collectives, each already the max over ranks), or None."""
    if mode not in MODES:
        raise ValueError(f"record: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(params, dict):
        raise TypeError(f"record: params must be a dict, got {type(params).__name__}")
    us = list(us) if us is not None else []
    rec = {"bench": bench, "impl": impl, "gpu": gpu, "world": int(world), "dtype": str(dtype).replace("torch.", ""),
           "mode": mode, "params": params,
           "us_median": round(statistics.median(us), 3) if us else None,
           "us_min": round(min(us), 3) if us else None,
           "us_max": round(max(us), 3) if us else None,
           "commit": commit or current_commit(),
           "date": date or datetime.date.today().isoformat()}
    if metrics:
        rec["metrics"] = metrics
    return rec


def append(records: Iterable[dict], path: str = STORE) -> int:
    """Append records to the store (one JSON line each); returns how many were written."""
    lines = []
    for rec in records:
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise ValueError(f"append: record of bench {rec.get('bench')!r} lacks {missing}")
        lines.append(json.dumps(rec, sort_keys=False) + "\n")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.writelines(lines)
    return len(lines)


def load(path: str = STORE, **match) -> list[dict]:
    """The records of the store whose top-level fields equal ``match`` (e.g. ``bench="all_reduce"``)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if all(rec.get(k) == v for k, v in match.items()):
                    out.append(rec)
    return out
