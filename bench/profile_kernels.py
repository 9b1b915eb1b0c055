#!/usr/bin/env python
"""Where a graph-replayed op spends its GPU time, kernel by kernel (torch.profiler / CUPTI).

For each case, ``--iters`` calls are captured in one CUDA graph, replayed ``--reps`` times under the
profiler, and every kernel's device time is summed and divided by the number of calls: the table
says how many launches one call makes and which of them cost (a kernel's time includes its waits
on other ranks). Cases:
  moe:T        MoeDispatcher (graph mode) dispatch + combine of T tokens/rank, the moe_bench shapes
               (hidden 7168, 256 experts, top-8 uniform, bf16, identity experts)
  tp_block:B   bench/tp_block_bench.py's 70B-shaped TP block at batch B: variants none (compute alone)
               and fused_spd
  ar:N         Communicator.all_reduce (auto, out-of-place) of N bf16 elements

    torchrun --standalone --nproc-per-node=2 bench/profile_kernels.py --cases moe:128,moe:4096,tp_block:1 --out DIR

Rank 0 prints the tables and writes them to DIR/profile_kernels_<card>_x<world>.md. A diagnostic,
not a benchmark: nothing goes to the records store.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import capture_graph, environment, header_lines  # noqa: E402


def kernel_table(fn, iters: int, reps: int) -> tuple[list[tuple[str, int, float]], float]:
    """[(kernel name, launches per call, µs per call)] sorted by time, and the wall µs per call."""
    from torch.profiler import ProfilerActivity, profile, schedule

    graph = capture_graph(fn, iters)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # One warm-up step, traced and discarded: the ranks start tracing at different times (the first
    # kernel that waits for a peer then absorbed that skew: a 4.1 ms MoE counts kernel per call once).
    with profile(activities=[ProfilerActivity.CUDA], schedule=schedule(wait=0, warmup=1, active=1),
                 acc_events=True) as prof:
        graph.replay()
        torch.cuda.synchronize()
        dist.barrier()
        prof.step()
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        prof.step()
    calls = iters * reps
    count: dict[str, int] = defaultdict(int)
    total: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            count[ev.name] += 1
            total[ev.name] += ev.device_time
    rows = sorted(((n[:90], round(count[n] / calls), total[n] / calls) for n in total), key=lambda r: -r[2])
    return rows, start.elapsed_time(end) * 1000.0 / calls


def moe_case(tokens: int, device: torch.device):
    from bench.moe_bench import routing, shardkit_round
    from shardkit.collectives.moe import MoeDispatcher

    rank = dist.get_rank()
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    x = torch.randn(tokens, 7168, generator=gen, device=device).to(torch.bfloat16)
    idx, weights = routing(tokens, 256, 8, device, 2000 + rank)
    disp = MoeDispatcher(num_experts=256, hidden=7168, dtype=torch.bfloat16, max_tokens=tokens, topk=8,
                         mode="graph", transport="peer")
    return shardkit_round(disp, x, idx, weights), disp.close


def tp_block_cases(batch: int, device: torch.device):
    from bench.tp_block_bench import block_config, make_sync, random_shard
    from shardkit.collectives.communicator import Communicator
    from shardkit.models import TPLlama

    args = argparse.Namespace(smoke=False, context=4096, slow_link=False)
    config = block_config(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = random_shard(config, rank, world, device, torch.bfloat16)
    comm = Communicator()
    model = TPLlama(config, shard, make_sync("none", comm, False), device=device, dtype=torch.bfloat16,
                    max_batch=batch, max_seq=args.context)
    gen = torch.Generator(device).manual_seed(7 + batch)
    residual = torch.randn(batch, 1, config.hidden_size, generator=gen, device=device).to(torch.bfloat16)
    x = torch.nn.functional.rms_norm(residual, (config.hidden_size,), shard.layers[0].input_norm, 1e-5)
    pos = torch.full((1,), args.context - 1, dtype=torch.long, device=device)
    def variant(name: str):
        sync, spd = make_sync(name, comm, False), [name.endswith("_spd")]

        def run():  # the variant's state set on every call: the cases are all made before any runs
            model.sync = sync
            model.set_spd(spd)
            return model.run_block(0, x, residual, pos, args.context)
        return run
    for name in ("none", "fused_spd"):
        yield name, variant(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="moe:128,moe:4096,tp_block:1")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", device_id=device)
    env = environment()
    lines = header_lines(env)
    for case in args.cases.split(","):
        what, n = case.split(":")
        if what == "moe":
            fn, close = moe_case(int(n), device)
            runs = [(f"moe dispatch+combine, {n} tokens/rank", fn)]
        elif what == "ar":
            from shardkit.collectives.communicator import Communicator
            comm, x = Communicator(), torch.randn(int(n), device=device).to(torch.bfloat16)
            out = torch.empty_like(x)
            close = comm.close
            runs = [(f"all_reduce auto, {n} bf16", lambda: comm.all_reduce(x, out=out))]
        else:
            close = None
            runs = [(f"tp_block batch {n} {name}", fn) for name, fn in tp_block_cases(int(n), device)]
        for title, fn in runs:
            rows, wall = kernel_table(fn, args.iters, args.reps)
            lines += ["", f"## {title}: {wall:.1f} µs per call (wall, graph)", "",
                      "| kernel | launches/call | µs/call |", "|---|---|---|"]
            lines += [f"| `{name}` | {c} | {us:.1f} |" for name, c, us in rows]
            lines.append(f"| total kernel time | {sum(r[1] for r in rows)} | {sum(r[2] for r in rows):.1f} |")
        if close is not None:
            close()
    if dist.get_rank() == 0:
        text = "\n".join(lines)
        print(text)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            card = env["gpu"].replace("NVIDIA ", "").split()[0]
            with open(os.path.join(args.out, f"profile_kernels_{card}_x{dist.get_world_size()}.md"), "w") as f:
                f.write(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
