#!/usr/bin/env python
"""Where an eager all-reduce call spends its time: host path vs GPU, per host path and kernel family.

For each size (``--sizes``, bf16) and implementation:
  * ``host_us``: Python time per call to enqueue ``--calls`` calls back to back (no sync);
  * ``eager_us``: wall time per call of the same loop including the final synchronize;
  * ``launch_us`` (shardkit's Python host path only): time of the launch call alone
    (``Communicator._launch``), and ``pre_launch_us``: the rest of ``all_reduce`` before it.
Implementations: NCCL; shardkit's auto / flat / tree on the CUDA kernels through the C++ host path
(``*_cuda_cpp``, ``Communicator(host_path="cpp")``, shardkit._C) and through the Python host path
(``*_cuda_python``); flat on the Triton kernels; torch's symmetric-memory two-shot (``symm_2shot``,
out of place from a symmetric buffer, the sweep's baseline). Out-of-place calls into one ``out``.
Then, on rank 0, a cProfile of the Python host path's flat calls at the first size, printed.
The records (``eager_us`` as the time, the rest as metrics, rank 0's) go to the store
(bench/results/records.jsonl, or ``--out DIR``/records.jsonl) with the table
``profile_eager_<card>_x<world>.md`` (bench/report.py).

    torchrun --standalone --nproc-per-node=2 bench/profile_eager.py [--sizes 1K,64K,1M,4M]
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
from bench.all_reduce_sweep import parse_sizes, symm_mem_algos  # noqa: E402
from bench.common import environment, header_lines  # noqa: E402
from bench.records import record  # noqa: E402
from bench.report import publish  # noqa: E402
from shardkit.collectives import host_path  # noqa: E402
from shardkit.collectives.communicator import Communicator  # noqa: E402
from shardkit.kernels.all_reduce import cuda as cuda_dda  # noqa: E402


def per_call_us(fn, calls: int, sync: bool) -> float:
    dist.barrier()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def launch_split(comm: Communicator, call, calls: int) -> dict:
    """The Python host path's time per call split into the launch (``_launch``) and everything before."""
    launch, spent = comm._launch, []

    def timed_launch(*a, **kw) -> None:
        t = time.perf_counter()
        launch(*a, **kw)
        spent.append(time.perf_counter() - t)

    comm._launch = timed_launch
    try:
        host = per_call_us(call, calls, sync=False)
    finally:
        del comm._launch  # the class's method again
    launch_us = sum(spent) / calls * 1e6  # per all_reduce call (its chunks' launches summed)
    return {"launch_us": launch_us, "pre_launch_us": host - launch_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="directory for records.jsonl and the tables (default: the store)")
    ap.add_argument("--sizes", default="1K,16K,64K,256K,1M,4M", help="'1K-4M' (x4 steps) or a list '4K,1M'")
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dev = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", device_id=dev)
    rank, world = dist.get_rank(), dist.get_world_size()
    env = environment()
    comms = {"triton": Communicator(kernels="triton")}
    if cuda_dda.available():
        comms["python"] = Communicator(kernels="cuda", host_path="python")
        if host_path.available():
            comms["cpp"] = Communicator(kernels="cuda", host_path="cpp")
    baselines = symm_mem_algos(dist.group.WORLD.group_name)
    cases = [("nccl", "triton")]
    for host in ("cpp", "python"):
        if host in comms:
            cases += [("auto", host), ("flat", host), ("tree", host)]
    cases += [("flat", "triton")] + ([("symm_2shot", "")] if "symm_2shot" in baselines else [])
    rows, profile_text = [], ""
    for size_index, nbytes in enumerate(parse_sizes(args.sizes)):
        torch.manual_seed(size_index)  # the same x on every rank: the sum is world * x
        x = torch.randn(nbytes // 2, device=dev).to(torch.bfloat16)
        for algo, host in cases:
            comm = comms.get(host)
            impl = (algo if algo in ("nccl", "symm_2shot") else
                    f"{algo}_triton" if host == "triton" else f"{algo}_cuda_{host}")
            if algo == "symm_2shot":
                call, out = baselines[algo](x)
                if call is None:  # this torch has no two_shot_all_reduce_out
                    continue
            else:
                out = torch.empty_like(x)

                def call(comm=comm, algo=algo, out=out) -> None:
                    comm.all_reduce(x, algo=algo, out=out)

            for _ in range(20):
                call()
            row = {"host_us": per_call_us(call, args.calls, sync=False)}
            eager_us = per_call_us(call, args.calls, sync=True)
            if host == "python" and algo != "nccl":
                row.update(launch_split(comm, call, args.calls))
            torch.cuda.synchronize()
            ok = bool(torch.allclose(out.float(), x.float() * world, rtol=2e-2, atol=1e-2))
            rows.append(record("profile_eager", impl, gpu=env["gpu"], world=world, dtype=x.dtype, mode="eager",
                               params={"bytes": nbytes, "calls": args.calls}, us=[eager_us],
                               metrics={k: round(v, 2) for k, v in row.items()}, error=None if ok else "wrong result"))
            if rank == 0:
                print(f"{nbytes:>9} B {impl:>18}: eager {eager_us:6.2f} us, " +
                      ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
            if size_index == 0 and host == "python" and algo == "flat":
                prof = cProfile.Profile()
                dist.barrier()
                prof.enable()
                for _ in range(args.calls):
                    call()
                prof.disable()
                torch.cuda.synchronize()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
                profile_text = buf.getvalue()
    for c in comms.values():
        c.check()
    if rank == 0:
        print("\n".join(header_lines(env)))
        print("cProfile of the Python host path's flat calls at the first size (top 15 by own time):")
        print(profile_text)
        publish(rows, args.out, on_gpu=True)
    for c in comms.values():
        c.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
