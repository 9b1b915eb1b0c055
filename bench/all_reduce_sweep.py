"""NCCL vs DDA all-reduce sweep: latency and bus bandwidth against message size.

GPUs (one process per GPU):
    torchrun --standalone --nproc-per-node=4 bench/all_reduce_sweep.py [--sizes 1K-256M] [--dtype bf16]
No GPU: the same Triton kernels in the interpreter on a CPU world (a functional run, not a
performance one; the numbers are the interpreter's):
    python bench/all_reduce_sweep.py --cpu-world 4

Every algorithm's result is checked against NCCL's (gloo's on CPU) before it is timed; a wrong
answer is reported as an error, not a time. Times: CUDA events around ``iters`` calls, median of
``reps`` repetitions, max over ranks; "graph" mode captures the ``iters`` calls in one CUDA graph.
Prints the table; a GPU run appends its records to the store (bench/results/records.jsonl, or
``--out DIR``/records.jsonl) and rewrites the sweep's table and plot there
(``all_reduce_<card>_x<world>.md``/``.png``, bench/report.py). A CPU run writes records and tables
only with ``--out``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (environment, header_lines, max_over_ranks, run_distributed, time_cuda,  # noqa: E402
                          time_host)
from bench.records import current_commit, record  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OURS = ("flat", "tree", "auto", "ll")  # ll: the one-synchronisation kernel (CUDA kernels only)
# The same algorithms on the Triton kernels, when the default communicator runs the CUDA ones.
TRITON = ("flat_triton", "tree_triton")
# The copy-engine algorithm: "copy" out of place on an ordinary tensor on the default communicator (what
# ``auto`` runs when its rules pick copy; larger messages than its workspace take the oneshot schedule's
# ring of slots on 2 GPUs); "copy_zc" zero-copy in place (the input written in the staging area) on a
# communicator whose buffer holds the largest message (--copy-buffer).
COPY = ("copy", "copy_zc")


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


def impl_name(algo: str, kernels: str) -> str:
    """The store's name of an algorithm: shardkit's carry their kernel family (flat_cuda, auto_triton)."""
    return f"{algo}_{kernels}" if algo in OURS else algo


def sweep_rank(args: argparse.Namespace) -> tuple[dict, list[dict]] | None:
    """Run the sweep on this rank; rank 0 returns (environment, store records)."""
    import shardkit
    from shardkit import thresholds

    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = dist.get_backend() != "nccl"
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype]
    env = environment()
    comm = shardkit.Communicator()
    env["kernels"] = comm.kernels  # flat/tree/auto's kernel family (the rules are fitted to it)
    triton_comm = shardkit.Communicator(kernels="triton") if comm.kernels != "triton" else None
    group_name = dist.group.WORLD.group_name
    extra = {} if cpu else symm_mem_algos(group_name)
    algos = [a for a in args.algos.split(",")
             if (a in ("nccl",) + OURS + COPY and not (a == "ll" and comm.kernels != "cuda")) or a in extra
             or (a in TRITON and triton_comm is not None)]
    modes = ["eager"] if cpu else args.modes.split(",")
    sizes = parse_sizes(args.sizes)
    elt = torch.empty((), dtype=dtype).element_size()
    copy_buffer = args.copy_buffer or max(sizes)
    copy_comm = shardkit.Communicator(buffer_bytes=copy_buffer) if "copy_zc" in algos else None

    def sync() -> None:
        dist.barrier()
        if not cpu:
            torch.cuda.synchronize()

    commit = current_commit()
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
            elif algo == "copy":
                out = torch.empty_like(x)
                fn, got = (lambda o=out: comm.all_reduce(x, algo="copy", out=o)), out
            elif algo == "copy_zc":  # in place, so every call sums the last result: no NaN poison, x first
                got = copy_comm.staging_buffer(x.shape, dtype)
                fn = lambda g=got: copy_comm.all_reduce_(g, algo="copy")  # noqa: E731
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
                if algo in ("auto", "copy_zc"):
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
                metrics, samples = {}, None
                if algo == "auto":  # the Communicator's own rule: thresholds, or NCCL without peer memory
                    metrics["auto_picked"] = ("nccl" if comm.memory is None
                                              else thresholds.choose(comm.rules, numel * elt))
                if not bad.item():
                    if cpu:
                        samples = time_host(fn, iters, args.reps, sync)
                    else:
                        samples = time_cuda(fn, iters, args.reps, mode == "graph", sync)
                    samples = max_over_ranks(samples, device)  # each repetition: the slowest rank
                    busbw = numel * elt / (statistics.median(samples) * 1e-6) / 1e9 * 2 * (world - 1) / world
                    metrics["busbw_gbps"] = round(busbw, 2)
                buffer_bytes = copy_buffer if algo == "copy_zc" else comm.memory.buffer_bytes if algo == "copy" else 0
                params = {"bytes": numel * elt, **({"buffer_bytes": buffer_bytes} if buffer_bytes else {})}
                records.append(record("all_reduce", impl_name(algo, comm.kernels), gpu=env["gpu"], world=world,
                                      dtype=dtype, mode="cpu" if cpu else mode, params=params,
                                      us=samples, metrics=metrics, commit=commit,
                                      error=None if samples else error or "wrong result on another rank"))
                if bar:
                    bar.update(1)
        sync()
    if bar:
        bar.close()
    comm.close()
    for extra_comm in (triton_comm, copy_comm):
        if extra_comm is not None:
            extra_comm.close()
    return (env, records) if rank == 0 else None


def derive_rules(records: list[dict], kernels: str, mode: str | None = None) -> list[tuple[int | None, str]]:
    """Fastest of flat/tree/ll (of the given kernel family), copy (on the default communicator) and nccl
    per measured size in ``mode`` (default: graph mode if measured, else eager), as threshold rules."""
    if mode is None:
        mode = "graph" if any(r["mode"] == "graph" for r in records) else "eager"
    candidates = {impl_name(a, kernels): a for a in ("flat", "tree", "nccl", "ll", "copy")}
    best = {}
    for r in records:
        nbytes = r["params"]["bytes"]
        if r["mode"] == mode and r["impl"] in candidates and r["us_median"] is not None:
            if nbytes not in best or r["us_median"] < best[nbytes][0]:
                best[nbytes] = (r["us_median"], candidates[r["impl"]])
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


def splice_rules(old: list[tuple[int | None, str]], fitted: list[tuple[int | None, str]],
                 lo: int) -> list[tuple[int | None, str]]:
    """The stored rules below ``lo`` bytes (the smallest size measured), ``fitted`` from ``lo`` on: a
    sweep over some sizes (e.g. 16M,64M,256M) refits only the range it measured."""
    from shardkit import thresholds

    rules = [(b, a) for b, a in old if b is not None and b < lo]
    if lo > 0 and (not rules or rules[-1][0] < lo - 1):
        rules.append((lo - 1, thresholds.choose(old, lo - 1)))
    for b, a in fitted:
        if rules and rules[-1][1] == a:
            rules[-1] = (b, a)
        else:
            rules.append((b, a))
    return rules


def report(args: argparse.Namespace, env: dict, records: list[dict], world: int, functional: bool) -> None:
    from bench.report import publish

    print("\n".join(header_lines(env)))
    if functional:
        print("Functional run: Triton kernels in the CPU interpreter on shared memory; the times are the "
              "interpreter's and say nothing about GPU performance.")
    publish(records, args.out, on_gpu=not functional)
    if args.write_thresholds and not functional:
        from shardkit import thresholds
        lo = min(r["params"]["bytes"] for r in records)
        # Graph rules (auto inside captures, and where no eager rules are stored), then eager ones.
        for mode in [m for m in ("graph", "eager") if any(r["mode"] == m for r in records)]:
            old = thresholds.select_rules(env["gpu"], world, mode=mode)
            rules = splice_rules(old, derive_rules(records, env["kernels"], mode), lo)
            thresholds.write_rules(env["gpu"], world, rules, mode=mode)
            print(f"thresholds ({mode}) for {env['gpu']} x{world} (measured from {lo} bytes on): {rules} "
                  f"-> {thresholds.PATH}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="'1K-256M' (x4 steps) or a list '4K,1M' (default 1K-256M; CPU 1K-64K)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--algos", default="nccl,flat,tree,auto,flat_triton,tree_triton,copy,copy_zc,symm_1shot,symm_2shot",
                   help="flat/tree/auto use the CUDA kernels where built (else Triton); *_triton force Triton; "
                        "ll (CUDA kernels only, e.g. --algos nccl,flat,ll --sizes 1K-256K) is skipped elsewhere")
    p.add_argument("--modes", default="eager,graph")
    p.add_argument("--copy-buffer", type=parse_size, default=None,
                   help="buffer_bytes of the communicator of copy_zc (default: the largest size)")
    p.add_argument("--iters", type=int, default=None, help="calls per repetition (default 100; CPU 3)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 7; CPU 3)")
    p.add_argument("--out", default=None,
                   help="directory for records.jsonl and the tables (default: the store, bench/results, on GPUs; "
                        "nothing on CPU)")
    p.add_argument("--write-thresholds", action="store_true",
                   help="store the measured crossovers for algo='auto' (from the smallest size measured on; the "
                        "stored rules below it stay)")
    p.add_argument("--cpu-world", type=int, default=0, help="no GPUs: run a CPU world of this many processes")
    args = p.parse_args()
    cpu = args.cpu_world > 0
    args.sizes = args.sizes or ("1K-64K" if cpu else "1K-256M")
    args.iters = args.iters or (3 if cpu else 100)
    args.reps = args.reps or (3 if cpu else 7)
    run_distributed(sweep_rank, args, report)


if __name__ == "__main__":
    main()
