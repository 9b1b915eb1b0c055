"""Tile/grid tuning for the DDA kernels: time flat and tree over their launch grids.

    torchrun --standalone --nproc-per-node=4 bench/tune_all_reduce.py --out bench/results
    torchrun --standalone --nproc-per-node=4 bench/tune_all_reduce.py --kernels cuda --algos tree

Triton kernels: (BLOCK, max programs, warps). CUDA kernels: (threads, unroll, programs), unroll
being the 16-byte packs per thread per tile. Each grid is passed to the Communicator as a launch
config (``FlatConfig``/``TreeConfig``/``CudaConfig``); the shipped policy (``flat_config``,
``tree_config`` beside each kernel) is timed too, as "default".

CUDA-graph mode (``iters`` calls captured in one graph), bf16, median of reps, max over ranks,
NCCL measured in the same run. Each result is checked against NCCL before it is timed.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.all_reduce_sweep import human, parse_sizes  # noqa: E402
from bench.common import environment, max_over_ranks, results_stem, summarize, time_cuda, write_json  # noqa: E402


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
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()

    import shardkit
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank)
    comm = shardkit.Communicator(kernels=args.kernels)
    from shardkit.kernels.all_reduce.tree import shard_elements

    def sync() -> None:
        dist.barrier()
        torch.cuda.synchronize()

    records = []
    for nbytes in parse_sizes(args.sizes):
        numel = nbytes // 2
        x = torch.randn(numel, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16).to(device)
        ref = x.clone()
        dist.all_reduce(ref)
        scratch = x.clone()
        nccl = summarize(max_over_ranks(
            time_cuda(lambda: dist.all_reduce(scratch), args.iters, args.reps, True, sync), device))
        records.append({"algo": "nccl", "bytes": nbytes, **nccl})
        best: dict[str, tuple] = {}
        for algo, config in configs(args, numel, world):
            elements = shard_elements(numel, world) if algo == "tree" else numel
            launch = None if config == "default" else launch_config(args.kernels, algo, config, elements, 2)
            out = torch.full_like(x, float("nan"))
            comm.all_reduce(x, algo=algo, out=out, config=launch)
            torch.cuda.synchronize()
            rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            rec = {"algo": algo, "bytes": nbytes, "kernels": args.kernels, "config": config}
            bad = torch.tensor([not rel < 1e-2], dtype=torch.int32, device=device)
            dist.all_reduce(bad)
            if bad.item():
                records.append({**rec, "error": f"relative error {rel:.3g} vs NCCL"})
                continue
            t = summarize(max_over_ranks(
                time_cuda(lambda: comm.all_reduce(x, algo=algo, out=out, config=launch), args.iters, args.reps, True,
                          sync),
                device))
            records.append({**rec, **t})
            if algo not in best or t["us_median"] < best[algo][0]:
                best[algo] = (t["us_median"], config)
            if config == "default":
                best[algo + " default"] = (t["us_median"], config)
        if rank == 0:
            line = "  ".join(f"{a}: {b[0]:.1f} us ({b[1]})" for a, b in best.items())
            print(f"{human(nbytes):>8}  nccl {nccl['us_median']:.1f} us  {line}", flush=True)
    comm.close()
    if rank == 0:
        env = environment()
        stem = results_stem(args.out, f"tune_all_reduce_{args.kernels}", env, world)
        write_json(stem + ".json", {"env": env, "args": vars(args), "mode": "graph", "dtype": "bf16",
                                    "records": records})
        print(f"wrote {stem}.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
