"""Tile/grid tuning for the DDA kernels: time flat and tree over their launch grids.

    torchrun --standalone --nproc-per-node=4 bench/tune_all_reduce.py
    torchrun --standalone --nproc-per-node=4 bench/tune_all_reduce.py --kernels cuda --algos tree

Triton kernels: (BLOCK, max programs, warps). CUDA kernels: (threads, unroll, programs), unroll
being the 16-byte packs per thread per tile. Each grid is passed to the Communicator as a launch
config (``FlatConfig``/``TreeConfig``/``CudaConfig``); the shipped policy (``flat_config``,
``tree_config`` beside each kernel) is timed too, as "default".

CUDA-graph mode (``iters`` calls captured in one graph), bf16, median of reps, max over ranks,
NCCL measured in the same run. Each result is checked against NCCL before it is timed. The records
(impl ``<algo>_<kernels>``, params ``bytes``, ``kernels``, ``config``) go to the store
(bench/results/records.jsonl, or ``--out DIR``/records.jsonl) with the table
``tune_all_reduce_<card>_x<world>.md`` (bench/report.py).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.all_reduce_sweep import parse_sizes  # noqa: E402
from bench.common import environment, max_over_ranks, time_cuda  # noqa: E402
from bench.records import record  # noqa: E402
from bench.report import human, publish  # noqa: E402

GRID_NAMES = {"triton": ("block", "programs", "warps"), "cuda": ("threads", "unroll", "programs")}


def configs(args: argparse.Namespace, numel: int, world: int) -> list[tuple[str, object]]:
    """(algo, grid) pairs to time: Triton (BLOCK, programs, warps); CUDA (threads, unroll, programs)
    and "default". Grids with more programs than tiles are left out (the same as fewer)."""
    out = []
    for algo in args.algos.split(","):
        elements = -(-numel // world) if algo == "tree" else numel
        out.append((algo, "default"))
        if args.kernels == "triton":
            for block, progs, warps in itertools.product(map(int, args.blocks.split(",")),
                                                         map(int, args.programs.split(",")),
                                                         map(int, args.warps.split(","))):
                if progs <= max(1, -(-elements // block)):
                    out.append((algo, (block, progs, warps)))
            continue
        for threads, unroll, progs in itertools.product(map(int, args.threads.split(",")),
                                                        map(int, args.unrolls.split(",")),
                                                        map(int, args.programs.split(","))):
            if (algo == "flat" and unroll > 1) or (algo == "tree" and unroll > 16 // world):
                continue
            if progs <= max(1, -(-elements // (threads * 8 * unroll))):
                out.append((algo, (threads, unroll, progs)))
    return out


def launch_config(kernels: str, algo: str, grid: tuple[int, int, int], elements: int, element_size: int):
    """The launch config of a tuning grid for ``elements`` per rank (flat) or per shard (tree)."""
    from shardkit.kernels.all_reduce import cuda as cuda_dda
    from shardkit.kernels.all_reduce.flat import FlatConfig
    from shardkit.kernels.all_reduce.tree import TreeConfig
    if kernels == "cuda":
        threads, unroll, progs = grid
        return cuda_dda.CudaConfig(cuda_dda.grid(elements, element_size, threads, unroll, progs), threads, unroll)
    block, progs, warps = grid
    programs = max(1, min(progs, -(-elements // block)))
    return (FlatConfig if algo == "flat" else TreeConfig)(block, programs, warps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4K,64K,256K,1M,4M,16M")
    p.add_argument("--blocks", default="1024,2048,4096,8192")
    p.add_argument("--programs", default="1,4,8,16,32,64,132")
    p.add_argument("--warps", default="4,8,16")
    p.add_argument("--algos", default="flat,tree")
    p.add_argument("--kernels", default="triton", choices=("triton", "cuda"))
    p.add_argument("--threads", default="128,256", help="CUDA: threads per program")
    p.add_argument("--unrolls", default="1,2,4", help="CUDA: 16-byte packs per thread per tile")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="directory for records.jsonl and the tables (default: the store)")
    args = p.parse_args()

    import shardkit
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank)
    comm = shardkit.Communicator(kernels=args.kernels)
    from shardkit.kernels.all_reduce.tree import shard_elements
    env = environment()
    records: list[dict] = []

    def keep(impl: str, params: dict, samples: list[float] | None, error: str | None = None) -> dict:
        records.append(record("tune_all_reduce", impl, gpu=env["gpu"], world=world, dtype=torch.bfloat16,
                              mode="graph", params=params, us=samples, error=error))
        return records[-1]

    def sync() -> None:
        dist.barrier()
        torch.cuda.synchronize()

    for nbytes in parse_sizes(args.sizes):
        numel = nbytes // 2
        x = torch.randn(numel, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16).to(device)
        ref = x.clone()
        dist.all_reduce(ref)
        scratch = x.clone()
        nccl = keep("nccl", {"bytes": nbytes}, max_over_ranks(
            time_cuda(lambda: dist.all_reduce(scratch), args.iters, args.reps, True, sync), device))
        best: dict[str, tuple] = {}
        for algo, config in configs(args, numel, world):
            elements = shard_elements(numel, world) if algo == "tree" else numel
            launch = None if config == "default" else launch_config(args.kernels, algo, config, elements, 2)
            out = torch.full_like(x, float("nan"))
            comm.all_reduce(x, algo=algo, out=out, config=launch)
            torch.cuda.synchronize()
            rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            params = {"bytes": nbytes, "kernels": args.kernels,
                      "config": config if config == "default" else dict(zip(GRID_NAMES[args.kernels], config))}
            bad = torch.tensor([not rel < 1e-2], dtype=torch.int32, device=device)
            dist.all_reduce(bad)
            if bad.item():
                keep(f"{algo}_{args.kernels}", params, None, error=f"relative error {rel:.3g} vs NCCL")
                continue
            samples = max_over_ranks(
                time_cuda(lambda: comm.all_reduce(x, algo=algo, out=out, config=launch), args.iters, args.reps, True,
                          sync),
                device)
            t = keep(f"{algo}_{args.kernels}", params, samples)["us_median"]
            if algo not in best or t < best[algo][0]:
                best[algo] = (t, config)
            if config == "default":
                best[algo + " default"] = (t, config)
        if rank == 0:
            line = "  ".join(f"{a}: {b[0]:.1f} us ({b[1]})" for a, b in best.items())
            print(f"{human(nbytes):>8}  nccl {nccl['us_median']:.1f} us  {line}", flush=True)
    comm.close()
    if rank == 0:
        publish(records, args.out, on_gpu=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
