"""The results store: ``bench/results/records.jsonl``, one JSON object per measurement, appended by
every benchmark and versioned by git. Tables and plots are regenerated from it (``bench/report.py``).

A record::

    {"bench": "all_reduce", "impl": "shardkit_flat", "gpu": "NVIDIA H200", "world": 2,
     "dtype": "bfloat16", "mode": "graph", "params": {"bytes": 65536},
     "us_median": 5.4, "us_min": 5.3, "us_max": 5.9, "commit": "2945300", "date": "2026-11-30",
     "run": "2026-11-30T14:02:11", "metrics": {"busbw_gbps": 12.1}}

``mode`` is "graph" (calls captured in a CUDA graph and replayed), "eager", or "cpu" (a functional
run in the Triton interpreter: its times say nothing about speed). ``params`` holds what identifies
the case (``bytes``, ``tokens``, ``hidden``, ...), ``metrics`` what was derived from the time
(``busbw_gbps``, ``tflops``, ``efficiency``, ``speedup``, ...) or counted (``copies_per_token``).
Records without a time (a quality study, or a case whose result was wrong: ``error`` says why) leave
``us_*`` as None.

``commit`` is the checkout's HEAD when the run started (``current_commit``); for the runs converted
from the old per-run result files, the commit that added the file. ``run`` is the local time at
which the benchmark process started: records of one ``run`` were measured together, so ratios
(to NCCL, to the one-GPU time) are taken within a run. ``note`` (optional; from ``SHARDKIT_RUN_NOTE``
by default) labels a run made with something the commit alone does not say, e.g. an environment
switch under test.

Where records go: GPU runs append to this store (or to ``<--out>/records.jsonl``, a fragment a
device session brings back and ``python bench/report.py --merge FILE`` adds here); functional CPU
runs (Triton interpreter, mode "cpu") write records only when ``--out`` is given, never to the store.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import statistics
import subprocess
from typing import Iterable, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STORE_NAME = "records.jsonl"
STORE = os.path.join(RESULTS_DIR, STORE_NAME)
REQUIRED = ("bench", "impl", "gpu", "world", "dtype", "mode", "params", "us_median", "us_min", "us_max", "commit",
            "date")
MODES = ("graph", "eager", "cpu")
RUN = datetime.datetime.now().isoformat(timespec="seconds")  # this process's run id


@functools.lru_cache(maxsize=None)
def current_commit() -> str:
    """The short hash of the checkout's HEAD, with ``+dirty`` when tracked files differ from it, or
    ``SHARDKIT_COMMIT`` where set (a device machine whose copy of the tree has no .git)."""
    if os.environ.get("SHARDKIT_COMMIT"):
        return os.environ["SHARDKIT_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "shardkit", "csrc", "bench",
                                ":!bench/results"], capture_output=True).returncode != 0
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(bench: str, impl: str, *, gpu: str, world: int, dtype: str, mode: str, params: dict,
           us: Sequence[float] | None, metrics: dict | None = None, commit: str | None = None,
           date: str | None = None, error: str | None = None, note: str | None = None) -> dict:
    """One measurement as a store record; ``us``: the per-repetition microseconds (median, min and
    max are taken of them; for collectives, each already the max over ranks), or None; ``error``:
    why there is no time (a wrong result)."""
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
           "date": date or RUN[:10], "run": RUN}
    note = note or os.environ.get("SHARDKIT_RUN_NOTE")
    if note:
        rec["note"] = note
    if error:
        rec["error"] = error
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


def merge(fragment: str, path: str = STORE) -> int:
    """Append the records of ``fragment`` (e.g. a device session's ``records.jsonl``) that ``path`` does
    not hold yet; returns how many were added."""
    seen = {json.dumps(r, sort_keys=True) for r in load(path)}
    return append([r for r in load(fragment) if json.dumps(r, sort_keys=True) not in seen], path)


def destination(out: str | None, on_gpu: bool) -> str | None:
    """The records file a run appends to: ``<out>/records.jsonl`` where ``--out`` was given, the store
    for a GPU run without it, None (nothing written) for a functional CPU run without it."""
    if out is not None:
        return os.path.join(out, STORE_NAME)
    return STORE if on_gpu else None


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
