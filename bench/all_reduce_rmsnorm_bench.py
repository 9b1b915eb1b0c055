"""Fused all-reduce + residual add + RMSNorm against what a user would write instead, at decode shapes.

GPUs (one process per GPU):
    torchrun --standalone --nproc-per-node=4 bench/all_reduce_rmsnorm_bench.py [--tokens 1,8,16,32,64,128,256]
             [--hidden 4096,8192] [--out DIR] [--write-thresholds]
No GPU: the same code on a CPU world, Triton kernels in the interpreter (a functional run; the
numbers are the interpreter's):
    python bench/all_reduce_rmsnorm_bench.py --cpu-world 2

Variants, each returning (out, residual_out) for x [tokens, hidden] (this rank's partial sum),
residual [tokens, hidden] and weight [hidden], bf16:
  nccl_torch      dist.all_reduce(x) in place + torch add + F.rms_norm
  shardkit_torch  shardkit all_reduce (algo auto) + torch add + F.rms_norm
  fused_auto      Communicator.all_reduce_residual_rmsnorm(algo="auto")
  fused_flat   ... algo="flat";  fused_tree: algo="tree"
Every variant's result is checked against a float64 reference before it is timed; a wrong answer is
reported as an error, not a time. Times: CUDA events around ``iters`` calls, median of ``reps``
repetitions, max over ranks; "graph" captures the ``iters`` calls in one CUDA graph.
Writes <out>/all_reduce_rmsnorm_<card>_x<world>_<date>.{json,md}. The one-shot / two-shot crossover
that one rule fits best to the graph-mode times (``best_cut``) is reported, and stored in
shardkit/thresholds.json for fused_auto with ``--write-thresholds``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (best_cut, environment, header_lines, max_over_ranks, results_stem,  # noqa: E402
                          run_distributed, summarize, time_cuda, time_host, write_json)

EPS = 1e-6
VARIANTS = ("nccl_torch", "shardkit_torch", "fused_auto", "fused_flat", "fused_tree")
Pair = tuple[torch.Tensor, torch.Tensor]


def make_variants(comm, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> dict[str, Callable[[], Pair]]:
    """name -> a call computing (out, residual_out) from x, residual and weight."""
    hidden = x.shape[-1]
    scratch = x.clone()  # the NCCL baseline reduces in place, as an engine does with a fresh linear output

    def nccl_torch() -> Pair:
        dist.all_reduce(scratch)
        res_out = residual + scratch
        return F.rms_norm(res_out, (hidden,), weight, EPS), res_out

    def shardkit_torch() -> Pair:
        res_out = residual + comm.all_reduce(x, algo="auto")
        return F.rms_norm(res_out, (hidden,), weight, EPS), res_out

    def fused(algo: str) -> Callable[[], Pair]:
        return lambda: comm.all_reduce_residual_rmsnorm(x, residual, weight, EPS, algo)

    return {"nccl_torch": nccl_torch, "shardkit_torch": shardkit_torch, "fused_auto": fused("auto"),
            "fused_flat": fused("flat"), "fused_tree": fused("tree")}


def check(got: Pair, ref: Pair) -> str | None:
    """An error text when (out, residual_out) is off the float64 reference by more than bf16 rounding."""
    for t, r, what in zip(got, ref, ("out", "residual_out")):
        rel = ((t.double() - r).norm() / r.norm()).item()
        if not rel <= 1e-2:
            return f"wrong {what}: relative error {rel:.3g}"
    return None


def bench_rank(args: argparse.Namespace) -> tuple[dict, list[dict]] | None:
    """Run every shape and variant on this rank; rank 0 returns (environment, records)."""
    import shardkit
    from shardkit.reference.all_reduce import all_reduce_residual_rmsnorm_reference, rank_inputs

    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = dist.get_backend() != "nccl"
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    env = environment()
    if rank == 0:
        print("\n".join(header_lines(env)), file=sys.stderr)
    comm = shardkit.Communicator()
    modes = ["eager"] if cpu else args.modes.split(",")

    def sync() -> None:
        dist.barrier()
        if not cpu:
            torch.cuda.synchronize()

    records = []
    for hidden in args.hidden:
        for tokens in args.tokens:
            n = tokens * hidden
            xs = [t.view(tokens, hidden) for t in rank_inputs(world, n, torch.bfloat16, 100 + tokens, device)]
            residual = rank_inputs(1, n, torch.bfloat16, 200 + tokens, device)[0].view(tokens, hidden)
            weight = rank_inputs(1, hidden, torch.bfloat16, 300, device)[0]
            ref = all_reduce_residual_rmsnorm_reference(xs, residual, weight, EPS)
            nbytes = xs[rank].numel() * xs[rank].element_size()
            picked = comm._rmsnorm_auto(nbytes)
            for name, fn in make_variants(comm, xs[rank], residual, weight).items():
                error = check(fn(), ref)
                bad = torch.tensor([error is not None], dtype=torch.int32, device=device)
                dist.all_reduce(bad)
                for mode in modes:
                    rec = {"gpu": env["gpu"], "world": world, "dtype": "bf16", "tokens": tokens, "hidden": hidden,
                           "bytes": nbytes, "variant": name, "mode": mode}
                    if name == "fused_auto":
                        rec["auto_picked"] = picked
                    if bad.item():
                        rec["error"] = error or "wrong result on another rank"
                    else:
                        samples = (time_host(fn, args.iters, args.reps, sync) if cpu
                                   else time_cuda(fn, args.iters, args.reps, mode == "graph", sync))
                        rec.update(summarize(max_over_ranks(samples, device)))
                    records.append(rec)
            sync()
    comm.check()
    comm.close()
    return (env, records) if rank == 0 else None


def add_speedups(records: list[dict]) -> None:
    """speedup_vs_<baseline> for every timed record: baseline time / this time, same shape and mode."""
    times = {(r["mode"], r["tokens"], r["hidden"], r["variant"]): r["us_median"] for r in records if "us_median" in r}
    for r in records:
        for base in ("nccl_torch", "shardkit_torch"):
            b = times.get((r["mode"], r["tokens"], r["hidden"], base))
            if b and "us_median" in r and r["variant"] != base:
                r[f"speedup_vs_{base}"] = b / r["us_median"]


def tree_min_bytes(records: list[dict]) -> int | None:
    """x bytes from which two-shot should be used, fitted to the graph-mode times of both fused
    kernels (``best_cut``); twice the largest size if two-shot never wins. None without such times."""
    times = {}
    for r in records:
        if r["mode"] == "graph" and r["variant"] in ("fused_flat", "fused_tree") and "us_median" in r:
            times.setdefault((r["tokens"], r["hidden"]), {"bytes": r["bytes"]})[r["variant"]] = r["us_median"]
    rows = [t for t in times.values() if len(t) == 3]
    if not rows:
        return None
    sizes, cut = best_cut(rows, "bytes", "fused_flat", "fused_tree")
    return sizes[cut] if cut < len(sizes) else 2 * sizes[-1]


def markdown(env: dict, records: list[dict], world: int, functional: bool) -> str:
    lines = [f"# Fused all-reduce + residual + RMSNorm: {env['gpu']}, {world} ranks, bf16", ""]
    if functional:
        lines += ["**Functional run**: Triton kernels in the CPU interpreter on shared memory; the times are "
                  "the interpreter's and say nothing about GPU performance.", ""]
    lines += ["```"] + header_lines(env) + ["```", "",
              "Median µs per call, max over ranks. Brackets: speedup of fused_auto over shardkit all_reduce + "
              "torch add + F.rms_norm (target >= 1.3x) / over NCCL + torch (target >= 2x); auto's pick in "
              "the last column.", ""]
    for mode in dict.fromkeys(r["mode"] for r in records):
        lines += [f"## {mode}", "", "| tokens x hidden | " + " | ".join(VARIANTS) + " | auto picked |",
                  "|---|" + "---|" * (len(VARIANTS) + 1)]
        for hidden, tokens in dict.fromkeys((r["hidden"], r["tokens"]) for r in records):
            row, picked = [], "-"
            for v in VARIANTS:
                r = next((r for r in records if (r["mode"], r["tokens"], r["hidden"], r["variant"])
                          == (mode, tokens, hidden, v)), None)
                if r is None:
                    row.append("-")
                elif "error" in r:
                    row.append(f"ERROR: {r['error']}")
                else:
                    cell = f"{r['us_median']:.1f}"
                    if v == "fused_auto":
                        picked = r["auto_picked"]
                        cell += (f" ({r.get('speedup_vs_shardkit_torch', float('nan')):.2f}x / "
                                 f"{r.get('speedup_vs_nccl_torch', float('nan')):.2f}x)")
                    row.append(cell)
            lines.append(f"| {tokens} x {hidden} | " + " | ".join(row) + f" | {picked} |")
        lines.append("")
    crossover = tree_min_bytes(records)
    if crossover is not None:
        lines += [f"Fused one-shot / two-shot crossover fitted to the graph-mode times (`best_cut`): two-shot from "
                  f"{crossover} bytes of x.", ""]
    return "\n".join(lines)


def report(args: argparse.Namespace, env: dict, records: list[dict], world: int, functional: bool) -> None:
    add_speedups(records)
    what = "all_reduce_rmsnorm_functional" if functional else "all_reduce_rmsnorm"
    stem = results_stem(args.out, what, env, world)
    write_json(stem + ".json", {"env": env, "functional": functional, "args": vars(args), "records": records})
    text = markdown(env, records, world, functional)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nwrote {stem}.json, .md")
    crossover = tree_min_bytes(records)
    if args.write_thresholds and crossover is not None and not functional:
        from shardkit import thresholds
        thresholds.write_rmsnorm_tree_min_bytes(env["gpu"], world, crossover)
        print(f"stored rmsnorm tree_min_bytes[{env['gpu']!r}][{world}] = {crossover}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default 1,8,16,32,64,128,256; CPU 1,5)")
    p.add_argument("--hidden", default=None, help="comma-separated hidden sizes (default 4096,8192; CPU 96)")
    p.add_argument("--modes", default="eager,graph")
    p.add_argument("--iters", type=int, default=None, help="calls per repetition (default 100; CPU 2)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 7; CPU 2)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--cpu-world", type=int, default=0, help="no GPUs: run a CPU world of this many processes")
    p.add_argument("--write-thresholds", action="store_true",
                   help="store the fitted one-shot / two-shot crossover in shardkit/thresholds.json")
    args = p.parse_args()
    cpu = args.cpu_world > 0
    args.tokens = [int(t) for t in (args.tokens or ("1,5" if cpu else "1,8,16,32,64,128,256")).split(",")]
    args.hidden = [int(h) for h in (args.hidden or ("96" if cpu else "4096,8192")).split(",")]
    args.iters = args.iters or (2 if cpu else 100)
    args.reps = args.reps or (2 if cpu else 7)
    run_distributed(bench_rank, args, report)


if __name__ == "__main__":
    main()
