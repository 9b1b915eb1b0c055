"""Copy-engine all-reduce: schedule variants x pipeline chunks x placements, against NCCL and torch's
two-shot in the same run (calibrates ``copy_engine.copy_config`` and picks the default schedule).

    torchrun --standalone --nproc-per-node=2 bench/copy_engine_chunks.py [--sizes 64M,256M,16M]
        [--variants barriers_ce,flags_ce,flags_ce:2,...] [--chunks 0,1M,2M,4M,8M,16M,32M,64M]
        [--placements out,in,zc] [--modes graph] [--profile 64M] [--out DIR]

bf16. Variants are ``CopyConfig(chunk, sync, gather, copy_streams)`` (``oneshot_ce``: chunk = its last,
smallest chunk; chunk 0 = the launch policy's configuration, timed with the policy's schedule only).
``--buffer`` sets the copy communicator's ``buffer_bytes`` (default: the largest size; smaller buffers
run the oneshot schedule's ring of slots). Placements: ``out`` out
of place on ordinary tensors, ``in`` in place on an ordinary tensor, ``zc`` zero-copy in place (the
input in the staging area), ``zco`` zero-copy out of place. Chunks larger than a shard or giving
more than ``--max-chunks`` chunks per shard are skipped. Baselines in the same run: NCCL in place,
torch's symmetric-memory two-shot (out of place from its symmetric buffer), and at sizes up to 16
MiB shardkit's tree kernel (ordinary and staged input) and ``auto`` (default communicator). Every
configuration is checked first (relative error vs NCCL <= 1e-2, and bitwise equal to the first copy
variant's result: the schedules promise the same bits); a failing one is recorded with its error and
not timed. Times: CUDA events around ``iters`` calls (one CUDA graph in graph mode), median of
``reps``, max over ranks. Prints one table per size (schedule/placement x chunk) and appends records
(bench "all_reduce_copy_chunks"; params bytes, chunk_bytes, variant, placement) to ``--out``
DIR/records.jsonl or the store; with ``--profile`` and ``--out``, each copy schedule's fastest chunk
at that size is traced once (``profile_call``). GPUs only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.all_reduce_sweep import parse_size, symm_mem_algos  # noqa: E402
from bench.common import capture_graph, environment, header_lines, max_over_ranks, time_cuda  # noqa: E402
from bench.records import append, current_commit, destination, record  # noqa: E402

BENCH = "all_reduce_copy_chunks"
PLACEMENTS = ("out", "in", "zc", "zco")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64M,256M,16M", help="in this order (--budget-s may cut the last ones)")
    p.add_argument("--variants", default="oneshot_ce,oneshot_ce:2,flags_ce,barriers_ce",
                   help="<sync>_<gather>[:<copy_streams>] schedules")
    p.add_argument("--buffer", default=None, help="buffer_bytes of the copy communicator (default: the largest size)")
    p.add_argument("--chunks", default="0,1M,2M,4M,8M,16M,32M,64M", help="chunk_bytes values; 0 = the launch policy's")
    p.add_argument("--max-chunks", type=int, default=32, help="skip chunks giving more chunks per shard than this")
    p.add_argument("--placements", default="out,in,zc")
    p.add_argument("--modes", default="graph")
    p.add_argument("--iters", type=int, default=20, help="calls per repetition up to 64 MiB (fewer above)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=170.0, help="stop starting new sizes after this many seconds")
    p.add_argument("--profile", default="64M",
                   help="size at which each copy schedule's fastest chunk (placement out) is traced once "
                        "with torch.profiler (needs --out: chrome traces there, a per-stream summary printed); "
                        "'' = none")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    profile_bytes = parse_size(args.profile) if args.profile and args.out else None
    t0 = time.monotonic()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, world = dist.get_rank(), dist.get_world_size()
    import shardkit
    from shardkit.collectives import copy_engine

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    variants = []
    for v in args.variants.split(","):
        name, _, streams = v.partition(":")
        variants.append((*name.split("_", 1), int(streams or 1)))
    chunks = [parse_size(c) for c in args.chunks.split(",")]
    placements = args.placements.split(",")
    assert all(pl in PLACEMENTS for pl in placements), f"--placements: one of {PLACEMENTS}"
    modes = args.modes.split(",")
    # The copy algorithm's fast configuration; a 5 s timeout, so that a schedule that never meets its
    # peers costs seconds of the run, not the default minute.
    buffer_bytes = parse_size(args.buffer) if args.buffer else max(sizes)
    comm = shardkit.Communicator(buffer_bytes=buffer_bytes, timeout_s=5.0)
    default_comm = shardkit.Communicator()
    two_shot = symm_mem_algos(dist.group.WORLD.group_name).get("symm_2shot")
    env, commit, records, rows, profiles = environment(), current_commit(), [], [], []

    def sync() -> None:
        dist.barrier()
        torch.cuda.synchronize()

    def flag_all(bad: bool) -> bool:
        t = torch.tensor([int(bad)], device="cuda")
        dist.all_reduce(t)
        return bool(t.item())

    def measure(nbytes: int, impl: str, params: dict, fn, got: torch.Tensor | None, prepare,
                expect: torch.Tensor | None) -> torch.Tensor | None:
        """Check one call (``prepare`` resets the inputs; ``expect``: bits to match or None), then time.
        Returns a copy of the checked result (None when the check failed or there is none)."""
        error, checked = None, None
        if got is not None:
            prepare()
            fn()
            torch.cuda.synchronize()
            rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
            if not rel <= 1e-2:
                error = f"relative error {rel:.3g} vs NCCL"
            elif expect is not None and not torch.equal(got, expect):
                error = "bits differ from the first copy variant's"
            else:
                checked = got.clone()
        if flag_all(error is not None):
            error = error or "wrong result on another rank"
        for mode in modes:
            us = None
            if error is None:
                prepare()
                # Fewer calls per repetition for large messages (about 4 ms of GPU time per repetition).
                iters = max(5, min(args.iters, args.iters * (64 << 20) // nbytes))
                us = max_over_ranks(time_cuda(fn, iters, args.reps, mode == "graph", sync), x.device)
            records.append(record(BENCH, impl, gpu=env["gpu"], world=world, dtype=torch.bfloat16, mode=mode,
                                  params={"bytes": nbytes, **params}, us=us, commit=commit, error=error))
            rows.append((nbytes >> 20, impl, params.get("placement", ""), params.get("chunk_bytes", 0) / (1 << 20),
                         mode, statistics.median(us) if us else None, error))
        return checked if error is None else None

    for nbytes in sizes:
        if flag_all(time.monotonic() - t0 > args.budget_s and rank == 0):
            print(f"budget of {args.budget_s:g} s spent: sizes from {nbytes >> 20} MiB on skipped", flush=True)
            break
        numel = nbytes // 2
        shard = copy_engine.shard_elements(numel, world) * 2
        x = torch.randn(numel, generator=torch.Generator().manual_seed(7 + rank)).to(torch.bfloat16).cuda()
        ref = x.clone()
        dist.all_reduce(ref)
        fits = nbytes <= buffer_bytes  # zero-copy placements need the message in the staging area
        staged = comm.staging_buffer((numel,), torch.bfloat16) if fits else None
        out = torch.empty_like(x)
        work = torch.empty_like(x)  # in-place placements' tensor (x itself stays the pristine input)

        scratch = x.clone()
        measure(nbytes, "nccl", {"placement": "in"}, lambda: dist.all_reduce(scratch), None, lambda: None, None)
        if two_shot is not None:
            fn2, got2 = two_shot(x)
            if fn2 is not None:
                measure(nbytes, "symm_2shot", {"placement": "out"}, fn2, got2, lambda: None, None)
        if nbytes <= 16 << 20:  # shardkit's kernels (the default communicator), on ordinary and staged inputs
            tree_in = default_comm.staging_buffer((numel,), torch.bfloat16)
            for algo, placement, src in (("tree", "out", x), ("auto", "out", x), ("tree", "zco", tree_in)):
                tree_out = torch.empty_like(x)

                def prepare_tree(o=tree_out, s=src) -> None:
                    o.fill_(float("nan"))
                    s.copy_(x)

                measure(nbytes, algo, {"placement": placement},
                        lambda a=algo, s=src, o=tree_out: default_comm.all_reduce(s, algo=a, out=o), tree_out,
                        prepare_tree, None)

        first, calls = None, {}
        policy = copy_engine.copy_config(shard, world, buffer_bytes, 2, False)
        for sync_name, gather, streams in variants:
            # chunk 0 ("pol"): the launch policy's configuration under its own schedule's name; for oneshot, the
            # candidate policy oneshot_config (copy_config does not pick oneshot until it is measured).
            candidate = (copy_engine.oneshot_config(nbytes, eager=False) if sync_name == "oneshot" else policy)
            for chunk in chunks:
                if sync_name == "oneshot":  # chunk: the last one; the others double towards the front
                    if chunk > nbytes // 4:
                        continue
                elif chunk > shard or (chunk and shard // chunk > args.max_chunks):
                    continue
                if chunk == 0 and ((sync_name, gather) != (candidate.sync, candidate.gather) or
                                   (candidate is policy and streams != policy.copy_streams)):
                    continue
                if chunk:
                    config = copy_engine.CopyConfig(chunk, sync_name, gather, streams)
                else:
                    config = None if candidate is policy else dataclasses.replace(candidate, copy_streams=streams)
                kw = dict(timeout_iters=comm._timeout_iters, config=config)
                for placement in placements:
                    if placement.startswith("zc") and not fits:
                        continue
                    src, dst = {"out": (x, out), "in": (work, work), "zc": (staged, staged),
                                "zco": (staged, out)}[placement]
                    fn = (lambda s=src, d=dst, kw=kw: copy_engine.all_reduce(comm.memory, s, d, **kw))

                    def prepare(s=src, d=dst) -> None:
                        if d is not s:
                            d.fill_(float("nan"))  # poison: every element must be written
                        s.copy_(x)

                    impl = f"copy_{sync_name}_{gather}" + (f"_x{streams}" if streams > 1 else "")
                    params = {"placement": placement, "chunk_bytes": chunk, "buffer_bytes": buffer_bytes}
                    checked = measure(nbytes, impl, params, fn, dst, prepare, first)
                    first = checked if first is None else first
                    calls[impl, placement, chunk] = (fn, prepare)
                    if flag_all(comm.memory.error_record[0] != 0):
                        # A protocol failure (timeout, mismatch) leaves the communicator unusable: say
                        # which configuration broke it and go on with a fresh one.
                        failure = comm_failure(comm)
                        if rank == 0:
                            print(f"{impl}/{placement}/{chunk >> 20}M at {nbytes >> 20} MiB: {failure}", flush=True)
                        records[-1].setdefault("error", failure)
                        comm.close()
                        comm = shardkit.Communicator(buffer_bytes=buffer_bytes, timeout_s=5.0)
                        staged = comm.staging_buffer((numel,), torch.bfloat16) if fits else None
        if nbytes == profile_bytes:
            for mode in modes[:1]:
                best = {}
                for r in rows:
                    if (r[0] == nbytes >> 20 and r[4] == mode and r[5] is not None and r[1].startswith("copy_")
                            and r[2] == "out" and ((r[1], r[2]) not in best or r[5] < best[r[1], r[2]][5])):
                        best[r[1], r[2]] = r
                for (impl, placement), r in sorted(best.items()):
                    chunk = int(r[3] * (1 << 20))
                    fn, prepare = calls[impl, placement, chunk]
                    label = f"{nbytes >> 20}M_{impl}_{placement}_{chunk >> 20}M"
                    summary = profile_call(fn, prepare, os.path.join(args.out, f"trace_{label}_rank{rank}.json"))
                    profiles.append(f"{label} ({r[5]:.1f} us timed): {summary}")
    failure = comm_failure(comm)
    comm.close()
    default_comm.close()
    if rank == 0:
        print("\n".join(header_lines(env)))
        print(f"{env['gpu']} x{world}, bf16, us per call (median of {args.reps}, max over ranks); copy buffer "
              f"{buffer_bytes >> 20} MiB; pol = launch policy; oneshot: chunk = the last one; "
              f"{time.monotonic() - t0:.0f} s")
        for mode in modes:
            for mib in sorted({r[0] for r in rows}):
                print_size_table([r for r in rows if r[0] == mib and r[4] == mode], f"{mib} MiB, {mode}")
        if profiles:
            print("\nProfiles (one graph replay of one call, rank 0; per stream: kernels / copies and their busy "
                  "us; copies: the time any copy runs):")
            print("\n".join(profiles))
        if failure:
            print(f"copy communicator at the end: {failure}")
        path = destination(args.out, on_gpu=True)
        print(f"appended {append(records, path)} records to {path}")
    dist.destroy_process_group()


def comm_failure(comm) -> str | None:
    """The communicator's recorded failure as text, or None."""
    from shardkit import CollectiveError
    try:
        comm.check()
    except CollectiveError as e:
        return str(e)
    return None


def print_size_table(rows: list[tuple], title: str) -> None:
    """One size and mode: the baselines on one line, then a matrix of the copy schedules (rows:
    schedule/placement, columns: chunk MiB, "pol" = the launch policy's; us, "ERR" where the check
    failed), and the failed checks' reasons."""
    def cell(r) -> str:
        return f"{r[5]:.1f}" if r[5] is not None else "ERR"

    print(f"\n{title}: " + " | ".join(f"{r[1]}/{r[2]} {cell(r)}" for r in rows if not r[1].startswith("copy_")))
    copies = [r for r in rows if r[1].startswith("copy_")]
    chunks = sorted({r[3] for r in copies})
    print("| schedule/placement | " + " | ".join("pol" if c == 0 else f"{c:g}M" for c in chunks) + " | best |")
    print("|---" * (len(chunks) + 2) + "|")
    for key in dict.fromkeys((r[1], r[2]) for r in copies):
        mine = {r[3]: r for r in copies if (r[1], r[2]) == key}
        timed = [r[5] for r in mine.values() if r[5] is not None]
        print(f"| {key[0].removeprefix('copy_')}/{key[1]} | "
              + " | ".join(cell(mine[c]) if c in mine else "" for c in chunks)
              + (f" | {min(timed):.1f} |" if timed else " | - |"))
    for r in rows:
        if r[6]:
            print(f"ERR {r[1]}/{r[2]}/{r[3]:g}M: {r[6]}")


def profile_call(fn, prepare, path: str) -> str:
    """One call of ``fn`` in a CUDA graph, replayed once under torch.profiler (every rank together:
    the call is a collective); writes the chrome trace to ``path`` and returns a one-line summary:
    the GPU span, and per stream the kernels' and copies' counts and busy time (copies: with the
    bytes they moved per busy microsecond, where the trace records bytes)."""
    prepare()
    graph = capture_graph(fn, 1)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = [e for e in json.load(f).get("traceEvents", [])
                  if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not events:
        return "no GPU events in the trace"
    t0 = min(e["ts"] for e in events)
    span = max(e["ts"] + e["dur"] for e in events) - t0
    streams: dict = {}
    for e in events:
        kind = "k" if e["cat"] == "kernel" else "c"
        st = streams.setdefault(e.get("args", {}).get("stream", "?"), {"k": [0, 0.0], "c": [0, 0.0], "bytes": 0})
        st[kind][0] += 1
        st[kind][1] += e["dur"]
        st["bytes"] += int(e.get("args", {}).get("bytes", 0) or 0) if kind == "c" else 0
    copies = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["cat"] != "kernel")
    busy, end = 0.0, float("-inf")
    for lo, hi in copies:  # the union of the copies' intervals
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    parts = [f"stream {sid}: {v['k'][0]} k {v['k'][1]:.0f} us, {v['c'][0]} c {v['c'][1]:.0f} us"
             + (f" {v['bytes'] / v['c'][1] / 1e3:.0f} GB/s" if v["c"][1] > 0 and v["bytes"] else "")
             for sid, v in sorted(streams.items(), key=lambda kv: str(kv[0]))]
    return f"span {span:.1f} us, copies running {busy:.1f} us; " + "; ".join(parts)


if __name__ == "__main__":
    main()
