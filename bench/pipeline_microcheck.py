#!/usr/bin/env python
"""Where a pipeline stage's time goes, in a minute: prints what it finds (no records; ``--out DIR``
also gets the numbers as JSON).

    torchrun --standalone --nproc-per-node=2 bench/pipeline_microcheck.py [--out DIR]
    torchrun --standalone --nproc-per-node=2 bench/pipeline_microcheck.py --smoke   # CPU, gloo: checks the script

1. One decoder layer of the benchmark's model (hidden 4096, 32/8 heads, FFN 14336, bf16) for a few
   ``(slice length s, cached prefix p)``, timed four ways: a lone call (how the first profiler timed
   it), calls back to back (how the runtime runs them), CUDA-graph replays (the GPU's own time, no
   launch cost), and the host's time to issue one call while the GPU is busy. Lone minus graph is
   what a lone call adds; host issue above graph would mean a starved GPU.
2. The slice's attention alone: torch's bottom-right causal mask (``causal_lower_right``, which torch
   sends to FlashAttention-2) against the stage's two blocks merged by log-sum-exp, on cuDNN and on
   flash; and the first call of cuDNN at a new prefix length (its execution plan is built per shape).
3. Two ranks: a fixed stack of layer calls on rank 1 with an NCCL receive from rank 0 pending the
   whole time, against none pending, on NCCL's default channels and with the runtime's capped link
   group; and one transfer of a slice's activations on each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from shardkit.kernels.attention.sdpa import sdpa_backends  # noqa: E402
from shardkit.pipeline import LlamaConfig, LlamaStage, random_weights  # noqa: E402
from shardkit.pipeline.profiler import time_call  # noqa: E402
from shardkit.pipeline.runtime import _capped_nccl_group  # noqa: E402


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_stage(cfg: LlamaConfig, device, dtype, max_tokens: int, attention: str = "auto") -> LlamaStage:
    w = random_weights(cfg, range(1), False, False, device=device, dtype=dtype)
    return LlamaStage(cfg, w, range(1), first=False, last=False, device=device, dtype=dtype, max_tokens=max_tokens,
                      attention=attention)


def graph_seconds(fn, device: torch.device, replays: int = 10) -> float:
    """GPU seconds per call of ``fn`` replayed from a CUDA graph (nan where it cannot be captured)."""
    if device.type != "cuda":
        return float("nan")
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / replays
    except Exception as e:  # noqa: BLE001 - a diagnostic: say why and go on
        log(f"    (no CUDA graph: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return float("nan")


def host_issue_seconds(fn, device: torch.device, calls: int = 8) -> float:
    """Host seconds to issue one call of ``fn`` while the GPU is busy (the queue never waits for it)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda._sleep(int(5e8))  # ~0.25 s of GPU cycles ahead of the calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    out = (time.perf_counter() - t0) / calls
    sync(device)
    return out


def part_layer(cfg, device, dtype, shapes, report: dict) -> None:
    log("1. one decoder layer, ms: lone call | back to back | CUDA graph (GPU only) | host issue per call")
    stage = layer_stage(cfg, device, dtype, max(s + p for s, p in shapes))
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for s, p in shapes:
        x = torch.randn((1, s, cfg.hidden), generator=gen, device=device).to(dtype)

        def call(p: int = p, x: torch.Tensor = x) -> None:
            stage.length = p
            stage.forward(x, p)

        with torch.no_grad():
            lone = statistics.median(time_call(call, device, reps=5))
            sustained = statistics.median(time_call(call, device, reps=3, min_seconds=0.05))
            graph = graph_seconds(call, device)
            host = host_issue_seconds(call, device)
        rows.append({"s": s, "p": p, "lone_ms": lone * 1e3, "sustained_ms": sustained * 1e3, "graph_ms": graph * 1e3,
                     "host_issue_ms": host * 1e3})
        log(f"   s={s:5d} p={p:5d}: {lone * 1e3:7.3f} | {sustained * 1e3:7.3f} | {graph * 1e3:7.3f} | "
            f"{host * 1e3:7.3f}   (lone - graph {1e3 * (lone - graph):+.3f}, sustained - graph "
            f"{1e3 * (sustained - graph):+.3f})")
    report["layer"] = rows


def part_attention(cfg, device, dtype, shapes, report: dict) -> None:
    from torch.nn.attention.bias import causal_lower_right

    log("2. the slice's attention, ms (TFLOP/s): bottom-right mask (torch) | split+merge per kernel")
    kernels = sdpa_backends(device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for s, p in shapes:
        q = torch.randn((1, s, cfg.heads, cfg.head_dim), generator=gen, device=device).to(dtype).transpose(1, 2)
        k_cache = torch.randn((1, cfg.kv_heads, s + p, cfg.head_dim), generator=gen, device=device).to(dtype)
        v_cache = torch.randn_like(k_cache)
        flops = 4 * cfg.heads * cfg.head_dim * s * (p + s / 2)
        with torch.no_grad():
            def old():
                return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=causal_lower_right(s, p + s),
                                                      enable_gqa=True)
            want = old()
            row = {"s": s, "p": p, "lower_right_ms": statistics.median(time_call(old, device, 5, 0.02)) * 1e3}
            text = f"   s={s:5d} p={p:5d}: {row['lower_right_ms']:7.3f} ({flops / row['lower_right_ms'] / 1e9:5.0f})"
            for k in kernels:
                try:
                    st = layer_stage(cfg, device, dtype, s + p, attention=k)
                    if device.type == "cuda" and k == "cudnn":  # a prefix length not seen before: plan build
                        sync(device)
                        t0 = time.perf_counter()
                        st._attention(q, k_cache, v_cache, p - 1, p - 1 + s)
                        sync(device)
                        row["cudnn_first_call_ms"] = (time.perf_counter() - t0) * 1e3

                    def new(st=st):
                        return st._attention(q, k_cache, v_cache, p, p + s)
                    ms = statistics.median(time_call(new, device, 5, 0.02)) * 1e3
                    err = float((new().float() - want.float()).abs().max())
                    row[f"{k}_ms"], row[f"{k}_max_abs_diff"] = ms, err
                    text += f" | {k} {ms:7.3f} ({flops / ms / 1e9:5.0f}, diff {err:.1e})"
                except Exception as e:  # noqa: BLE001
                    text += f" | {k} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            if "cudnn_first_call_ms" in row:
                text += f"; cuDNN first call at a new shape {row['cudnn_first_call_ms']:.1f} ms"
            log(text)
            rows.append(row)
    report["attention"] = rows


def part_links(cfg, device, dtype, report: dict) -> None:
    rank = dist.get_rank()
    if device.type != "cuda":
        log("3. NCCL links: skipped (no CUDA)")
        return
    log("3. rank 1 computing 8 layer calls (s=2048, p=8192), ms: no receive pending | one pending; "
        "one 8 MiB transfer, ms")
    stage = layer_stage(cfg, device, dtype, 2048 + 8192)
    x = torch.randn((1, 2048, cfg.hidden), device=device).to(dtype)
    go = torch.zeros(1)

    def work() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(8):
            stage.length = 8192
            stage.forward(x, 8192)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    rows = []
    groups = [("NCCL default", dist.group.WORLD), ("capped 2 CTAs", _capped_nccl_group(dist.group.WORLD, 2))]
    buf = torch.empty((1, 1024, cfg.hidden), dtype=dtype, device=device)  # 8 MiB: a 1024-token slice
    with torch.no_grad():
        for name, group in groups:
            for _ in range(2):  # connect, warm up
                if rank == 0:
                    dist.send(buf, 1, group=group)
                else:
                    dist.recv(buf, 0, group=group)
            sync(device)
            idle, pending = [], []
            for _ in range(3):
                if rank == 1:
                    idle.append(work())
                    w = dist.irecv(buf, 0, group=group)
                    pending.append(work())
                    dist.send(go, 0, group=dist.group.WORLD)  # gloo: now send
                    w.wait()
                else:
                    dist.recv(go, 1, group=dist.group.WORLD)
                    dist.send(buf, 1, group=group)
                sync(device)
            t = []
            for _ in range(5):
                dist.barrier()
                sync(device)
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(buf, 1, group=group)
                else:
                    dist.recv(buf, 0, group=group)
                sync(device)
                t.append((time.perf_counter() - t0) * 1e3)
            gathered = [None] * 2
            dist.all_gather_object(gathered, (idle, pending, statistics.median(t)))
            idle, pending, _ = gathered[1]
            transfer = max(x[2] for x in gathered)
            row = {"group": name, "idle_ms": statistics.median(idle), "pending_ms": statistics.median(pending),
                   "transfer_8MiB_ms": transfer}
            rows.append(row)
            log(f"   {name:14s}: {row['idle_ms']:7.2f} | {row['pending_ms']:7.2f} "
                f"({100 * (row['pending_ms'] / row['idle_ms'] - 1):+.1f}%); transfer {transfer:.3f} ms")
    report["links"] = rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (gloo), to check the script")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        device, dtype = torch.device("cuda", rank), torch.bfloat16
        torch.cuda.set_device(device)
        cfg = LlamaConfig(vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                          rope_theta=500000.0, tie_embeddings=False)
        layer_shapes = [(512, 0), (1024, 0), (1024, 16384), (1536, 16384), (2048, 16384), (4096, 16384)]
        attn_shapes = [(1024, 8192), (1024, 24576), (1536, 24576), (4096, 16384)]
    else:
        device, dtype = torch.device("cpu"), torch.float32
        cfg = LlamaConfig(vocab=64, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96)
        layer_shapes, attn_shapes = [(16, 0), (16, 32)], [(16, 32)]
    report: dict = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__}
    log(f"pipeline microcheck on {report['device']}, torch {torch.__version__}, {dtype}")
    try:
        if rank == 0 or not cuda:
            part_layer(cfg, device, dtype, layer_shapes, report)
            part_attention(cfg, device, dtype, attn_shapes, report)
        dist.barrier()
        part_links(cfg, device, dtype, report)
        if rank == 0 and args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "pipeline_microcheck.json"), "w") as f:
                json.dump(report, f, indent=1)
            log(f"wrote {os.path.join(args.out, 'pipeline_microcheck.json')}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
