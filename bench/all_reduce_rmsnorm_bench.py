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
  fused_ll     ... algo="ll" (CUDA kernels only: csrc/dda/ll_rmsnorm.cu, one synchronisation per call, through
               the C++ host path where built)
  fused_ll_s{S} (with --ll-segments S,...: the LL kernel on a grid of S blocks per row instead of the policy's,
               launched through ctypes; one launch, tokens <= ll_rmsnorm_max_rows; for tuning policy.h)
Every variant's result is checked against a float64 reference before it is timed; a wrong answer is
reported as an error, not a time. Times: CUDA events around ``iters`` calls, median of ``reps``
repetitions, max over ranks; "graph" captures the ``iters`` calls in one CUDA graph.
Prints the table; a GPU run appends its records to the store (bench/results/records.jsonl, or
``--out DIR``/records.jsonl) and rewrites ``all_reduce_rmsnorm_<card>_x<world>.md``/``.png`` there
(bench/report.py); a CPU run writes records and tables only with ``--out``. The one-shot / two-shot
crossover that one rule fits best to the graph-mode times (``best_cut``) is reported, and stored in
shardkit/thresholds.json for fused_auto with ``--write-thresholds``; so are the LL rules, one per mode (x bytes
up to which fused_ll beats the better of fused_flat and fused_tree: ``rmsnorm`` / ``ll_max_bytes`` in graphs,
``ll_eager_max_bytes`` in eager mode, where fused_flat / fused_tree pay the Python host path).
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
from bench.common import (best_cut, environment, header_lines, max_over_ranks, run_distributed,  # noqa: E402
                          time_cuda, time_host)
from bench.records import current_commit, record  # noqa: E402

EPS = 1e-6
Pair = tuple[torch.Tensor, torch.Tensor]


def ll_on_grid(comm, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
               segments: int) -> Callable[[], Pair] | None:
    """The LL fused kernel on ``segments`` blocks per row (``cuda.ll_rmsnorm_grid``) instead of the policy's grid,
    in one launch through the Python launcher; None where x needs more."""
    from shardkit.kernels.all_reduce import cuda as cuda_dda

    tokens, hidden = x.shape
    if tokens > cuda_dda.ll_rmsnorm_max_rows(hidden, x.element_size()):
        return None
    out, residual_out = torch.empty_like(x), torch.empty_like(x)

    def run() -> Pair:
        comm._rmsnorm_ll([x, residual, out, residual_out], weight, EPS, tokens, hidden, segments=segments)
        return out, residual_out

    return run


def make_variants(comm, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  ll_segments: tuple[int, ...] = ()) -> dict[str, Callable[[], Pair]]:
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

    variants = {"nccl_torch": nccl_torch, "shardkit_torch": shardkit_torch, "fused_auto": fused("auto"),
                "fused_flat": fused("flat"), "fused_tree": fused("tree")}
    if comm.kernels == "cuda":
        variants["fused_ll"] = fused("ll")
        for segments in ll_segments:
            run = ll_on_grid(comm, x, residual, weight, segments)
            if run is not None:
                variants[f"fused_ll_s{segments}"] = run
    return variants


def check(got: Pair, ref: Pair) -> str | None:
    """An error text when (out, residual_out) is off the float64 reference by more than bf16 rounding."""
    for t, r, what in zip(got, ref, ("out", "residual_out")):
        rel = ((t.double() - r).norm() / r.norm()).item()
        if not rel <= 1e-2:
            return f"wrong {what}: relative error {rel:.3g}"
    return None


def bench_rank(args: argparse.Namespace) -> tuple[dict, list[dict]] | None:
    """Run every shape and variant on this rank; rank 0 returns (environment, store records)."""
    import shardkit
    from shardkit.reference.all_reduce import all_reduce_residual_rmsnorm_reference, rank_inputs

    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = dist.get_backend() != "nccl"
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    env = environment()
    if rank == 0:
        print("\n".join(header_lines(env)), file=sys.stderr)
    comm = shardkit.Communicator(timeout_s=10.0)  # a kernel that hangs fails its rows in seconds
    modes = ["eager"] if cpu else args.modes.split(",")

    def sync() -> None:
        dist.barrier()
        if not cpu:
            torch.cuda.synchronize()

    records, commit = [], current_commit()
    for hidden in args.hidden:
        for tokens in args.tokens:
            n = tokens * hidden
            xs = [t.view(tokens, hidden) for t in rank_inputs(world, n, torch.bfloat16, 100 + tokens, device)]
            residual = rank_inputs(1, n, torch.bfloat16, 200 + tokens, device)[0].view(tokens, hidden)
            weight = rank_inputs(1, hidden, torch.bfloat16, 300, device)[0]
            ref = all_reduce_residual_rmsnorm_reference(xs, residual, weight, EPS)
            nbytes = xs[rank].numel() * xs[rank].element_size()
            picked = {mode: comm._rmsnorm_auto(xs[rank], capturing=mode == "graph") for mode in ("eager", "graph")}
            for name, fn in make_variants(comm, xs[rank], residual, weight, args.ll_segments).items():
                error = check(fn(), ref)
                bad = torch.tensor([error is not None], dtype=torch.int32, device=device)
                dist.all_reduce(bad)
                for mode in modes:
                    samples = None
                    if not bad.item():
                        samples = max_over_ranks(time_host(fn, args.iters, args.reps, sync) if cpu
                                                 else time_cuda(fn, args.iters, args.reps, mode == "graph", sync), device)
                    records.append(record("all_reduce_rmsnorm", name, gpu=env["gpu"], world=world,
                                          dtype=torch.bfloat16, mode="cpu" if cpu else mode,
                                          params={"tokens": tokens, "hidden": hidden, "bytes": nbytes}, us=samples,
                                          metrics={"auto_picked": picked.get(mode)} if name == "fused_auto" else None,
                                          commit=commit,
                                          error=None if samples else error or "wrong result on another rank"))
            sync()
    comm.check()
    comm.close()
    return (env, records) if rank == 0 else None


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


def ll_max_bytes(records: list[dict], mode: str = "graph") -> int | None:
    """x bytes up to which fused_ll should be used in ``mode`` (one rule fitted with ``best_cut`` to that mode's
    times of fused_ll against the better of fused_flat and fused_tree, store records of this bench); None where
    ll was not measured or never wins."""
    times = {}
    for r in records:
        if r["mode"] == mode and r["us_median"] is not None:
            p = r["params"]
            times.setdefault((p["tokens"], p["hidden"]), {"bytes": p["bytes"]})[r["impl"]] = r["us_median"]
    rows = [{"bytes": t["bytes"], "fused_ll": t["fused_ll"], "other": min(t["fused_flat"], t["fused_tree"])}
            for t in times.values() if {"fused_ll", "fused_flat", "fused_tree"} <= t.keys()]
    if not rows:
        return None
    sizes, cut = best_cut(rows, "bytes", "fused_ll", "other")
    return sizes[cut - 1] if cut > 0 else None


def crossover(records: list[dict]) -> int | None:
    """``tree_min_bytes`` of store records of this bench."""
    return tree_min_bytes([{"mode": r["mode"], "tokens": r["params"]["tokens"], "hidden": r["params"]["hidden"],
                            "bytes": r["params"]["bytes"], "variant": r["impl"], "us_median": r["us_median"]}
                           for r in records if r["us_median"] is not None])


def report(args: argparse.Namespace, env: dict, records: list[dict], world: int, functional: bool) -> None:
    from bench.report import publish

    if functional:
        print("Functional run: Triton kernels in the CPU interpreter on shared memory; the times are the "
              "interpreter's and say nothing about GPU performance.")
    publish(records, args.out, on_gpu=not functional)
    fit = crossover(records)
    if args.write_thresholds and fit is not None and not functional:
        from shardkit import thresholds
        thresholds.write_rmsnorm_tree_min_bytes(env["gpu"], world, fit)
        print(f"stored rmsnorm tree_min_bytes[{env['gpu']!r}][{world}] = {fit}")
    from shardkit import thresholds
    for mode, key in thresholds.RMSNORM_LL_KEYS.items():
        ll_fit = ll_max_bytes(records, mode)
        print(f"LL rule fitted to the {mode} times: rmsnorm {key}[{env['gpu']!r}][{world}] = {ll_fit}")
        if args.write_thresholds and ll_fit is not None and not functional:
            thresholds.write_rmsnorm_ll_max_bytes(env["gpu"], world, ll_fit, mode=mode)
            print(f"stored rmsnorm {key}[{env['gpu']!r}][{world}] = {ll_fit}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default 1,8,16,32,64,128,256; CPU 1,5)")
    p.add_argument("--hidden", default=None, help="comma-separated hidden sizes (default 4096,8192; CPU 96)")
    p.add_argument("--modes", default="eager,graph")
    p.add_argument("--iters", type=int, default=None, help="calls per repetition (default 100; CPU 2)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 7; CPU 2)")
    p.add_argument("--out", default=None,
                   help="directory for records.jsonl and the tables (default: the store, bench/results, on GPUs; "
                        "nothing on CPU)")
    p.add_argument("--ll-segments", default="",
                   help="also time the LL kernel on grids of S blocks per row (comma-separated S in 1,2,4,8; GPUs)")
    p.add_argument("--cpu-world", type=int, default=0, help="no GPUs: run a CPU world of this many processes")
    p.add_argument("--write-thresholds", action="store_true",
                   help="store the fitted one-shot / two-shot crossover in shardkit/thresholds.json")
    args = p.parse_args()
    cpu = args.cpu_world > 0
    args.tokens = [int(t) for t in (args.tokens or ("1,5" if cpu else "1,8,16,32,64,128,256")).split(",")]
    args.hidden = [int(h) for h in (args.hidden or ("96" if cpu else "4096,8192")).split(",")]
    args.iters = args.iters or (2 if cpu else 100)
    args.reps = args.reps or (2 if cpu else 7)
    args.ll_segments = tuple(int(v) for v in args.ll_segments.split(",") if v)
    run_distributed(bench_rank, args, report)


if __name__ == "__main__":
    main()
