#!/usr/bin/env python
"""Decode attention on one GPU: shardkit's split-KV kernel against torch SDPA as TPLlama called it.

One query token per sequence against a KV cache, bf16, head dim 128, in the same run:
  shardkit_decode  shardkit.kernels.attention.decode.decode_attention (the launch policy's splits),
                   with q_pos on the device as TPLlama's decode passes it
  torch_sdpa       F.scaled_dot_product_attention(q.view(B, n_kv, group, hd), k, v) + reshape: the query
                   heads of a KV head as its query rows (TPLlama's decode before the kernel)
for B in 1, 8, 32, n_q / n_kv = 32 / 4 (a 70B model's heads at TP=2) and 64 / 8 (TP=1), KV length 4096
and 32768. Each case is checked (shardkit against torch, bf16 tolerance) before it is timed; times are
µs per call from CUDA-graph replays of ``--iters`` calls (median of ``--reps``); GB/s counts the K and V
bytes read. A sweep (``shardkit_decode_sweep``, B = 1, 32 / 4) times other split counts and tile sizes
to show whether the policy is near the best. Records: bench "attention_decode" (params batch, q_heads,
kv_heads, head_dim, kv_len, splits, block_n); table attention_decode_<card>_x1.md.

    python bench/attention_decode_bench.py [--out DIR] [--no-sweep]
    python bench/attention_decode_bench.py --smoke      # CPU, interpreter: a functional run, tiny shapes
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench import records as store  # noqa: E402
from bench.common import environment, header_lines, time_cuda, time_host  # noqa: E402

HEAD_DIM = 128
HEADS = ((32, 4), (64, 8))
SWEEP = [(s, n) for n in (32, 64, 128) for s in (8, 16, 32, 64, 128)]  # (splits, block_n)
SMOKE_SWEEP = [(3, 16)]


def torch_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    batch, n_q, hd = q.shape
    n_kv = k.shape[1]
    out = F.scaled_dot_product_attention(q.view(batch, n_kv, n_q // n_kv, hd), k, v)
    return out.reshape(batch, 1, n_q * hd)


def run_case(args, env, batch: int, n_q: int, n_kv: int, hd: int, kv_len: int, sweep: bool) -> list[dict]:
    from shardkit.kernels.attention.decode import DecodeConfig, decode_attention, decode_config

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    gen = torch.Generator(device).manual_seed(batch * 7 + kv_len)
    q = torch.randn(batch, n_q, hd, generator=gen, device=device).to(dtype)
    k = torch.randn(batch, n_kv, kv_len, hd, generator=gen, device=device).to(dtype)
    v = torch.randn(batch, n_kv, kv_len, hd, generator=gen, device=device).to(dtype)
    q_pos = torch.full((1,), kv_len - 1, dtype=torch.long, device=device)
    sm_count = 4 if args.smoke else torch.cuda.get_device_properties(0).multi_processor_count
    policy = decode_config(batch, n_kv, kv_len, hd, q.element_size(), sm_count, args.smoke)
    ref = torch_decode(q, k, v).float()
    out = torch.empty_like(q)
    kv_bytes = 2 * k.numel() * k.element_size()
    variants = [("torch_sdpa", None), ("shardkit_decode", policy)]
    if sweep:
        grid = SMOKE_SWEEP if args.smoke else SWEEP
        variants += [("shardkit_decode_sweep", DecodeConfig(s, n)) for s, n in grid
                     if (s, n) != (policy.splits, policy.block_n)]
    recs = []
    for impl, config in variants:
        if config is None:
            def fn() -> None:
                torch_decode(q, k, v)
        else:
            def fn(config=config) -> None:
                decode_attention(q, k, v, kv_len, q_pos=q_pos, config=config, out=out)
        error, samples = None, None
        try:
            fn()
            if config is not None:
                err = ((out.reshape(ref.shape).float() - ref).norm() / ref.norm()).item()
                if not err <= 1e-2:
                    error = f"differs from torch SDPA by {err:.3g} (relative)"
            if error is None:
                samples = (time_host(fn, args.iters, args.reps, lambda: None) if args.smoke else
                           time_cuda(fn, args.iters, args.reps, True, torch.cuda.synchronize))
        except Exception as e:  # a sweep config that does not fit (shared memory): record why, go on
            error = f"{type(e).__name__}: {str(e)[:200]}"
        params = {"batch": batch, "q_heads": n_q, "kv_heads": n_kv, "head_dim": hd, "kv_len": kv_len,
                  "splits": config.splits if config else None, "block_n": config.block_n if config else None}
        metrics = {"gbps": kv_bytes / statistics.median(samples) / 1e3} if samples else {}
        recs.append(store.record("attention_decode", impl, gpu=env["gpu"], world=1, dtype=dtype,
                                 mode="cpu" if args.smoke else "graph", params=params, us=samples, metrics=metrics,
                                 error=error))
        r = recs[-1]
        print(f"B={batch:2d} {n_q}/{n_kv} kv_len={kv_len:5d} {impl:22s} "
              + (f"splits={config.splits:3d} block_n={config.block_n:3d} " if config else " " * 24)
              + (f"{r['us_median']:9.1f} us {metrics['gbps']:7.0f} GB/s" if samples else f"ERROR {error}"), flush=True)
    return recs


def table(recs: list[dict]) -> list[str]:
    main = [r for r in recs if r["impl"] != "shardkit_decode_sweep"]
    lines = ["| B | n_q / n_kv | kv_len | torch SDPA µs | shardkit µs (splits) | speedup | shardkit GB/s |",
             "|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["params"]["batch"], r["params"]["q_heads"], r["params"]["kv_heads"], r["params"]["kv_len"])
                         for r in main)
    for b, n_q, n_kv, kv_len in keys:
        by = {r["impl"]: r for r in main if (r["params"]["batch"], r["params"]["q_heads"], r["params"]["kv_heads"],
                                             r["params"]["kv_len"]) == (b, n_q, n_kv, kv_len)}
        t, s = by["torch_sdpa"].get("us_median"), by["shardkit_decode"].get("us_median")
        lines.append(f"| {b} | {n_q} / {n_kv} | {kv_len} | {t if t is None else f'{t:.1f}'} | "
                     + (f"{s:.1f} ({by['shardkit_decode']['params']['splits']})" if s else "error") + " | "
                     + (f"{t / s:.1f}x" if t and s else "-") + " | "
                     + (f"{by['shardkit_decode']['metrics']['gbps']:.0f}" if s else "-") + " |")
    swept = {r["params"]["q_heads"] for r in recs if r["impl"] == "shardkit_decode_sweep"}
    sweep = [r for r in recs if r["impl"].startswith("shardkit_decode") and r["params"]["batch"] == 1
             and r["params"]["q_heads"] in swept]
    split_counts = sorted({r["params"]["splits"] for r in sweep})
    if sweep:
        lines += ["", "Sweep, B = 1, the first head layout (µs; * = the policy's choice):", "",
                  "| kv_len | block_n | " + " | ".join(f"splits {s}" for s in split_counts) + " |",
                  "|---|---|" + "---|" * len(split_counts)]
        for kv_len in sorted({r["params"]["kv_len"] for r in sweep}):
            for n in sorted({r["params"]["block_n"] for r in sweep}):
                cells = []
                for s in split_counts:
                    r = next((r for r in sweep if (r["params"]["kv_len"], r["params"]["block_n"],
                                                   r["params"]["splits"]) == (kv_len, n, s)), None)
                    cells.append("-" if r is None or r["us_median"] is None else
                                 f"{r['us_median']:.1f}" + ("*" if r["impl"] == "shardkit_decode" else ""))
                lines.append(f"| {kv_len} | {n} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--kv-lens", default="4096,32768")
    p.add_argument("--iters", type=int, default=20, help="calls per CUDA graph")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU functional run (Triton interpreter, tiny shapes)")
    p.add_argument("--out", default=None, help="records to DIR/records.jsonl and the table to DIR")
    args = p.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before shardkit imports triton kernels
    env = environment()
    print("\n".join(header_lines(env)), flush=True)
    batches = [1, 3] if args.smoke else [int(b) for b in args.batches.split(",")]
    kv_lens = [40] if args.smoke else [int(n) for n in args.kv_lens.split(",")]
    heads, hd = (((8, 4),), 16) if args.smoke else (HEADS, HEAD_DIM)
    if args.smoke:
        args.iters, args.reps = 1, 1
    recs = []
    with torch.no_grad():
        for n_q, n_kv in heads:
            for kv_len in kv_lens:
                for batch in batches:
                    sweep = not args.no_sweep and batch == 1 and (n_q, n_kv) == heads[0]
                    recs += run_case(args, env, batch, n_q, n_kv, hd, kv_len, sweep)
                    if not args.smoke:
                        torch.cuda.empty_cache()  # the largest case holds 4.3 GB of cache
    from bench.report import card
    lines = [f"# Decode attention: {env['gpu']}, commit {recs[0]['commit']}, run {recs[0]['run']}", "",
             *header_lines(env), "", f"{recs[0]['dtype']}, head dim {hd}, one query token per sequence, mode "
             f"{recs[0]['mode']}, µs per call (median); GB/s: K and V bytes read.", "", *table(recs)]
    print("\n".join(lines))
    path = store.destination(args.out, on_gpu=not args.smoke)
    if path is None:
        print("Functional CPU run: interpreter times, nothing written unless --out.")
        return
    store.append(recs, path)
    md = os.path.join(os.path.dirname(path), f"attention_decode_{card(env['gpu'])}_x1.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended {len(recs)} records to {path}; wrote {md}")


if __name__ == "__main__":
    main()
