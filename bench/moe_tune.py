"""Launch-grid tuning for the MoE kernels: time a handful of ``MoeLaunchConfig``s in CUDA-graph mode.

    torchrun --standalone --nproc-per-node=2 bench/moe_tune.py [--tokens 128,4096] [--profile] [--out DIR]
    python bench/moe_tune.py --cpu-world 2          # no GPU: a functional run in the interpreter

One MoeDispatcher per token count (graph mode, bf16, the moe_bench shapes: hidden 7168, 256 experts,
top-8 uniform routing, identity experts); each candidate grid is set on every rank
(``set_launch_config``), its output checked against the float64 reference, then ``iters`` dispatch +
combine calls are captured in one CUDA graph and replayed ``reps`` times (median, max over ranks).
Candidates: the shipped default (``moe_launch_config``) and variations of one field group at a time
(``candidates``), or ``--configs`` as ``name=field:value/field:value,...`` on top of the default;
``--budget-s`` bounds the time spent on them (the default is always timed). Then
"best_of_each_group": the default with each field group's fastest variation (programs, layout,
dispatch, combine) where it beat the default.
``--profile``: the per-kernel GPU time (torch.profiler, as bench/profile_kernels.py) of the default
and of the fastest grid per token count (``--profile all``: of every timed grid). Rank 0 prints a
table per token count as it is made (and writes
them and a JSON of all timings to --out). A tuning aid, not a benchmark: nothing goes to the records store.
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
from bench.common import (budget_spent, environment, header_lines, max_over_ranks, run_distributed,  # noqa: E402
                          time_cuda, time_host)
from bench.moe_bench import check, reference, routing, shardkit_round  # noqa: E402


def candidates(default) -> list[tuple[str, object]]:
    """(name, MoeLaunchConfig): the default and one-group variations of it (GPU shapes)."""
    r = dataclasses.replace
    out = [("default", default)]
    row = -(-7168 // default.combine_block_h)  # chunks per row at the moe_bench hidden size
    # Runtime-only fields first (no compile: cheap), then the ones that compile new kernels.
    variations = {
        "cchunks1": dict(combine_item_chunks=1),
        "cchunksrow": dict(combine_item_chunks=row),
        "cchunks3": dict(combine_item_chunks=3),
        "push1of3": dict(combine_pushers=max(1, default.programs // 3)),
        "push2of3": dict(combine_pushers=max(1, 2 * default.programs // 3)),
        "dchunks1": dict(dispatch_item_chunks=1),
        "dchunksrow": dict(dispatch_item_chunks=row),
        "dchunks3": dict(dispatch_item_chunks=3),
        "progs66": dict(programs=max(1, default.programs // 2)),
        "layout8x128": dict(layout_programs=128),
        "layout8x32": dict(layout_programs=32),
        "comb4": dict(combine_block_t=4),
        "comb8": dict(combine_block_t=8),
        "cstages3h512w8": dict(combine_stages=3, combine_block_h=512, combine_warps=8,
                               combine_item_chunks=2 * default.combine_item_chunks),
        "combw8": dict(combine_warps=8),
        "combw4": dict(combine_warps=4),
        "disp4": dict(dispatch_block_t=4),
        "disp8": dict(dispatch_block_t=8),
        "disp8w8": dict(dispatch_block_t=8, dispatch_warps=8),
        "meta8": dict(meta_t=8),
        "layout16": dict(layout_block_t=16),
        "layout4x128": dict(layout_block_t=4, layout_programs=128),
        "comb2": dict(combine_block_t=2),
        "disp2": dict(dispatch_block_t=2),
        "comb4x512w4": dict(combine_block_h=512, combine_warps=4,
                            combine_item_chunks=2 * default.combine_item_chunks),
        "comb1x2048": dict(combine_block_t=1, combine_block_h=2048),
        "disp4x512": dict(dispatch_block_h=512, dispatch_item_chunks=2 * default.dispatch_item_chunks),
        "disp16x512w8": dict(dispatch_block_t=16, dispatch_block_h=512, dispatch_warps=8),
    }
    for name, change in variations.items():
        cfg = r(default, **change)
        if cfg != default:
            out.append((name, cfg))
    return out


GROUPS = {"programs": ("programs",), "layout": ("layout_",), "dispatch": ("dispatch_", "meta_t"),
          "combine": ("combine_",)}


def merge_best(rows: list[dict], default):
    """The default with, for each field group (GROUPS), the fields of the fastest timed grid that changes
    only that group, where it beat the default; None when that is the default or an already timed grid."""
    base = next((r["us"] for r in rows if r["name"] == "default" and r["us"] is not None), None)
    if base is None:
        return None
    fields = dataclasses.asdict(default)
    merged = dict(fields)
    for prefixes in GROUPS.values():
        best = None
        for r in rows:
            changed = {k for k, v in r["config"].items() if v != fields[k]}
            if (r["us"] is not None and r["us"] < base and changed and all(k.startswith(prefixes) for k in changed)
                    and (best is None or r["us"] < best["us"])):
                best = r
        if best is not None:
            merged.update({k: best["config"][k] for k in fields if k.startswith(prefixes)})
    if merged == fields or any(r["config"] == merged for r in rows):
        return None
    return dataclasses.replace(default, **merged)


def parse_configs(text: str, default) -> list[tuple[str, object]]:
    """``name=field:value/field:value,...`` -> [(name, config)] on top of the default (plus the default)."""
    out = [("default", default)]
    for item in text.split(","):
        name, _, fields = item.partition("=")
        change = {k: int(v) for k, v in (f.split(":") for f in fields.split("/") if f)}
        out.append((name, dataclasses.replace(default, **change)))
    return out


def tune_rank(args: argparse.Namespace):
    from bench.profile_kernels import kernel_table
    from shardkit.collectives.moe import MoeDispatcher

    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = dist.get_backend() != "nccl"
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    env = environment()
    results, tables = [], []

    def sync() -> None:
        dist.barrier()
        if not cpu:
            torch.cuda.synchronize()

    t0 = time.monotonic()
    for tokens in args.tokens:
        gen = torch.Generator(device=device).manual_seed(1000 + rank)
        x = torch.randn(tokens, args.hidden, generator=gen, device=device).to(torch.bfloat16)
        idx, weights = routing(tokens, args.experts, args.topk, device, 2000 + rank)
        ref = reference(x, weights)
        disp = MoeDispatcher(num_experts=args.experts, hidden=args.hidden, dtype=torch.bfloat16, max_tokens=tokens,
                             topk=args.topk, mode="graph", transport="peer")
        default = disp.launch_config
        cands = parse_configs(args.configs, default) if args.configs else candidates(default)
        rows = []

        def time_grid(name: str, cfg) -> None:
            try:
                disp.set_launch_config(cfg)
                fn = shardkit_round(disp, x, idx, weights)
                error = check(fn(), ref, fp8=False)
            except Exception as e:  # a grid that cannot run (e.g. does not compile) is reported, not fatal
                fn, error = None, f"{type(e).__name__}: {str(e)[:100]}"
            bad = torch.tensor([error is not None], dtype=torch.int32, device=device)
            dist.all_reduce(bad)
            us = None
            if not bad.item():
                samples = (time_host(fn, args.iters, args.reps, sync) if cpu
                           else time_cuda(fn, args.iters, args.reps, True, sync))
                us = statistics.median(max_over_ranks(samples, device))
            rows.append({"tokens": tokens, "name": name, "config": dataclasses.asdict(cfg), "short": cfg.short(),
                         "us": us, "error": None if us is not None else (error or "failed on another rank")})
            disp.check()

        t_tokens = time.monotonic()
        for n, (name, cfg) in enumerate(cands):
            if n and budget_spent(t_tokens, args.budget_s / len(args.tokens), device):
                rows += [{"tokens": tokens, "name": c[0], "config": dataclasses.asdict(c[1]), "short": c[1].short(),
                          "us": None, "error": "not timed: --budget-s spent"} for c in cands[n:]]
                break
            time_grid(name, cfg)
        merged = merge_best(rows, default)
        if merged is not None:
            time_grid("best_of_each_group", merged)
        ok = [r for r in rows if r["us"] is not None]
        base = next((r["us"] for r in rows if r["name"] == "default"), None)
        lines = [f"## {tokens} tokens/rank: dispatch + combine, graph, median us (max over ranks)", "",
                 "| grid | us | vs default | config |", "|---|---|---|---|"]
        for r in sorted(ok, key=lambda r: r["us"]) + [r for r in rows if r["us"] is None]:
            if r["us"] is None:
                lines.append(f"| {r['name']} | ERROR | | {r['error']} |")
            else:
                lines.append(f"| {r['name']} | {r['us']:.1f} | {base / r['us'] if base else 0:.2f}x | {r['short']} |")
        if args.profile and not cpu and ok:
            best = min(ok, key=lambda r: r["us"])
            chosen = ok if args.profile == "all" else (next(r_ for r_ in rows if r_["name"] == "default"), best)
            for r in {id(r_): r_ for r_ in chosen}.values():
                disp.set_launch_config(dataclasses.replace(default, **r["config"]))
                table, wall = kernel_table(shardkit_round(disp, x, idx, weights), args.iters, 3)
                lines += ["", f"kernels of {r['name']} ({wall:.1f} us wall per call):", ""]
                lines += [f"    {us:7.1f} us  x{c}  {n}" for n, c, us in table]
        disp.close()
        sync()
        tables.append("\n".join(lines))
        results += rows
        if rank == 0:
            print(tables[-1] + "\n", file=sys.stderr, flush=True)
    if rank == 0:
        print(f"tuning took {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return (env, {"results": results, "tables": tables}) if rank == 0 else None


def report(args: argparse.Namespace, env: dict, out: dict, world: int, functional: bool) -> None:
    text = "\n".join(header_lines(env)) + "\n\n" + "\n\n".join(out["tables"]) + "\n"
    if functional:
        text = "Functional run (interpreter): the times say nothing about GPUs.\n\n" + text
    print("\n".join(header_lines(env)))  # the tables were printed as they were made
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        card = env["gpu"].replace("NVIDIA ", "").split(" (")[0].replace(" ", "-")
        with open(os.path.join(args.out, f"moe_tune_{card}_x{world}.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, f"moe_tune_{card}_x{world}.json"), "w") as f:
            json.dump({"env": env, "results": out["results"]}, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default=None, help="tokens per rank (default 128,4096; CPU 7,33)")
    p.add_argument("--hidden", type=int, default=None, help="default 7168 (CPU 200)")
    p.add_argument("--experts", type=int, default=None, help="default 256 (CPU 8)")
    p.add_argument("--topk", type=int, default=None, help="default 8 (CPU 2)")
    p.add_argument("--configs", default=None, help="name=field:value/field:value,... instead of the built-in list")
    p.add_argument("--iters", type=int, default=None, help="calls per graph (default 20; CPU 1)")
    p.add_argument("--reps", type=int, default=None, help="graph replays (default 5; CPU 1)")
    p.add_argument("--profile", nargs="?", const="best", choices=("best", "all"),
                   help="per-kernel times of the default and the fastest grid ('all': of every timed grid)")
    p.add_argument("--budget-s", type=float, default=110.0, help="seconds of grids per run (split evenly over the "
                                                                 "token counts); the rest are listed as not timed")
    p.add_argument("--out", default=None, help="directory for the table and the JSON")
    p.add_argument("--cpu-world", type=int, default=0, help="no GPUs: run a CPU world of this many processes")
    args = p.parse_args()
    cpu = args.cpu_world > 0
    args.tokens = [int(t) for t in (args.tokens or ("7,33" if cpu else "128,4096")).split(",")]
    args.hidden = args.hidden or (200 if cpu else 7168)
    args.experts = args.experts or (8 if cpu else 256)
    args.topk = args.topk or (2 if cpu else 8)
    args.iters = args.iters or (1 if cpu else 20)
    args.reps = args.reps or (1 if cpu else 5)
    run_distributed(tune_rank, args, report)


if __name__ == "__main__":
    main()
