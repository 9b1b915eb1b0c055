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

Timing: CUDA events around ``--iters`` back-to-back steps, each of ``--reps`` repetitions the
slowest rank's, median; GB/s = bytes received per rank per second. The records go to the store
(bench/results/records.jsonl, or ``--out DIR``/records.jsonl) with the table and plot
``ring_transfer_<card>_x<world>.md``/``.png`` (bench/report.py). ``--write-thresholds`` stores the NCCL rate at 128 MiB
as the transfer rate of ring attention's pass-KV/pass-Q cost model (``ring_variant``). Run with
torchrun on 2+ GPUs:

    torchrun --standalone --nproc-per-node=2 bench/ring_transfer_bench.py
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
from bench.common import environment, header_lines, max_over_ranks, time_cuda  # noqa: E402
from bench.records import record  # noqa: E402
from bench.report import publish  # noqa: E402


def sync() -> None:
    dist.barrier()
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="directory for records.jsonl and the tables (default: the store)")
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
            samples = max_over_ranks(time_cuda(fn, args.iters, args.reps, False, sync), dev)
            ok = torch.tensor([int((recv[:n] == prv + 1).all().item())], device=dev)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            gbps = n / (statistics.median(samples) * 1e-6) / 1e9
            rows.append(record("ring_transfer", name, gpu=env["gpu"], world=world, dtype="uint8", mode="eager",
                               params={"bytes": n}, us=samples, metrics={"gbps": round(gbps, 2)},
                               error=None if ok.item() else "wrong data received"))
            if rank == 0:
                print(f"{n / 2**20:8.1f} MiB  {name:10s} {rows[-1]['us_median']:9.1f} us  {gbps:7.1f} GB/s  "
                      f"{'ok' if ok.item() else 'WRONG DATA'}", flush=True)
    if rank == 0:
        publish(rows, args.out, on_gpu=True)
        if args.write_thresholds and not any(r.get("error") for r in rows):
            from shardkit import thresholds
            size = max((n for n in sizes if n <= 128 << 20), default=min(sizes))
            gbps = next(r["metrics"]["gbps"] for r in rows if r["params"]["bytes"] == size and r["impl"] == "nccl_p2p")
            thresholds.write_ring_costs(env["gpu"], p2p_gbps=gbps)
            print(f"stored p2p_gbps {gbps:.1f} (NCCL P2P, {size >> 20} MiB) for {env['gpu']}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
