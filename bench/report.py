"""Tables and plots of the results store (``bench/results/records.jsonl``), regenerated in one go.

    python bench/report.py                      # every table and plot into bench/results, README blocks
    python bench/report.py --bench all_reduce   # one benchmark
    python bench/report.py --merge FILE ...     # first add a device session's records.jsonl to the store
    python bench/report.py --store DIR/records.jsonl --out DIR    # the tables of another records file
    python bench/report.py --commit 807a870 [--note v8-push]      # print an older run's tables

One markdown table (and, where a picture helps, one PNG plot) per benchmark, GPU and world size:
``<bench>_<card>_x<world>.md`` / ``.png``, e.g. ``all_reduce_H200_x4.md``. Each shows the newest run
(records sharing ``commit`` and ``run``, see ``bench/records.py``) of that GPU and world size; a
run's world size is the largest ``world`` among its records (the ring benchmark also measures
smaller groups and one GPU). Ratios (to NCCL, to the one-GPU time, between variants) are taken
within one run. The tuning benchmark shows the newest run of each kernel family. The sweep benchmarks
(all-reduce, fused RMSNorm) show the newest full sweep; newer partial runs (``--sizes 1K-256K``,
``--tokens 16``, ``--algos`` without auto; ``partial``) are listed below it with their own tables.

README.md holds generated blocks between ``<!-- report:NAME CARD [xWORLD] -->`` and
``<!-- /report -->``; a run of this script over the store rewrites them (``README_BLOCKS``).
Benchmarks call ``publish`` at the end of a run.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable, Iterable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import records as store  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
Records = list[dict]


# ---------------------------------------------------------------- runs and selection

def card(gpu: str) -> str:
    """The GPU's short name for file names: "NVIDIA H200" -> "H200", "cpu (Triton interpreter)" -> "cpu"."""
    name = gpu.replace("NVIDIA ", "").split(" (")[0]
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "unknown"


def run_key(rec: dict) -> tuple[str, str]:
    return rec["commit"], rec.get("run") or rec["date"]


def runs(records: Iterable[dict]) -> dict[tuple, Records]:
    """(bench, gpu, commit, run) -> that run's records, oldest run first."""
    out: dict[tuple, Records] = {}
    for r in records:
        out.setdefault((r["bench"], r["gpu"]) + run_key(r), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][3], kv[0][2])))


def series(bench: str, recs: Records) -> str:
    """Runs of one benchmark that complement each other rather than replace each other: the tuning
    runs of the two kernel families (``--kernels``)."""
    if bench == "tune_all_reduce":
        return ",".join(sorted({r["params"].get("kernels", "") for r in recs if r["impl"] != "nccl"}))
    return ""


# Sweep benchmarks: a run that measured fewer sizes / shapes than this is partial (``--sizes 1K-256K``,
# ``--tokens 16``, a focused ``--algos`` scan without auto): it is listed under the table of the newest
# full sweep instead of replacing it. The minima are the smallest default sweeps the store holds:
# 1K-64M (9 sizes) for the all-reduce (today 1K-256M, 10), 5 token counts x 2 hiddens for the fused RMSNorm
# (today 7 x 2).
SWEEP_SHAPE: dict[str, Callable[[dict], tuple]] = {
    "all_reduce": lambda p: (p["bytes"],),
    "all_reduce_rmsnorm": lambda p: (p["hidden"], p["tokens"]),
}
FULL_SWEEP = {"all_reduce": 9, "all_reduce_rmsnorm": 10}


def sweep_shapes(bench: str, recs: Records) -> list[tuple]:
    return sorted({SWEEP_SHAPE[bench](r["params"]) for r in recs})


def partial(bench: str, recs: Records) -> bool:
    """Whether this run of a sweep benchmark measured only part of the sweep."""
    if bench == "all_reduce" and not any(r["impl"].startswith("auto") for r in recs):
        return True
    return bench in FULL_SWEEP and len(sweep_shapes(bench, recs)) < FULL_SWEEP[bench]


def selection(records: Iterable[dict], bench: str | None = None) -> dict[tuple, tuple[Records, list[Records]]]:
    """(bench, gpu, world, series) -> (the records of its newest full run, the partial runs newer than
    that run, oldest first). Without a full run the newest partial run is the table's run."""
    chosen: dict[tuple, tuple[Records, list[Records]]] = {}
    for (b, gpu, _, _), recs in runs(records).items():
        if bench is None or b == bench:
            key = (b, gpu, max(r["world"] for r in recs), series(b, recs))
            if key in chosen and partial(b, recs) and not partial(b, chosen[key][0]):
                chosen[key][1].append(recs)
            else:
                chosen[key] = (recs, [])  # later runs overwrite
    return chosen


def newest(records: Iterable[dict], bench: str | None = None) -> dict[tuple[str, str, int], Records]:
    """(bench, gpu, world) -> the records of its newest run (of each series; of a sweep benchmark, the
    newest full sweep: ``partial``), for every group."""
    out: dict[tuple[str, str, int], Records] = {}
    for (b, gpu, world, _), (recs, _) in selection(records, bench).items():
        out.setdefault((b, gpu, world), []).extend(recs)
    return out


def newer_partial(records: Iterable[dict]) -> dict[tuple[str, str, int], list[Records]]:
    """(bench, gpu, world) -> the partial sweep runs newer than its table's run, oldest first."""
    return {(b, gpu, world): later for (b, gpu, world, _), (_, later) in selection(records).items() if later}


def run_lines(recs: Records) -> list[str]:
    lines = []
    for key, rs in runs(recs).items():
        note = f"; {rs[0]['note']}" if rs[0].get("note") else ""
        lines.append(f"Run: commit `{key[2]}`, {rs[0]['date']} (run {key[3]}){note}.")
    return lines


def stem(bench: str, gpu: str, world: int) -> str:
    return f"{bench}_{card(gpu)}_x{world}"


def human(nbytes: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= div:
            return f"{nbytes / div:g} {unit}"
    return f"{nbytes} B"


def ordered(names: Iterable[str], order: tuple[str, ...]) -> list[str]:
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + [n for n in names if n not in order]


def find(recs: Records, impl: str, mode: str | None = None, **params) -> dict | None:
    for r in recs:
        if r["impl"] == impl and (mode is None or r["mode"] == mode) and \
                all(r["params"].get(k) == v for k, v in params.items()):
            return r
    return None


def us(rec: dict | None) -> float | None:
    return None if rec is None else rec.get("us_median")


def metric(rec: dict | None, name: str):
    return None if rec is None else rec.get("metrics", {}).get(name)


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def pct(fraction: float | None, spec: str = ".1f") -> str:
    return "-" if fraction is None else f"{fmt(100 * fraction, spec)}%"


def timed(rec: dict | None, spec: str = ".1f", scale: float = 1.0) -> str:
    """A record's median time as a cell, its error where it has one."""
    if rec is None:
        return "-"
    if rec.get("error"):
        return f"ERROR: {rec['error']}"
    return fmt(None if rec["us_median"] is None else rec["us_median"] * scale, spec)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------- all_reduce (bench/all_reduce_sweep.py)

AR_ORDER = ("nccl", "auto_cuda", "auto_triton", "flat_cuda", "tree_cuda", "flat_triton", "tree_triton",
            "symm_1shot", "symm_2shot")


def vs_nccl(recs: Records, rec: dict | None, **params) -> float | None:
    """NCCL's time over this record's, same run, mode and parameters."""
    base = us(find([r for r in recs if run_key(r) == run_key(rec)], "nccl", rec["mode"], **params)) if rec else None
    t = us(rec)
    return base / t if base and t else None


def all_reduce_table(recs: Records) -> str:
    r0 = recs[0]
    lines = [f"# All-reduce sweep: {r0['gpu']} x{r0['world']}, {r0['dtype']}", ""] + run_lines(recs) + [
        "", "Median µs per call, max over ranks; (x) = NCCL's time / this time in the same run and mode; "
        "busbw = bytes/time * 2(W-1)/W. nccl and auto run in place, the others out of place; an auto "
        "cell names the algorithm auto picked where the run recorded it.", ""]
    return "\n".join(lines + all_reduce_modes(recs))


def all_reduce_modes(recs: Records, level: str = "##") -> list[str]:
    """One table per mode, under headings of this markdown level."""
    impls = ordered((r["impl"] for r in recs), AR_ORDER)
    lines = []
    for mode in ordered((r["mode"] for r in recs), ("graph", "eager", "cpu")):
        rows = []
        for nbytes in sorted({r["params"]["bytes"] for r in recs}):
            row, best = [human(nbytes)], 0.0
            for impl in impls:
                rec = find(recs, impl, mode, bytes=nbytes)
                cell = timed(rec)
                ratio, picked = vs_nccl(recs, rec, bytes=nbytes), metric(rec, "auto_picked")
                if impl != "nccl" and ratio:
                    cell += f" ({ratio:.2f}x{', ' + picked if picked else ''})"
                row.append(cell)
                best = max(best, metric(rec, "busbw_gbps") or 0.0)
            rows.append(row + [fmt(best)])
        lines += [f"{level} {mode}", ""] + table(["size"] + impls + ["best busbw GB/s"], rows) + [""]
    return lines


def all_reduce_plot(recs: Records, path: str) -> None:
    plt = pyplot()
    modes = ordered((r["mode"] for r in recs), ("graph", "eager", "cpu"))
    impls = ordered((r["impl"] for r in recs), AR_ORDER)
    fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 8), squeeze=False)
    for col, mode in enumerate(modes):
        for i, impl in enumerate(impls):  # one colour per implementation in every panel
            rs = sorted((r for r in recs if r["impl"] == impl and r["mode"] == mode and us(r)),
                        key=lambda r: r["params"]["bytes"])
            if not rs:
                continue
            xs = [r["params"]["bytes"] for r in rs]
            axes[0][col].plot(xs, [us(r) for r in rs], marker="o", label=impl, color=f"C{i}")
            if impl != "nccl":
                axes[1][col].plot(xs, [vs_nccl(recs, r, bytes=r["params"]["bytes"]) or math.nan for r in rs],
                                  marker="o", label=impl, color=f"C{i}")
        axes[0][col].set(xscale="log", yscale="log", ylabel="µs per call (median, max over ranks)",
                         title=f"{mode}: {recs[0]['gpu']} x{recs[0]['world']}, {recs[0]['dtype']}")
        axes[1][col].set(xscale="log", xlabel="message size (bytes)", ylabel="speedup vs NCCL")
        axes[1][col].axhline(1.0, color="gray", lw=0.8)
        for ax in axes[:, col]:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def all_reduce_summary(recs: Records) -> str:
    """README block: graph mode, NCCL against shardkit's auto and torch's symm_mem ops."""
    cols = [("nccl", "NCCL"), ("auto_cuda", "shardkit auto"), ("symm_1shot", "symm_mem one-shot"),
            ("symm_2shot", "symm_mem two-shot")]
    rows = []
    for nbytes in sorted({r["params"]["bytes"] for r in recs}):
        row = [human(nbytes)]
        for impl, _ in cols:
            rec = find(recs, impl, "graph", bytes=nbytes)
            cell = timed(rec) + (" µs" if us(rec) else "")
            ratio, picked = vs_nccl(recs, rec, bytes=nbytes), metric(rec, "auto_picked")
            if impl == "auto_cuda" and ratio:
                cell += f" ({ratio:.2f}x{', ' + picked if picked else ''})"
            row.append(cell)
        rows.append(row)
    return "\n".join(table(["size"] + [f"{name} graph" for _, name in cols], rows))


# ---------------------------------------------------------------- all_reduce_rmsnorm

RMS_ORDER = ("nccl_torch", "shardkit_torch", "fused_auto", "fused_flat", "fused_tree", "fused_ll")


def rmsnorm_shapes(recs: Records) -> list[tuple[int, int]]:
    return sorted({(r["params"]["hidden"], r["params"]["tokens"]) for r in recs})


def rmsnorm_speedups(recs: Records, mode: str, tokens: int, hidden: int) -> tuple[float | None, float | None]:
    """fused_auto's speedup over shardkit all-reduce + torch and over NCCL + torch."""
    t = us(find(recs, "fused_auto", mode, tokens=tokens, hidden=hidden))
    bases = (us(find(recs, b, mode, tokens=tokens, hidden=hidden)) for b in ("shardkit_torch", "nccl_torch"))
    return tuple(b / t if b and t else None for b in bases)


def rmsnorm_table(recs: Records) -> str:
    from bench.all_reduce_rmsnorm_bench import crossover
    r0 = recs[0]
    lines = [f"# Fused all-reduce + residual + RMSNorm: {r0['gpu']} x{r0['world']}, {r0['dtype']}", ""] + \
        run_lines(recs) + ["", "Median µs per call, max over ranks. Brackets: speedup of fused_auto over shardkit "
                           "all_reduce + torch add + F.rms_norm (target >= 1.3x) / over NCCL + torch (target >= 2x); "
                           "auto's pick in the last column.", ""]
    lines += rmsnorm_modes(recs)
    fit = crossover(recs)
    if fit is not None:
        lines += [f"Fused flat (one-shot) / tree (two-shot) crossover fitted to the graph-mode times (`best_cut`): "
                  f"tree from {fit} bytes of x.", ""]
    return "\n".join(lines)


def rmsnorm_modes(recs: Records, level: str = "##") -> list[str]:
    """One table per mode, under headings of this markdown level."""
    impls = ordered((r["impl"] for r in recs), RMS_ORDER)
    lines = []
    for mode in ordered((r["mode"] for r in recs), ("graph", "eager", "cpu")):
        rows = []
        for hidden, tokens in rmsnorm_shapes(recs):
            row = [f"{tokens} x {hidden}"]
            for impl in impls:
                rec = find(recs, impl, mode, tokens=tokens, hidden=hidden)
                cell = timed(rec)
                if impl == "fused_auto" and us(rec):
                    a, b = rmsnorm_speedups(recs, mode, tokens, hidden)
                    cell += f" ({fmt(a, '.2f')}x / {fmt(b, '.2f')}x)"
                row.append(cell)
            row.append(metric(find(recs, "fused_auto", mode, tokens=tokens, hidden=hidden), "auto_picked") or "-")
            rows.append(row)
        lines += [f"{level} {mode}", ""] + table(["tokens x hidden"] + impls + ["auto picked"], rows) + [""]
    return lines


def rmsnorm_plot(recs: Records, path: str) -> None:
    plt = pyplot()
    mode = "graph" if any(r["mode"] == "graph" for r in recs) else recs[0]["mode"]
    hiddens = sorted({r["params"]["hidden"] for r in recs})
    fig, axes = plt.subplots(1, len(hiddens), figsize=(6.5 * len(hiddens), 4.5), squeeze=False)
    for ax, hidden in zip(axes[0], hiddens):
        for i, impl in enumerate(ordered((r["impl"] for r in recs), RMS_ORDER)):
            rs = sorted((r for r in recs if r["impl"] == impl and r["mode"] == mode and r["params"]["hidden"] == hidden
                         and us(r)), key=lambda r: r["params"]["tokens"])
            if rs:
                ax.plot([r["params"]["tokens"] for r in rs], [us(r) for r in rs], marker="o", label=impl, color=f"C{i}")
        ax.set(xscale="log", xlabel="tokens", ylabel="µs per call (median, max over ranks)",
               title=f"{mode}, hidden {hidden}: {recs[0]['gpu']} x{recs[0]['world']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rmsnorm_summary(recs: Records) -> str:
    """README block: graph mode, decode shapes (<= 64 tokens)."""
    rows = []
    for hidden, tokens in rmsnorm_shapes(recs):
        if tokens > 64:
            continue
        a, b = rmsnorm_speedups(recs, "graph", tokens, hidden)
        rows.append([f"{tokens} x {hidden}", timed(find(recs, "nccl_torch", "graph", tokens=tokens, hidden=hidden)),
                     timed(find(recs, "shardkit_torch", "graph", tokens=tokens, hidden=hidden)),
                     timed(find(recs, "fused_auto", "graph", tokens=tokens, hidden=hidden)),
                     f"{fmt(a, '.2f')}x", f"{fmt(b, '.2f')}x"])
    return "\n".join(table(["tokens x hidden", "NCCL + torch µs", "shardkit all_reduce + torch µs", "fused auto µs",
                            "fused vs shardkit + torch", "fused vs NCCL + torch"], rows))


# ---------------------------------------------------------------- ring_attention

def ring_scaling_rows(recs: Records) -> list[dict]:
    """One dict per (seq_len, GPUs, local kernel) ring record with its one-GPU time."""
    out = []
    for r in recs:
        p = r["params"]
        if r["impl"] == "ring_pass_kv" and p.get("study") == "scaling":
            single = find(recs, "single_gpu", study="scaling", seq_len=p["seq_len"], local_backend=p["local_backend"])
            out.append({"seq_len": p["seq_len"], "world": r["world"], "backend": p["local_backend"], "ring": r,
                        "single": single})
    return sorted(out, key=lambda s: (s["world"], s["seq_len"]))


def ring_miss_rows(recs: Records) -> list[dict]:
    out = []
    for r in recs:
        if r["impl"] == "ring_pass_kv" and r["params"].get("study") == "miss_rate":
            q = find(recs, "ring_pass_q", study="miss_rate", new_tokens=r["params"]["new_tokens"],
                     context=r["params"]["context"])
            out.append({"p": r["params"], "kv": r, "q": q, "miss_rate": r["params"]["miss_rate"],
                        "pass_kv_ms": (us(r) or math.nan) / 1e3, "pass_q_ms": (us(q) or math.nan) / 1e3})
    return sorted(out, key=lambda m: m["miss_rate"])


def ring_table(recs: Records) -> str:
    r0 = next(r for r in recs if r["world"] == max(x["world"] for x in recs))
    p = r0["params"]
    lines = [f"# Ring attention: {r0['gpu']}, up to {r0['world']} GPUs, {r0['dtype']}", ""] + run_lines(recs) + [
        "", f"B=1, {p.get('q_heads')} q heads / {p.get('kv_heads')} kv heads, head dim {p.get('head_dim')}, causal; "
        "median of the repetitions, each the slowest rank; eager (a ring call reads its plan on the host).", "",
        "## Pass-KV scaling (load-balanced shards)", "",
        "The one-GPU time and the ring use the same local kernel (triton: shardkit's attention_chunk; flash / "
        "cudnn: torch's SDPA kernels with the LSE).", ""]
    rows = [[str(s["seq_len"]), str(s["world"]), s["backend"], timed(s["single"], ".2f", 1e-3),
             timed(s["ring"], ".2f", 1e-3), f"{fmt(metric(s['ring'], 'speedup'), '.2f')}x",
             pct(metric(s["ring"], "efficiency"))] for s in ring_scaling_rows(recs)]
    lines += table(["tokens", "GPUs", "local kernel", "1 GPU (ms)", "ring (ms)", "speedup", "efficiency T1/(W*TW)"],
                   rows)
    miss = ring_miss_rows(recs)
    if miss:
        from bench.ring_attention_bench import best_threshold
        lines += ["", f"## Pass-Q vs pass-KV across KV-cache miss rates ({miss[0]['kv']['world']} GPUs, "
                  f"{miss[0]['p']['context']} tokens of context)", ""]
        lines += table(["miss rate", "new T", "cached P", "pass-KV (ms)", "pass-Q (ms)", "pass-Q / pass-KV",
                        "auto picks", "cost model picks"],
                       [[pct(m["miss_rate"], ".2f"), str(m["p"]["new_tokens"]), str(m["p"]["cached_tokens"]),
                         timed(m["kv"], ".3f", 1e-3), timed(m["q"], ".3f", 1e-3),
                         fmt(m["pass_q_ms"] / m["pass_kv_ms"], ".2f"), metric(m["kv"], "auto_picks") or "-",
                         metric(m["kv"], "model_picks") or "-"] for m in miss])
        timed_rows = [m for m in miss if not math.isnan(m["pass_q_ms"] / m["pass_kv_ms"])]
        first = next((m["miss_rate"] for m in timed_rows if m["pass_kv_ms"] <= m["pass_q_ms"]), None)
        lines += ["", f"First miss rate at which pass-KV is faster: {first}; best single threshold (least total "
                  f"relative loss, `best_threshold`): {best_threshold(timed_rows) if timed_rows else None} "
                  "(Meta: ~5%)."]
    return "\n".join(lines + ring_decode_lines(recs)) + "\n"


def ring_decode_lines(recs: Records) -> list[str]:
    """The CP decode study: cp_decode_attention on W GPUs against one GPU (same kernel; torch SDPA)."""
    cp = sorted((r for r in recs if r["impl"] == "cp_decode"),
                key=lambda r: (r["mode"], r["params"]["context"], r["params"]["batch"]))
    if not cp:
        return []
    rows = []
    for r in cp:
        case = {k: r["params"][k] for k in ("study", "context", "batch")}
        rows.append([r["mode"], str(r["params"]["context"]), str(r["params"]["batch"]),
                     timed(find(recs, "single_gpu_decode", r["mode"], **case)),
                     timed(find(recs, "torch_sdpa_decode", r["mode"], **case)), timed(r),
                     f"{fmt(metric(r, 'speedup'), '.2f')}x", pct(metric(r, "efficiency")),
                     f"{fmt(metric(r, 'speedup_vs_torch_sdpa'), '.2f')}x", fmt(metric(r, "kv_gbps"))])
    return ["", f"## CP decode ({cp[0]['world']} GPUs): one query token per sequence, the KV cache sharded", "",
            "µs per call (graph: calls replayed from one CUDA graph); one GPU: the fastest rank, CP: the slowest. "
            "The same local kernel (attention_chunk) over the whole cache on one GPU gives the speedup and the "
            "efficiency T1/(W*TW); torch SDPA on one GPU is what a one-GPU engine runs.", ""] + \
        table(["mode", "context", "batch", "1 GPU, same kernel", "1 GPU, torch SDPA", "CP decode", "speedup",
               "efficiency", "vs torch SDPA", "KV GB/s (CP)"], rows)


def ring_plot(recs: Records, path: str) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    lines: dict[tuple, list] = {}
    for s in ring_scaling_rows(recs):
        if metric(s["ring"], "efficiency") is not None:
            point = (s["seq_len"], 100 * metric(s["ring"], "efficiency"))
            lines.setdefault((s["world"], s["backend"]), []).append(point)
    for (w, backend), pts in sorted(lines.items()):
        a.plot(*zip(*sorted(pts)), marker="o", label=f"{w} GPUs, {backend}")
    a.axhline(85, color="grey", ls=":", label="target 85%")
    a.set(xscale="log", xlabel="tokens (causal prefill)", ylabel="parallel efficiency T1/(W*TW) %",
          title="pass-KV ring scaling")
    a.legend(fontsize=8)
    miss = ring_miss_rows(recs)
    if miss:
        b.plot([100 * m["miss_rate"] for m in miss], [m["pass_q_ms"] / m["pass_kv_ms"] for m in miss], marker="o")
        b.axhline(1.0, color="grey", ls=":")
        b.axvline(5, color="tab:red", ls="--", label="Meta's ~5%")
        b.set(xscale="log", xlabel="KV-cache miss rate T/(T+P) %", ylabel="pass-Q time / pass-KV time",
              title=f"{miss[0]['kv']['world']} GPUs, {miss[0]['p']['context']} tokens of context")
        b.legend(fontsize=8)
    fig.suptitle(f"Ring attention on {recs[0]['gpu']}, {recs[0]['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ring_summary(recs: Records) -> str:
    """README block: ring time per local kernel and parallel efficiency, every group size measured."""
    backends = ordered((s["backend"] for s in ring_scaling_rows(recs)), ("triton", "flash", "cudnn"))
    groups: dict[tuple, dict] = {}
    for s in ring_scaling_rows(recs):
        groups.setdefault((s["world"], s["seq_len"]), {})[s["backend"]] = s["ring"]
    rows = []
    for (world, seq_len), per in sorted(groups.items()):
        rows.append([f"{seq_len // 1024}K", str(world)] + [timed(per.get(b), ".1f", 1e-3) + " ms" for b in backends] +
                    [" / ".join(pct(metric(per.get(b), "efficiency"), ".0f") for b in backends)])
    return "\n".join(table(["tokens", "GPUs"] + [f"ring with {b}" for b in backends] +
                           ["parallel efficiency (same local kernel on 1 GPU)"], rows))


# ---------------------------------------------------------------- ring_transfer

def ring_transfer_table(recs: Records) -> str:
    r0 = recs[0]
    rows = []
    for nbytes in sorted({r["params"]["bytes"] for r in recs}):
        a, b = find(recs, "nccl_p2p", bytes=nbytes), find(recs, "peer_pull", bytes=nbytes)
        rows.append([f"{nbytes / 2 ** 20:g}", timed(a), fmt(metric(a, "gbps")), timed(b), fmt(metric(b, "gbps")),
                     fmt(us(a) / us(b) if us(a) and us(b) else None, ".2f")])
    lines = [f"# One ring step's transfer: NCCL P2P vs a pull from peer memory ({r0['gpu']} x{r0['world']})", ""]
    lines += run_lines(recs) + ["", "Bytes received per rank per step; median of the repetitions, each the slowest "
                                "rank's.", ""]
    lines += table(["MiB", "NCCL P2P (µs)", "GB/s", "peer pull (µs)", "GB/s", "NCCL / pull time"], rows)
    return "\n".join(lines) + "\n"


def ring_transfer_plot(recs: Records, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for impl in ordered((r["impl"] for r in recs), ("nccl_p2p", "peer_pull")):
        rs = sorted((r for r in recs if r["impl"] == impl and metric(r, "gbps")), key=lambda r: r["params"]["bytes"])
        ax.plot([r["params"]["bytes"] for r in rs], [metric(r, "gbps") for r in rs], marker="o", label=impl)
    ax.set(xscale="log", xlabel="bytes per rank and step", ylabel="GB/s received per rank",
           title=f"Ring step transfer, {recs[0]['gpu']} x{recs[0]['world']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- attention_chunk (one GPU)

CHUNK_ORDER = ("shardkit_chunk", "torch_sdpa", "torch_flash_lse", "torch_cudnn_lse")
LOCAL_BACKENDS = {"triton": "shardkit_chunk", "flash": "torch_flash_lse", "cudnn": "torch_cudnn_lse"}


def local_backend_scores(recs: Records) -> dict[str, float]:
    """Geometric-mean TFLOP/s of each ring local backend over the measured lengths and masks."""
    scores = {}
    for backend, impl in LOCAL_BACKENDS.items():
        vals = [metric(r, "tflops") for r in recs if r["impl"] == impl and r["params"].get("study") == "chunk"]
        if vals and all(vals):
            scores[backend] = round(math.exp(sum(math.log(v) for v in vals) / len(vals)), 1)
    return scores


def attention_chunk_table(recs: Records) -> str:
    r0 = recs[0]
    chunk = [r for r in recs if r["params"].get("study") == "chunk"]
    p = chunk[0]["params"] if chunk else r0["params"]
    scores = local_backend_scores(recs)
    lines = [f"# Attention chunk + merge kernels on {r0['gpu']}", ""] + run_lines(recs) + [
        "", f"{r0['dtype']}, B={p.get('batch')}, Hq={p.get('q_heads')}, Hkv={p.get('kv_heads')}, "
        f"D={p.get('head_dim')}, Lq = Lk = L; triton.testing.do_bench median (L2 flushed).", "",
        f"Ring local backends, geometric-mean TFLOP/s: {scores}; fastest: "
        f"**{max(scores, key=scores.get) if scores else '-'}**", "",
        "## Chunk attention, TFLOP/s (causal counts half the score matrix)", ""]
    impls = ordered((r["impl"] for r in chunk), CHUNK_ORDER)
    rows = []
    for seq_len, causal in sorted({(r["params"]["seq_len"], r["params"]["causal"]) for r in chunk}):
        cells = [find(chunk, i, seq_len=seq_len, causal=causal) for i in impls]
        tf = [metric(c, "tflops") for c in cells]
        best = max((t for i, t in zip(impls, tf) if i != "shardkit_chunk" and t), default=None)
        ours = metric(find(chunk, "shardkit_chunk", seq_len=seq_len, causal=causal), "tflops")
        rows.append([str(seq_len), "causal" if causal else "full"] +
                    [c["error"] if c and c.get("error") else fmt(t) for c, t in zip(cells, tf)] +
                    [fmt(ours / best if ours and best else None, ".2f")])
    lines += table(["L", "mask"] + impls + ["shardkit / best baseline"], rows)
    tiles = [r for r in recs if r["params"].get("study") == "tile_sweep"]
    if tiles:
        lines += ["", f"## Chunk kernel tile sweep (L={tiles[0]['params']['seq_len']}), TFLOP/s", ""]
        lines += table(["BLOCK_M", "BLOCK_N", "warps", "stages", "mask", "TFLOP/s"],
                       [[str(t["params"]["tile"][k]) for k in ("block_m", "block_n", "warps", "stages")] +
                        ["causal" if t["params"]["causal"] else "full",
                         t.get("error") or fmt(metric(t, "tflops"))] for t in tiles])
    merge = [r for r in recs if r["params"].get("study") == "merge" and r["impl"] != "torch_copy"
             and r["impl"] != "torch_merge"]
    if merge:
        lines += ["", "## Merge, GB/s (bytes = (S+1) x (out + lse) rows)", ""]
        rows = []
        for r in merge:
            if r["mode"] != "eager":
                continue
            L, S = r["params"]["seq_len"], r["params"]["partials"]
            graph = find(merge, r["impl"], "graph", seq_len=L, partials=S)
            copy = metric(find(recs, "torch_copy", seq_len=L, study="merge"), "gbps")
            torch_merge = find(recs, "torch_merge", seq_len=L, partials=S)
            gbps = metric(r, "gbps")
            rows.append([str(L), str(S), r["impl"], fmt(gbps), fmt(metric(graph, "gbps")),
                         fmt(100 * gbps / copy if gbps and copy else None), fmt(metric(torch_merge, "gbps"))])
        lines += table(["L", "S", "kernel", "GB/s eager", "GB/s graph", "% of torch copy", "torch eager merge GB/s"],
                       rows)
    return "\n".join(lines) + "\n"


def attention_chunk_plot(recs: Records, path: str) -> None:
    plt = pyplot()
    chunk = [r for r in recs if r["params"].get("study") == "chunk"]
    cases = sorted({(r["params"]["seq_len"], r["params"]["causal"]) for r in chunk})
    impls = ordered((r["impl"] for r in chunk), CHUNK_ORDER)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        ax.bar([c + i * width for c in range(len(cases))],
               [metric(find(chunk, impl, seq_len=L, causal=causal), "tflops") or 0 for L, causal in cases],
               width, label=impl)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))],
                  [f"{L // 1024}K {'causal' if causal else 'full'}" for L, causal in cases])
    ax.set(ylabel="TFLOP/s", title=f"Attention chunk kernels, {recs[0]['gpu']}, {recs[0]['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- profile_eager, tune_all_reduce, pytest suites

def profile_eager_table(recs: Records) -> str:
    r0 = recs[0]
    rows = [[str(r["params"].get("bytes")), r["impl"], fmt(metric(r, "host_us")), timed(r),
             fmt(metric(r, "pre_launch_us")), fmt(metric(r, "launch_us")), r.get("error") or "ok"]
            for r in sorted(recs, key=lambda r: r["params"].get("bytes") or 0)]  # stable: run order within a size
    return "\n".join([f"# Eager all-reduce: host path vs GPU ({r0['gpu']} x{r0['world']})", ""] + run_lines(recs) + [
        "", f"{r0['dtype']}, {r0['params'].get('calls')} calls back to back; microseconds per call, rank 0. "
        "eager = wall time per call including the final synchronize; *_cpp / *_python: the C++ / Python host path "
        "of the CUDA kernels.", ""] +
        table(["bytes", "impl", "host enqueue", "eager (with sync)", "pre-launch", "launch", "check"], rows)) + "\n"


def config_text(config) -> str:
    return config if isinstance(config, str) else " ".join(f"{k}={v}" for k, v in config.items())


def tune_table(recs: Records) -> str:
    r0 = recs[0]
    lines = [f"# Launch-grid tuning of the DDA kernels: {r0['gpu']} x{r0['world']}, {r0['dtype']}, {r0['mode']}", "",
             "Median µs per call, max over ranks; per size the NCCL time of the same run, the shipped grid "
             "(`default`) and the fastest grid tried.", ""]
    for key, run in runs(recs).items():
        impls = ordered((r["impl"] for r in run if r["impl"] != "nccl"), ())
        rows = []
        for nbytes in sorted({r["params"]["bytes"] for r in run}):
            row = [human(nbytes), timed(find(run, "nccl", bytes=nbytes))]
            for impl in impls:
                tried = [r for r in run if r["impl"] == impl and r["params"]["bytes"] == nbytes and us(r)]
                best = min(tried, key=us, default=None)
                row += [timed(next((r for r in tried if r["params"].get("config") == "default"), None)),
                        f"{timed(best)} ({config_text(best['params']['config'])})" if best else "-"]
            rows.append(row)
        lines += [f"## {series('tune_all_reduce', run)} kernels", ""] + run_lines(run) + [""]
        lines += table(["size", "nccl"] + [f"{i} {what}" for i in impls for what in ("default", "best")], rows) + [""]
    return "\n".join(lines)


def pytest_table(recs: Records) -> str:
    r0 = recs[0]
    rows = [[" ".join(f"{k}={v}" for k, v in r["params"].items()), r["impl"], timed(r), fmt(r["us_min"]),
             fmt(r["us_max"]), ", ".join(f"{k} {fmt(v)}" for k, v in r.get("metrics", {}).items()) or "-"]
            for r in sorted(recs, key=lambda r: (sorted(r["params"].items()), r["impl"]))]
    lines = [f"# pytest-benchmark suite {r0['bench']}: {r0['gpu']} x{r0['world']}, {r0['dtype']}, {r0['mode']}", ""]
    lines += run_lines(recs) + ["", "µs per call: each round replays a CUDA graph of many calls; median / min / max "
                                "over rounds.", ""]
    return "\n".join(lines + table(["case", "impl", "µs median", "min", "max", "metrics"], rows)) + "\n"


# ---------------------------------------------------------------- registry, writing

Renderer = Callable[[Records], str]
Plotter = Callable[[Records, str], None]
BENCHES: dict[str, tuple[Renderer, Plotter | None]] = {
    "all_reduce": (all_reduce_table, all_reduce_plot),
    "all_reduce_rmsnorm": (rmsnorm_table, rmsnorm_plot),
    "ring_attention": (ring_table, ring_plot),
    "ring_transfer": (ring_transfer_table, ring_transfer_plot),
    "attention_chunk": (attention_chunk_table, attention_chunk_plot),
    "profile_eager": (profile_eager_table, None),
    "tune_all_reduce": (tune_table, None),
    "pytest_all_reduce": (pytest_table, None),
    "pytest_kernels": (pytest_table, None),
}
SWEEP_MODES: dict[str, Callable[[Records, str], list[str]]] = {  # the per-mode tables of a partial run
    "all_reduce": all_reduce_modes,
    "all_reduce_rmsnorm": rmsnorm_modes,
}
README_BLOCKS: dict[str, tuple[str, Renderer]] = {  # block name -> (bench, renderer of its newest runs)
    "all_reduce": ("all_reduce", all_reduce_summary),
    "all_reduce_rmsnorm": ("all_reduce_rmsnorm", rmsnorm_summary),
    "ring_attention": ("ring_attention", ring_summary),
}


def partial_section(bench: str, later: list[Records]) -> str:
    """Markdown: the partial sweep runs newer than a table's run, each with its own tables, so that a
    partial sweep neither replaces the full table nor hides what it measured."""
    if not later:
        return ""
    lines = ["", "## Newer partial runs", "",
             f"Runs newer than the table's run that measured only part of the sweep (fewer than "
             f"{FULL_SWEEP[bench]} sizes / shapes{', or no auto' if bench == 'all_reduce' else ''}); the table above "
             "is the newest full sweep. Each run's own figures, ratios within that run.", ""]
    for run in later:
        key = run_key(run[0])
        note = f"; {run[0]['note']}" if run[0].get("note") else ""
        lines += [f"### Commit `{key[0]}`, {run[0]['date']} (run {key[1]}){note}", "",
                  f"{len(sweep_shapes(bench, run))} sizes / shapes (the rows below); "
                  f"{', '.join(sorted({r['impl'] for r in run}))}.", ""]
        lines += SWEEP_MODES[bench](run, "####")
    return "\n".join(lines)


def document(bench: str, recs: Records, later: list[Records]) -> str:
    """A table file's markdown: the renderer's tables of ``recs`` and the newer partial runs."""
    return BENCHES[bench][0](recs).rstrip("\n") + "\n" + partial_section(bench, later)


def render(records: Records) -> list[str]:
    """The tables of the newest run of every (bench, gpu, world) among ``records``."""
    later = newer_partial(records)
    return [document(b, recs, later.get((b, gpu, world), [])) for (b, gpu, world), recs in newest(records).items()
            if b in BENCHES]


def write_reports(records: Records, out_dir: str, benches: Iterable[str] | None = None) -> list[str]:
    """Write ``<bench>_<card>_x<world>.md`` (and ``.png``) into ``out_dir``; returns the paths."""
    written = []
    os.makedirs(out_dir, exist_ok=True)
    later = newer_partial(records)
    for (bench, gpu, world), recs in newest(records).items():
        if bench not in BENCHES or (benches is not None and bench not in benches):
            continue
        plotter = BENCHES[bench][1]
        path = os.path.join(out_dir, stem(bench, gpu, world))
        with open(path + ".md", "w") as f:
            f.write(document(bench, recs, later.get((bench, gpu, world), [])).rstrip("\n") + "\n")
        written.append(path + ".md")
        if plotter is not None:
            try:
                plotter(recs, path + ".png")
                written.append(path + ".png")
            except ImportError:
                print("matplotlib missing: no plot", file=sys.stderr)
    return written


def update_readme(records: Records, path: str = README) -> list[str]:
    """Rewrite the README's generated blocks from the newest runs; returns the blocks rewritten."""
    text = open(path).read()
    pattern = re.compile(r"(<!-- report:(\S+) (\S+)(?: x(\d+))? -->\n)(.*?)(<!-- /report -->)", re.S)
    done = []

    def block(m: re.Match) -> str:
        name, want_card, want_world = m.group(2), m.group(3), m.group(4)
        bench, renderer = README_BLOCKS[name]
        chosen = [recs for (b, gpu, world), recs in sorted(newest(records, bench).items(), key=lambda kv: kv[0][2])
                  if card(gpu) == want_card and (want_world is None or world == int(want_world))]
        if not chosen:
            return m.group(0)
        recs = [r for rs in chosen for r in rs]
        done.append(f"{name} {want_card}" + (f" x{want_world}" if want_world else ""))
        files = ", ".join(f"`bench/results/{stem(bench, rs[0]['gpu'], max(r['world'] for r in rs))}.md`"
                          for rs in chosen)
        commits = ", ".join(dict.fromkeys(f"`{r['commit']}`" for r in recs))
        return (f"{m.group(1)}{renderer(recs)}\n\n(generated by `python bench/report.py` from {files}; "
                f"commit {commits}, {recs[0]['date']})\n{m.group(6)}")

    new = pattern.sub(block, text)
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return done


def publish(records: Records, out: str | None, on_gpu: bool) -> None:
    """The end of a benchmark run: print its tables; append its records where they belong
    (``records.destination``: GPU runs to the store or ``--out``, CPU runs only to ``--out``) and
    rewrite the tables of its benchmark there."""
    for text in render(records):
        print(text)
    path = store.destination(out, on_gpu)
    if path is None:
        print("functional CPU run: no records written (--out DIR keeps them in DIR/records.jsonl)")
        return
    n = store.append(records, path)
    written = write_reports(store.load(path), os.path.dirname(path), {r["bench"] for r in records})
    print(f"appended {n} records to {path}; wrote {', '.join(written)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", choices=sorted(BENCHES), help="only this benchmark's tables")
    p.add_argument("--store", default=store.STORE, help="records file (default: the store)")
    p.add_argument("--out", default=None, help="directory for the tables (default: the records file's)")
    p.add_argument("--merge", nargs="+", default=[], metavar="FILE",
                   help="first append these records files (device sessions) to --store, skipping records it has")
    p.add_argument("--commit", help="only runs of this commit (prefix); prints their tables unless --out is given")
    p.add_argument("--note", help="only runs whose note starts with this text (e.g. an old version tag: v8-push)")
    args = p.parse_args()
    for fragment in args.merge:
        print(f"{fragment}: {store.merge(fragment, args.store)} new records -> {args.store}")
    records = [r for r in store.load(args.store) if (args.bench is None or r["bench"] == args.bench)
               and r["commit"].startswith(args.commit or "") and r.get("note", "").startswith(args.note or "")]
    if (args.commit or args.note) and not args.out:
        print("\n\n".join(render(records)) or "no such run")
        return
    written = write_reports(records, args.out or os.path.dirname(os.path.abspath(args.store)),
                            None if args.bench is None else {args.bench})
    print("wrote " + "\n      ".join(written))
    if os.path.abspath(args.store) == store.STORE and args.bench is None:
        print("README blocks: " + (", ".join(update_readme(records)) or "none"))


if __name__ == "__main__":
    main()
