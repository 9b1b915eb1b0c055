#!/usr/bin/env python
"""One ring step's transfer: NCCL P2P (what ring_attention uses) against a pull from peer memory.

Every rank sends a buffer of ``--sizes`` bytes to the next rank and receives the previous
rank's, as one pass-KV step does with a KV shard (128K tokens, 8 kv heads, head dim 128, bf16,
over 4 GPUs: k + v = 128 MiB per rank and step). Two ways:

* ``nccl_p2p``: ``dist.batch_isend_irecv`` (isend to next, irecv from previous), as
  ``shardkit.collectives.attention.transport.post_ring``;
* ``peer_pull``: the source already sits in a symmetric-memory buffer (torch symm_mem, the
  allocator under ``shardkit.memory.PeerMemory``); a barrier says it is ready, each rank copies
  the previous rank's buffer over NVLink into its own receive buffer (``Tensor.copy_`` of a peer
  view), and a second barrier says the source may be reused. The copy into the symmetric
  buffer that a real ring would need first is *not* counted, which favours peer_pull.

Timing: CUDA events around ``--iters`` back-to-back steps, median of ``--reps``, max over ranks;
GB/s = bytes received per rank per second. ``--write-thresholds`` stores the NCCL rate at 128 MiB
as the transfer rate of ring attention's pass-KV/pass-Q cost model (``ring_variant``). Run with
torchrun on 2+ GPUs:

    torchrun --standalone --nproc-per-node=2 bench/ring_transfer_bench.py --out bench/results
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.all_reduce_sweep import parse_size  # noqa: E402
from bench.common import environment, header_lines, max_over_ranks, results_stem, write_json  # noqa: E402


def time_ms(fn, iters: int, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--sizes", nargs="+", default=["1M", "8M", "32M", "128M", "512M"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--write-thresholds", action="store_true",
                    help="store the NCCL P2P rate at 128 MiB (or the largest size below) as this GPU's ring "
                         "transfer rate for ring attention's pass-KV/pass-Q cost model")
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dev = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", device_id=dev)
    import torch.distributed._symmetric_memory as symm_mem

    rank, world = dist.get_rank(), dist.get_world_size()
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    env = environment()
    if rank == 0:
        print("\n".join(header_lines(env)), flush=True)
    sizes = [parse_size(s) for s in args.sizes]
    sym = symm_mem.empty(max(sizes), dtype=torch.uint8, device=dev)
    hdl = symm_mem.rendezvous(sym, dist.group.WORLD.group_name)
    recv = torch.empty(max(sizes), dtype=torch.uint8, device=dev)
    rows = []
    for n in sizes:
        send = sym[:n]
        send.fill_(rank + 1)
        peer = hdl.get_buffer(prv, (n,), torch.uint8)

        def nccl_p2p() -> None:
            ops = [dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, recv[:n], prv)]
            for r in dist.batch_isend_irecv(ops):
                r.wait()

        def peer_pull() -> None:
            hdl.barrier(channel=0)
            recv[:n].copy_(peer, non_blocking=True)
            hdl.barrier(channel=1)

        for name, fn in (("nccl_p2p", nccl_p2p), ("peer_pull", peer_pull)):
            recv[:n].zero_()
            ms = max_over_ranks([time_ms(fn, args.iters, args.reps)], dev)[0]
            ok = bool((recv[:n] == prv + 1).all().item())
            row = {"bytes": n, "method": name, "ms": ms, "gbps": n / ms / 1e6, "check": ok}
            rows.append(row)
            if rank == 0:
                print(f"{n / 2**20:8.1f} MiB  {name:10s} {ms * 1e3:9.1f} us  {row['gbps']:7.1f} GB/s  "
                      f"{'ok' if ok else 'WRONG DATA'}", flush=True)
    if rank == 0:
        stem = results_stem(args.out, "ring_transfer", env, world)
        write_json(stem + ".json", {"env": env, "config": vars(args), "rows": rows})
        md = ["# One ring step's transfer: NCCL P2P vs a pull from peer memory", ""]
        md += [f"    {line}" for line in header_lines(env)]
        md += ["", "Bytes received per rank per step; median of reps, max over ranks.", "",
               "| MiB | NCCL P2P (us) | GB/s | peer pull (us) | GB/s | NCCL / pull time |", "|---|---|---|---|---|---|"]
        for n in sizes:
            a, b = (next(r for r in rows if r["bytes"] == n and r["method"] == m) for m in ("nccl_p2p", "peer_pull"))
            md.append(f"| {n / 2**20:.0f} | {a['ms'] * 1e3:.1f} | {a['gbps']:.1f} | {b['ms'] * 1e3:.1f} | "
                      f"{b['gbps']:.1f} | {a['ms'] / b['ms']:.2f} |")
        with open(stem + ".md", "w") as f:
            f.write("\n".join(md) + "\n")
        print(f"wrote {stem}.json / .md", flush=True)
        if args.write_thresholds and all(r["check"] for r in rows):
            from shardkit import thresholds
            size = max((n for n in sizes if n <= 128 << 20), default=min(sizes))
            gbps = next(r["gbps"] for r in rows if r["bytes"] == size and r["method"] == "nccl_p2p")
            thresholds.write_ring_costs(env["gpu"], p2p_gbps=gbps)
            print(f"stored p2p_gbps {gbps:.1f} (NCCL P2P, {size >> 20} MiB) for {env['gpu']}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
