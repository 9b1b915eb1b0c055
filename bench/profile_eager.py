#!/usr/bin/env python
"""Where an eager all-reduce call spends its time: host path vs GPU, per kernel family.

For each (algo, kernels) at a decode size (``--bytes``, default 32 KiB bf16):
  * ``host_us``: Python time per call to enqueue ``--calls`` calls back to back (no sync);
  * ``eager_us``: wall time per call of the same loop including the final synchronize;
  * ``launch_us`` (shardkit only): time of the launch call alone (``Communicator._launch``),
    and ``pre_launch_us``: the rest of ``all_reduce`` before it.
Then, on rank 0, a cProfile of the Triton path's calls (top functions by total time), printed.
The records (``eager_us`` as the time, the rest as metrics) go to the store
(bench/results/records.jsonl, or ``--out DIR``/records.jsonl) with the table
``profile_eager_<card>_x<world>.md`` (bench/report.py).

    torchrun --standalone --nproc-per-node=2 bench/profile_eager.py
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.common import environment, header_lines  # noqa: E402
from bench.records import record  # noqa: E402
from bench.report import publish  # noqa: E402
from shardkit.collectives.communicator import Communicator  # noqa: E402


def per_call_us(fn, calls: int, sync: bool) -> float:
    dist.barrier()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="directory for records.jsonl and the tables (default: the store)")
    ap.add_argument("--bytes", type=int, default=32 * 1024)
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dev = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", device_id=dev)
    rank, world = dist.get_rank(), dist.get_world_size()
    env = environment()
    torch.manual_seed(0)  # the same x on every rank: the sum is world * x
    x = torch.randn(args.bytes // 2, device=dev).to(torch.bfloat16)
    out = torch.empty_like(x)
    comms = {k: Communicator(kernels=k) for k in ("cuda", "triton")}
    rows, profile_text = [], ""
    cases = [("nccl", "cuda"), ("flat", "cuda"), ("flat", "triton"), ("tree", "cuda"), ("tree", "triton")]
    for algo, kernels in cases:
        comm = comms[kernels]

        def call() -> None:
            comm.all_reduce(x, algo=algo, out=out)

        for _ in range(20):
            call()
        row = {"host_us": per_call_us(call, args.calls, sync=False)}
        eager_us = per_call_us(call, args.calls, sync=True)
        if algo != "nccl":  # split the host path: everything before the launch, and the launch
            launch, spent = comm._launch, []

            def timed_launch(*a, **kw) -> None:
                t = time.perf_counter()
                launch(*a, **kw)
                spent.append(time.perf_counter() - t)

            comm._launch = timed_launch
            host = per_call_us(call, args.calls, sync=False)
            comm._launch = launch
            row["launch_us"] = sum(spent) / len(spent) * 1e6
            row["pre_launch_us"] = host - row["launch_us"]
        torch.cuda.synchronize()
        ok = bool(torch.allclose(out.float(), x.float() * world, rtol=2e-2, atol=1e-2))
        rows.append(record("profile_eager", algo if algo == "nccl" else f"{algo}_{kernels}", gpu=env["gpu"],
                           world=world, dtype=x.dtype, mode="eager", params={"bytes": args.bytes, "calls": args.calls},
                           us=[eager_us], metrics={k: round(v, 2) for k, v in row.items()},
                           error=None if ok else "wrong result"))
        if rank == 0:
            print(f"{rows[-1]['impl']}: eager {eager_us:.2f} us, " +
                  ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        if kernels == "triton" and algo == "flat":
            prof = cProfile.Profile()
            dist.barrier()
            prof.enable()
            for _ in range(args.calls):
                call()
            prof.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            profile_text = buf.getvalue()
    for c in comms.values():
        c.check()
    if rank == 0:
        print("\n".join(header_lines(env)))
        print("cProfile of the Triton flat path (top 25 by own time):")
        print(profile_text)
        publish(rows, args.out, on_gpu=True)
    for c in comms.values():
        c.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
