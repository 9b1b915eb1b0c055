"""NCCL vs DDA all-reduce sweep: latency and bus bandwidth against message size.

GPUs (one process per GPU):
    torchrun --standalone --nproc-per-node=4 bench/all_reduce_sweep.py [--sizes 1K-256M] [--dtype bf16]
No GPU: the same Triton kernels in the interpreter on a CPU world (a functional run, not a
performance one; the numbers are the interpreter's):
    python bench/all_reduce_sweep.py --cpu-world 4

Every algorithm's result is checked against NCCL's (gloo's on CPU) before it is timed; a wrong
answer is reported as an error, not a time. Times: CUDA events around ``iters`` calls, median of
``reps`` repetitions, max over ranks; "graph" mode captures the ``iters`` calls in one CUDA graph.
Writes bench/results/all_reduce_<card>_x<world>_<date>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (environment, header_lines, max_over_ranks, results_stem, run_distributed,  # noqa: E402
                          summarize, time_cuda, time_host, write_json)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OURS = ("flat", "tree", "auto")
# The same algorithms on the Triton kernels, when the default communicator runs the CUDA ones.
TRITON = ("flat_triton", "tree_triton")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def parse_sizes(text: str) -> list[int]:
    """'1K-256M' (powers of 4 between) or '4K,64K,1M'."""
    if "-" in text:
        lo, hi = (parse_size(t) for t in text.split("-"))
        sizes = []
        while lo <= hi:
            sizes.append(lo)
            lo *= 4
        return sizes
    return [parse_size(t) for t in text.split(",")]


def human(nbytes: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= div:
            return f"{nbytes / div:g} {unit}"
    return f"{nbytes} B"


def symm_mem_algos(group_name: str):
    """torch's own symmetric-memory one-shot/two-shot ops, where the installed torch has them."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
        ops = torch.ops.symm_mem
        ops.one_shot_all_reduce  # noqa: B018 (probe)
    except (ImportError, AttributeError, RuntimeError):
        return {}

    def make(name: str):
        def setup(x: torch.Tensor):
            buf = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
            symm_mem.rendezvous(buf, group_name)
            buf.copy_(x)
            out = torch.empty_like(x)
            if name == "symm_1shot":
                return lambda: ops.one_shot_all_reduce_out(buf, "sum", group_name, out), out
            if hasattr(ops, "two_shot_all_reduce_out"):
                return lambda: ops.two_shot_all_reduce_out(buf, "sum", group_name, out), out
            return None, None
        return setup
    return {"symm_1shot": make("symm_1shot"), "symm_2shot": make("symm_2shot")}


def sweep_rank(args: argparse.Namespace) -> list[dict] | None:
    """Run the sweep on this rank; rank 0 returns the records."""
    import shardkit

    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = dist.get_backend() != "nccl"
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype]
    env = environment()
    comm = shardkit.Communicator()
    triton_comm = shardkit.Communicator(kernels="triton") if comm.kernels != "triton" else None
    group_name = dist.group.WORLD.group_name
    extra = {} if cpu else symm_mem_algos(group_name)
    algos = [a for a in args.algos.split(",")
             if a in ("nccl",) + OURS or a in extra or (a in TRITON and triton_comm is not None)]
    modes = ["eager"] if cpu else args.modes.split(",")
    sizes = parse_sizes(args.sizes)
    elt = torch.empty((), dtype=dtype).element_size()

    def sync() -> None:
        dist.barrier()
        if not cpu:
            torch.cuda.synchronize()

    steps = [(s, a, m) for s in sizes for a in algos for m in modes]
    bar = None
    if rank == 0:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(steps), desc="all-reduce sweep", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass
    records = []
    for nbytes in sizes:
        numel = max(1, nbytes // elt)
        gen = torch.Generator().manual_seed(1234 + rank)
        x = torch.randn(numel, generator=gen).to(dtype).to(device)
        ref = x.clone()
        dist.all_reduce(ref)
        iters = args.iters if cpu else max(10, min(args.iters, int(2e9 // max(nbytes, 1) // 4)))
        for algo in algos:
            error = None
            if algo == "nccl":
                scratch = x.clone()
                fn, got = (lambda: dist.all_reduce(scratch)), None
            elif algo == "auto":
                # In place, like the NCCL baseline: auto hands large messages to NCCL, and an
                # out-of-place NCCL call would add a copy that the baseline does not pay.
                got = x.clone()
                fn = lambda: comm.all_reduce_(got, algo="auto")  # noqa: E731
            elif algo in OURS:
                out = torch.empty_like(x)
                fn, got = (lambda a=algo, o=out: comm.all_reduce(x, algo=a, out=o)), out
            elif algo in TRITON:
                out = torch.empty_like(x)
                fn, got = (lambda a=algo.split("_")[0], o=out: triton_comm.all_reduce(x, algo=a, out=o)), out
            else:
                fn, got = extra[algo](x)
                if fn is None:
                    if bar:
                        bar.update(len(modes))
                    continue
            if got is not None:
                if algo == "auto":
                    got.copy_(x)
                else:
                    got.fill_(float("nan"))
                fn()
                if not cpu:
                    torch.cuda.synchronize()
                rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
                limit = 1e-5 if dtype == torch.float32 else 1e-2
                if not rel <= limit:
                    error = f"wrong result: relative error {rel:.3g} vs NCCL"
            bad = torch.tensor([error is not None], dtype=torch.int32, device=device)
            dist.all_reduce(bad)
            for mode in modes:
                rec = {"gpu": env["gpu"], "world": world, "dtype": args.dtype, "algo": algo, "mode": mode,
                       "bytes": numel * elt, "kernels": comm.kernels if algo in OURS else
                       ("triton" if algo in TRITON else None)}
                if bad.item():
                    rec["error"] = error or "wrong result on another rank"
                else:
                    if cpu:
                        samples = time_host(fn, iters, args.reps, sync)
                    else:
                        samples = time_cuda(fn, iters, args.reps, mode == "graph", sync)
                    samples = max_over_ranks(samples, device)  # each repetition: the slowest rank
                    rec.update(summarize(samples))
                    t = rec["us_median"] * 1e-6
                    rec["algbw_gbps"] = rec["bytes"] / t / 1e9
                    rec["busbw_gbps"] = rec["algbw_gbps"] * 2 * (world - 1) / world
                records.append(rec)
                if bar:
                    bar.update(1)
        sync()
    if bar:
        bar.close()
    comm.close()
    if triton_comm is not None:
        triton_comm.close()
    return (env, records) if rank == 0 else None


def add_speedups(records: list[dict]) -> None:
    base = {(r["mode"], r["bytes"]): r["us_median"] for r in records if r["algo"] == "nccl" and "us_median" in r}
    for r in records:
        b = base.get((r["mode"], r["bytes"]))
        if b and "us_median" in r:
            r["speedup_vs_nccl"] = b / r["us_median"]


def markdown(env: dict, records: list[dict], world: int, dtype: str, functional: bool) -> str:
    lines = [f"# All-reduce sweep: {env['gpu']}, {world} ranks, {dtype}", ""]
    if functional:
        lines += ["**Functional run**: Triton kernels in the CPU interpreter on shared memory; the times "
                  "are the interpreter's and say nothing about GPU performance.", ""]
    lines += ["```"] + header_lines(env) + ["```", ""]
    lines += ["Median µs per call, max over ranks (speedup vs NCCL in the same mode in brackets); "
              "busbw = bytes/time * 2(W-1)/W. nccl and auto run in place, flat/tree/symm out of place.", ""]
    algos = list(dict.fromkeys(r["algo"] for r in records))
    for mode in dict.fromkeys(r["mode"] for r in records):
        lines += [f"## {mode}", "", "| size | " + " | ".join(algos) + " | best busbw GB/s |",
                  "|---|" + "---|" * (len(algos) + 1)]
        for nbytes in sorted({r["bytes"] for r in records}):
            row, best = [], 0.0
            for a in algos:
                r = next((r for r in records if r["algo"] == a and r["mode"] == mode and r["bytes"] == nbytes), None)
                if r is None:
                    row.append("-")
                elif "error" in r:
                    row.append(f"ERROR: {r['error']}")
                else:
                    sp = f" ({r['speedup_vs_nccl']:.2f}x)" if a != "nccl" and "speedup_vs_nccl" in r else ""
                    row.append(f"{r['us_median']:.1f}{sp}")
                    best = max(best, r["busbw_gbps"])
            lines.append(f"| {human(nbytes)} | " + " | ".join(row) + f" | {best:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(path: str, env: dict, records: list[dict], world: int, dtype: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    modes = list(dict.fromkeys(r["mode"] for r in records))
    algos = list(dict.fromkeys(r["algo"] for r in records))
    color = {a: f"C{i}" for i, a in enumerate(algos)}  # one colour per algorithm in every panel
    fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 8), squeeze=False)
    for col, mode in enumerate(modes):
        for algo in algos:
            rs = sorted((r for r in records if r["algo"] == algo and r["mode"] == mode and "us_median" in r),
                        key=lambda r: r["bytes"])
            if not rs:
                continue
            xs = [r["bytes"] for r in rs]
            axes[0][col].plot(xs, [r["us_median"] for r in rs], marker="o", label=algo, color=color[algo])
            if algo != "nccl":
                axes[1][col].plot(xs, [r.get("speedup_vs_nccl", float("nan")) for r in rs], marker="o", label=algo,
                                  color=color[algo])
        axes[0][col].set(xscale="log", yscale="log", ylabel="µs per call (median, max over ranks)",
                         title=f"{mode}: {env['gpu']} x{world}, {dtype}")
        axes[1][col].set(xscale="log", xlabel="message size (bytes)", ylabel="speedup vs NCCL")
        axes[1][col].axhline(1.0, color="gray", lw=0.8)
        for ax in axes[:, col]:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def derive_rules(records: list[dict]) -> list[tuple[int | None, str]]:
    """Fastest of flat/tree/nccl per measured size (graph mode if measured), as threshold rules."""
    mode = "graph" if any(r["mode"] == "graph" for r in records) else "eager"
    best = {}
    for r in records:
        if r["mode"] == mode and r["algo"] in ("flat", "tree", "nccl") and "us_median" in r:
            if r["bytes"] not in best or r["us_median"] < best[r["bytes"]][0]:
                best[r["bytes"]] = (r["us_median"], r["algo"])
    rules: list[tuple[int | None, str]] = []
    for nbytes in sorted(best):
        algo = best[nbytes][1]
        if rules and rules[-1][1] == algo:
            rules[-1] = (nbytes, algo)
        else:
            rules.append((nbytes, algo))
    if rules:
        rules[-1] = (None, rules[-1][1])
    return rules


def report(args: argparse.Namespace, env: dict, records: list[dict], world: int, functional: bool) -> None:
    add_speedups(records)
    what = "all_reduce_functional" if functional else "all_reduce"
    stem = results_stem(args.out, what, env, world)
    write_json(stem + ".json", {"env": env, "functional": functional, "args": vars(args), "records": records})
    text = markdown(env, records, world, args.dtype, functional)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    plot(stem + ".png", env, records, world, args.dtype)
    print(text)
    print(f"\nwrote {stem}.json, .md, .png")
    if args.write_thresholds and not functional:
        from shardkit import thresholds
        rules = derive_rules(records)
        thresholds.write_rules(env["gpu"], world, rules)
        print(f"thresholds for {env['gpu']} x{world}: {rules} -> {thresholds.PATH}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="'1K-256M' (x4 steps) or a list '4K,1M' (default 1K-256M; CPU 1K-64K)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--algos", default="nccl,flat,tree,auto,flat_triton,tree_triton,symm_1shot,symm_2shot",
                   help="flat/tree/auto use the CUDA kernels where built (else Triton); *_triton force Triton")
    p.add_argument("--modes", default="eager,graph")
    p.add_argument("--iters", type=int, default=None, help="calls per repetition (default 100; CPU 3)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 7; CPU 3)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--write-thresholds", action="store_true", help="store the measured crossovers for algo='auto'")
    p.add_argument("--cpu-world", type=int, default=0, help="no GPUs: run a CPU world of this many processes")
    args = p.parse_args()
    cpu = args.cpu_world > 0
    args.sizes = args.sizes or ("1K-64K" if cpu else "1K-256M")
    args.iters = args.iters or (3 if cpu else 100)
    args.reps = args.reps or (3 if cpu else 7)
    run_distributed(sweep_rank, args, report)


if __name__ == "__main__":
    main()
