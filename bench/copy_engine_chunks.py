"""Copy-engine all-reduce: the pipeline chunk, scanned (calibrates ``copy_engine.copy_config``).

    torchrun --standalone --nproc-per-node=2 bench/copy_engine_chunks.py [--sizes 64M,256M]
        [--chunks 4M,8M,16M,32M,64M] [--modes graph] [--out DIR]

bf16; "copy" out of place on an ordinary tensor (staging overlapped), "copy_zc" zero-copy in place
(the input in the staging area), both on a communicator sized to the largest message, and NCCL in
place in the same run. Every configuration is checked against NCCL's result before it is timed.
Times: CUDA events around ``iters`` calls (one CUDA graph in graph mode), median of ``reps``, max
over ranks. Prints the table and appends records (bench "all_reduce_copy_chunks", params bytes and
chunk_bytes; chunk_bytes 0 = the launch policy's) to ``--out DIR``/records.jsonl or the store.
GPUs only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.all_reduce_sweep import parse_size  # noqa: E402
from bench.common import environment, max_over_ranks, time_cuda  # noqa: E402
from bench.records import append, current_commit, destination, record  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64M,256M")
    p.add_argument("--chunks", default="4M,8M,16M,32M,64M", help="chunk_bytes values; 0 = the launch policy's")
    p.add_argument("--modes", default="graph")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    import shardkit
    from shardkit.collectives import copy_engine

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    chunks = [parse_size(c) for c in args.chunks.split(",")]
    comm = shardkit.Communicator(buffer_bytes=max(sizes))
    env, commit, records, rows = environment(), current_commit(), [], []

    def sync() -> None:
        dist.barrier()
        torch.cuda.synchronize()

    for nbytes in sizes:
        numel = nbytes // 2
        x = torch.randn(numel, generator=torch.Generator().manual_seed(7 + rank)).to(torch.bfloat16).cuda()
        ref = x.clone()
        dist.all_reduce(ref)
        staged = comm.staging_buffer((numel,), torch.bfloat16)
        out = torch.empty_like(x)
        scratch = x.clone()
        cases = [("nccl", 0, lambda: dist.all_reduce(scratch), None)]
        for chunk in chunks:
            kw = dict(timeout_iters=comm._timeout_iters, config=copy_engine.CopyConfig(chunk) if chunk else None)
            cases.append(("copy", chunk, lambda kw=kw: copy_engine.all_reduce(comm.memory, x, out, **kw), out))
            cases.append(("copy_zc", chunk, lambda kw=kw: copy_engine.all_reduce(comm.memory, staged, staged, **kw),
                          staged))
        for impl, chunk, fn, got in cases:
            if got is not None:  # one checked call first (the zero-copy input is the output: x first)
                if got is out:
                    got.fill_(float("nan"))
                else:
                    got.copy_(x)
                fn()
                torch.cuda.synchronize()
                rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
                assert rel <= 1e-2, f"{impl} chunk {chunk}: relative error {rel:.3g} against NCCL"
            for mode in args.modes.split(","):
                staged.copy_(x)
                us = max_over_ranks(time_cuda(fn, args.iters, args.reps, mode == "graph", sync), x.device)
                records.append(record("all_reduce_copy_chunks", impl, gpu=env["gpu"], world=world, dtype=torch.bfloat16,
                                      mode=mode, params={"bytes": nbytes, "chunk_bytes": chunk}, us=us,
                                      commit=commit))
                rows.append((nbytes >> 20, impl, chunk >> 20, mode, statistics.median(us)))
    comm.check()
    comm.close()
    if rank == 0:
        print(f"{env['gpu']} x{world}, bf16, us per call (median, max over ranks); chunk 0 = launch policy")
        print("| MiB | impl | chunk MiB | mode | us |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} |")
        path = destination(args.out, on_gpu=True)
        print(f"appended {append(records, path)} records to {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
