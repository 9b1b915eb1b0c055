"""bench/report.py: a partial sweep run (``--sizes 1K-256K``, ``--tokens 16``) neither replaces the table
of the newest full sweep nor disappears from it; other benchmarks keep showing their newest run."""
import sys

from bench import records as store
from bench import report

GPU = "NVIDIA H200"
FULL_SIZES = [1024 << (2 * i) for i in range(9)]  # 1K-64M, the smallest full all-reduce sweep
PARTIAL_SIZES = [16 << 20, 64 << 20, 256 << 20]


def sweep_run(commit: str, run: str, sizes: list[int], nccl_us: float, auto_us: float) -> list[dict]:
    return [store.record("all_reduce", impl, gpu=GPU, world=2, dtype="bfloat16", mode="graph",
                         params={"bytes": n}, us=[t], commit=commit, date=run[:10]) | {"run": run}
            for n in sizes for impl, t in (("nccl", nccl_us), ("auto_cuda", auto_us))]


def rmsnorm_run(commit: str, run: str, tokens: list[int]) -> list[dict]:
    return [store.record("all_reduce_rmsnorm", impl, gpu=GPU, world=2, dtype="bfloat16", mode="graph",
                         params={"tokens": t, "hidden": h, "bytes": 2 * t * h}, us=[us], commit=commit,
                         date=run[:10]) | {"run": run}
            for t in tokens for h in (4096, 8192) for impl, us in (("nccl_torch", 20.0), ("fused_auto", 9.0))]


def split(text: str) -> tuple[str, str]:
    """(the table of the chosen run, the "Newer partial runs" section or "")."""
    head, _, tail = text.partition("## Newer partial runs")
    return head, tail


def test_partial_sweep_listed_below_full_table(tmp_path, monkeypatch):
    path = str(tmp_path / "records.jsonl")
    store.append(sweep_run("aaaaaaa", "2026-01-01T00:00:00", FULL_SIZES, 20.0, 5.0) +
                 rmsnorm_run("aaaaaaa", "2026-01-01T00:00:01", [1, 8, 16, 32, 64]), path)
    fragment = str(tmp_path / "session.jsonl")
    store.append(sweep_run("bbbbbbb", "2026-01-02T00:00:00", PARTIAL_SIZES, 900.0, 777.0) +
                 rmsnorm_run("bbbbbbb", "2026-01-02T00:00:01", [16]), fragment)
    monkeypatch.setattr(sys, "argv", ["report.py", "--store", path, "--merge", fragment])
    report.main()  # the session's way: merge the device fragment, rewrite the tables next to the store

    table, later = split((tmp_path / "all_reduce_H200_x2.md").read_text())
    assert "commit `aaaaaaa`" in table and "bbbbbbb" not in table
    assert all(f"| {report.human(n)} |" in table for n in FULL_SIZES)  # the full table keeps every size
    assert "777.0" not in table
    assert "### Commit `bbbbbbb`, 2026-01-02" in later and "3 sizes / shapes" in later
    assert "| 256 MiB | 900.0 | 777.0 (1.16x) |" in later  # the partial run's own figures, ratio within it
    assert "aaaaaaa" not in later

    table, later = split((tmp_path / "all_reduce_rmsnorm_H200_x2.md").read_text())
    assert "commit `aaaaaaa`" in table and table.count("| 64 x 8192 |") == 1
    assert "### Commit `bbbbbbb`" in later and "| 16 x 4096 |" in later and "| 1 x 4096 |" not in later
    assert (tmp_path / "all_reduce_H200_x2.png").exists()


def test_newer_full_sweep_replaces_and_clears_partials():
    recs = (sweep_run("aaaaaaa", "2026-01-01T00:00:00", FULL_SIZES, 20.0, 5.0) +
            sweep_run("bbbbbbb", "2026-01-02T00:00:00", PARTIAL_SIZES, 900.0, 777.0) +
            sweep_run("ccccccc", "2026-01-03T00:00:00", FULL_SIZES + [256 << 20], 20.0, 4.0))
    chosen = report.newest(recs)[("all_reduce", GPU, 2)]
    assert {r["commit"] for r in chosen} == {"ccccccc"}
    assert report.newer_partial(recs) == {}
    text = report.render(recs)[0]
    assert "ccccccc" in text and "Newer partial runs" not in text


def test_partial_runs_alone_show_the_newest_one():
    """Without a full sweep (e.g. ``--commit`` of a partial run) the newest partial run is the table."""
    recs = (sweep_run("aaaaaaa", "2026-01-01T00:00:00", PARTIAL_SIZES[:2], 20.0, 5.0) +
            sweep_run("bbbbbbb", "2026-01-02T00:00:00", PARTIAL_SIZES, 900.0, 777.0))
    assert {r["commit"] for r in report.newest(recs)[("all_reduce", GPU, 2)]} == {"bbbbbbb"}
    assert report.newer_partial(recs) == {}


def test_focused_scan_without_auto_is_partial():
    full = sweep_run("aaaaaaa", "2026-01-01T00:00:00", FULL_SIZES, 20.0, 5.0)
    scan = [r | {"impl": "copy"} for r in sweep_run("bbbbbbb", "2026-01-02T00:00:00", FULL_SIZES, 20.0, 3.0)]
    assert {r["commit"] for r in report.newest(full + scan)[("all_reduce", GPU, 2)]} == {"aaaaaaa"}
    assert [run[0]["commit"] for run in report.newer_partial(full + scan)[("all_reduce", GPU, 2)]] == ["bbbbbbb"]


def test_other_benches_show_their_newest_run_however_small():
    def run(commit: str, stamp: str, sizes: list[int]) -> list[dict]:
        return [store.record("ring_transfer", "peer_pull", gpu=GPU, world=2, dtype="bfloat16", mode="graph",
                             params={"bytes": n}, us=[1.0], commit=commit, date=stamp[:10]) | {"run": stamp}
                for n in sizes]
    recs = run("aaaaaaa", "2026-01-01T00:00:00", FULL_SIZES) + run("bbbbbbb", "2026-01-02T00:00:00", [1024])
    assert {r["commit"] for r in report.newest(recs)[("ring_transfer", GPU, 2)]} == {"bbbbbbb"}
    assert report.newer_partial(recs) == {}
