#!/usr/bin/env python
"""Benchmark of the attention chunk and merge kernels on one GPU, against torch.

Chunk kernel (shardkit.kernels.attention.chunk) in TFLOP/s against, in the same run:
  * torch SDPA (F.scaled_dot_product_attention, enable_gqa when supported), which does
    not return the log-sum-exp;
  * the SDPA kernels that do return it, flash and cuDNN, as ring attention calls them
    (shardkit.kernels.attention.sdpa.sdpa_with_lse): the other local backends of the ring.
    --write-thresholds stores the fastest of the three local backends (geometric mean over
    the lengths and masks) as this GPU's ``local_backend="auto"`` choice, and its TFLOP/s as
    the compute rate of ring attention's pass-KV/pass-Q cost model (``ring_variant``).
Merge kernels (shardkit.kernels.attention.merge) in GB/s against the measured bandwidth
of a torch device copy of the same size, and against the eager torch merge a user
would write.

Shapes: bf16, B=1, 32 q heads / 8 kv heads, head dim 128, L = 8K, 16K, 32K (Lq = Lk),
causal and non-causal. Every kernel is checked against torch before it is timed.
Timing: triton.testing.do_bench (CUDA events, L2 flushed between runs), median.

Usage:  python bench/attention_chunk_bench.py [--out bench/results] [--lengths 8192 16384 32768]
        [--no-sweep]    (skip the small tile-config sweep of the chunk kernel)
        [--write-thresholds]
Writes attention_chunk_<gpu>.json and .md into --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from shardkit.kernels.attention.chunk import attention_chunk  # noqa: E402
from shardkit.kernels.attention.merge import merge_attention, merge_attention_  # noqa: E402
from shardkit.kernels.attention import sdpa as attention_sdpa  # noqa: E402
from shardkit.kernels.attention.sdpa import sdpa_backends, sdpa_with_lse  # noqa: E402
from shardkit import thresholds  # noqa: E402
from shardkit.reference.attention import reference_attention  # noqa: E402

DEV = "cuda"  # a module global so that the script logic can be smoke-tested on CPU
DTYPE = torch.bfloat16
B, HQ, HKV, D = 1, 32, 8, 128
ATOL = RTOL = 1.6e-2  # tests/tolerances.py ATTENTION[bf16]


def bench_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_graph_ms(fn) -> float | None:
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except Exception as e:  # graphs are a bonus; never fail the run for them
        print(f"    (cuda graph timing unavailable: {type(e).__name__}: {e})")
        return None


def attn_flops(L: int, causal: bool) -> float:
    # 2 matmuls of 2*L*L*D flops per head; causal visits half of the score matrix.
    f = 4.0 * B * HQ * L * L * D
    return f / 2 if causal else f


def close(a: torch.Tensor, b: torch.Tensor, atol=ATOL, rtol=RTOL) -> tuple[bool, float]:
    a, b = a.float(), b.float()
    fin = torch.isfinite(b)
    ok = bool(torch.equal(torch.isneginf(a), torch.isneginf(b)))
    err = (a[fin] - b[fin]).abs()
    ok = ok and bool((err <= atol + rtol * b[fin].abs()).all())
    return ok, float(err.max()) if err.numel() else 0.0


def check_chunk_slice(q, k, v, out, lse, causal: bool, gen) -> tuple[bool, float]:
    """Our kernel against an fp32 torch reference on 2 heads x 256 rows (full K)."""
    L = q.shape[2]
    rows = torch.cat([torch.tensor([0, L - 1], device=DEV),
                      torch.randint(0, L, (254,), device=DEV, generator=gen)])
    ok_all, worst = True, 0.0
    for h in (0, HQ - 1):
        hk = h // (HQ // HKV)
        ro, rl = reference_attention(q[:, h:h + 1, rows], k[:, hk:hk + 1], v[:, hk:hk + 1],
                                     causal=causal, q_pos=rows, kv_pos=0, dtype=torch.float32)
        ok1, e1 = close(out[:, h:h + 1, rows], ro)
        ok2, e2 = close(lse[:, h:h + 1, rows], rl, atol=1e-3, rtol=1e-4)
        ok_all &= ok1 and ok2
        worst = max(worst, e1)
    return ok_all, worst


def chunk_section(lengths, results, failures):
    gen = torch.Generator(device=DEV).manual_seed(0)
    for L in lengths:
        q = torch.randn(B, HQ, L, D, device=DEV, generator=gen).to(DTYPE)
        k = torch.randn(B, HKV, L, D, device=DEV, generator=gen).to(DTYPE)
        v = torch.randn(B, HKV, L, D, device=DEV, generator=gen).to(DTYPE)
        k_exp = k.repeat_interleave(HQ // HKV, dim=1)  # for an SDPA without native GQA
        v_exp = v.repeat_interleave(HQ // HKV, dim=1)
        for causal in (False, True):
            flops = attn_flops(L, causal)
            tag = f"L={L} {'causal' if causal else 'full'}"
            row = {"L": L, "causal": causal, "flops": flops, "impls": {}}
            out, lse = attention_chunk(q, k, v, causal=causal)
            torch.cuda.synchronize()
            ok, err = check_chunk_slice(q, k, v, out, lse, causal, gen)
            print(f"  {tag}: shardkit check vs fp32 torch slice: {'OK' if ok else 'FAIL'} (max err {err:.2e})")
            if not ok:
                failures.append(f"shardkit chunk {tag}: max err {err:.2e}")

            def ours():
                attention_chunk(q, k, v, causal=causal)

            baselines = {}
            # SDPA with native GQA if this torch has it, else with expanded kv.
            try:
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                baselines["sdpa (gqa)"] = (lambda: F.scaled_dot_product_attention(
                    q, k, v, is_causal=causal, enable_gqa=True), None)
            except Exception:
                baselines["sdpa (kv expanded)"] = (lambda: F.scaled_dot_product_attention(
                    q, k_exp, v_exp, is_causal=causal), None)
            # ring attention's other local backends: torch's kernels that return the LSE
            # (shardkit.kernels.attention.sdpa; native GQA where the op has it).
            for backend in sdpa_backends(q.device, q.dtype):
                baselines[f"{backend} (lse)"] = (
                    lambda backend=backend: sdpa_with_lse(q, k, v, causal=causal, backend=backend), 1)

            ms = bench_ms(ours)
            row["impls"]["shardkit"] = {"ms": ms, "tflops": flops / ms / 1e9, "check": ok, "max_err": err}
            for name, (fn, lse_idx) in baselines.items():
                try:
                    res = fn()
                    torch.cuda.synchronize()
                    bo = res[0] if isinstance(res, (tuple, list)) else res
                    ok_o, err_o = close(out, bo)
                    note = f"out vs shardkit max diff {err_o:.2e}"
                    entry = {"check_out_vs_shardkit": ok_o, "max_diff_out": err_o}
                    if lse_idx is not None:
                        bl = res[lse_idx]
                        if bl.numel() >= lse.numel():
                            bl = bl.reshape(B, HQ, -1)[..., :L]
                            ok_l, err_l = close(lse, bl, atol=2e-2, rtol=1e-3)
                            entry.update(check_lse_vs_shardkit=ok_l, max_diff_lse=err_l)
                            note += f", lse diff {err_l:.2e}"
                    bms = bench_ms(fn)
                    entry.update(ms=bms, tflops=flops / bms / 1e9)
                    row["impls"][name] = entry
                    print(f"    {name:26s} {flops / bms / 1e9:7.1f} TFLOP/s  ({bms:.3f} ms; {note})")
                except Exception as e:
                    row["impls"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                    print(f"    {name:26s} unavailable: {row['impls'][name]['error']}")
            print(f"    {'shardkit':26s} {flops / ms / 1e9:7.1f} TFLOP/s  ({ms:.3f} ms)")
            results.append(row)
        del q, k, v, k_exp, v_exp
        torch.cuda.empty_cache()


def sweep_section(L, results):
    """A few tile configs of the chunk kernel, to see whether the defaults are right."""
    gen = torch.Generator(device=DEV).manual_seed(1)
    q = torch.randn(B, HQ, L, D, device=DEV, generator=gen).to(DTYPE)
    k = torch.randn(B, HKV, L, D, device=DEV, generator=gen).to(DTYPE)
    v = torch.randn(B, HKV, L, D, device=DEV, generator=gen).to(DTYPE)
    ref = {c: attention_chunk(q, k, v, causal=c) for c in (False, True)}
    configs = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 8, 4)]
    for bm, bn, nw, ns in configs:
        for causal in (False, True):
            kw = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
            try:
                o, l = attention_chunk(q, k, v, causal=causal, **kw)
                ok = close(o, ref[causal][0])[0] and close(l, ref[causal][1], atol=1e-3, rtol=1e-4)[0]
                ms = bench_ms(lambda: attention_chunk(q, k, v, causal=causal, **kw))
                tf = attn_flops(L, causal) / ms / 1e9
                results.append({"L": L, "causal": causal, "config": [bm, bn, nw, ns], "ms": ms,
                                "tflops": tf, "agrees_with_default": ok})
                print(f"  BLOCK_M={bm:3d} BLOCK_N={bn:3d} warps={nw} stages={ns} "
                      f"{'causal' if causal else 'full  '}: {tf:7.1f} TFLOP/s  agree={ok}")
            except Exception as e:
                results.append({"L": L, "causal": causal, "config": [bm, bn, nw, ns],
                                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                print(f"  BLOCK_M={bm} BLOCK_N={bn} warps={nw} stages={ns}: failed ({type(e).__name__})")
    del q, k, v
    torch.cuda.empty_cache()


def torch_merge(outs: torch.Tensor, lses: torch.Tensor):
    """The eager torch merge a user would write (NaN for rows that are -inf everywhere)."""
    lse = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - lse).unsqueeze(-1)
    return (outs.float() * w).sum(0).to(outs.dtype), lse


def merge_section(lengths, results, failures):
    gen = torch.Generator(device=DEV).manual_seed(2)
    for L in lengths:
        rows = B * HQ * L
        row_bytes = D * DTYPE.itemsize + 4  # one out row + its lse
        # torch device copy of one [B, H, L, D] output: read + write.
        src = torch.randn(B, HQ, L, D, device=DEV, generator=gen).to(DTYPE)
        dst = torch.empty_like(src)
        copy_ms = bench_ms(lambda: dst.copy_(src))
        copy_gbs = 2 * src.numel() * src.element_size() / copy_ms / 1e6
        print(f"  L={L}: torch copy of {src.numel() * 2 / 2**20:.0f} MiB: {copy_gbs:7.1f} GB/s")
        del src, dst
        for S in (2, 4, 8):
            outs = torch.randn(S, B, HQ, L, D, device=DEV, generator=gen).to(DTYPE)
            lses = torch.randn(S, B, HQ, L, device=DEV, generator=gen) * 3
            moved = (S + 1) * rows * row_bytes
            entry = {"L": L, "S": S, "bytes": moved, "copy_gbs": copy_gbs}
            # Correctness before timing (fp32 torch, full tensors).
            ro, rl = torch_merge(outs.float(), lses)
            if S == 2:
                o, l = outs[0].clone(), lses[0].clone()
                merge_attention_(o, l, outs[1], lses[1])
                name = "merge_attention_ (in place)"
                o_buf, l_buf = outs[0].clone(), lses[0].clone()

                def fn():
                    merge_attention_(o_buf, l_buf, outs[1], lses[1])
            else:
                o, l = merge_attention(outs, lses)
                name = f"merge_attention (N={S})"
                o_out = torch.empty_like(outs[0])
                l_out = torch.empty_like(lses[0])

                def fn():
                    merge_attention(outs, lses, out=o_out, lse=l_out)
            torch.cuda.synchronize()
            ok1, e1 = close(o, ro, atol=8e-3, rtol=1.6e-2)
            ok2, e2 = close(l, rl, atol=1e-5, rtol=1e-5)
            entry.update(check=ok1 and ok2, max_err_out=e1, max_err_lse=e2)
            if not (ok1 and ok2):
                failures.append(f"{name} L={L}: err out {e1:.2e} lse {e2:.2e}")
            ms = bench_ms(fn)
            gms = bench_graph_ms(fn)
            tms = bench_ms(lambda: torch_merge(outs, lses))
            entry.update(name=name, ms=ms, gbs=moved / ms / 1e6, graph_ms=gms,
                         graph_gbs=(moved / gms / 1e6) if gms else None,
                         torch_ms=tms, torch_gbs=moved / tms / 1e6)
            print(f"    {name:28s} {'OK' if entry['check'] else 'FAIL'}  {entry['gbs']:7.1f} GB/s "
                  f"({100 * entry['gbs'] / copy_gbs:5.1f}% of copy; graph "
                  f"{entry['graph_gbs'] or float('nan'):7.1f} GB/s)   torch eager merge {entry['torch_gbs']:7.1f} GB/s")
            results.append(entry)
            del outs, lses, ro, rl, o, l
        torch.cuda.empty_cache()


def local_backend_scores(chunk) -> dict:
    """Geometric-mean TFLOP/s of each ring local backend over the measured rows."""
    keys = {"triton": "shardkit", **{b: f"{b} (lse)" for b in attention_sdpa.SDPA_BACKENDS}}
    scores = {}
    for backend, key in keys.items():
        vals = [r["impls"].get(key, {}).get("tflops") for r in chunk]
        if vals and all(vals):
            scores[backend] = round(math.exp(sum(math.log(x) for x in vals) / len(vals)), 1)
    return scores


def write_outputs(out_dir, meta, chunk, sweep, merge, failures):
    os.makedirs(out_dir, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["gpu"]).strip("-").lower()
    base = os.path.join(out_dir, f"attention_chunk_{slug}_w1")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "chunk": chunk, "sweep": sweep, "merge": merge, "failures": failures},
                  f, indent=1)
    md = [f"# Attention chunk + merge kernels on {meta['gpu']}", "",
          f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; {meta['dtype']}, B={B}, "
          f"Hq={HQ}, Hkv={HKV}, D={D}, Lq = Lk = L; do_bench median (L2 flushed). "
          f"Checks: {'all passed' if not failures else 'FAILURES: ' + '; '.join(failures)}", "",
          f"Ring local backends, geometric-mean TFLOP/s: {meta.get('local_backend_scores')}; fastest: "
          f"**{meta.get('fastest_local_backend')}** (kv heads expanded for: {meta.get('kv_expanded_for') or 'none'})",
          "", "## Chunk attention, TFLOP/s (causal counts half the score matrix)", ""]
    names = []
    for r in chunk:
        for n in r["impls"]:
            if n not in names:
                names.append(n)
    md.append("| L | mask | " + " | ".join(names) + " | shardkit / best baseline |")
    md.append("|---|---|" + "---|" * len(names) + "---|")
    for r in chunk:
        cells, best = [], 0.0
        for n in names:
            e = r["impls"].get(n, {})
            if "tflops" in e:
                cells.append(f"{e['tflops']:.1f}")
                if n != "shardkit":
                    best = max(best, e["tflops"])
            else:
                cells.append("n/a")
        ratio = r["impls"]["shardkit"]["tflops"] / best if best else float("nan")
        md.append(f"| {r['L']} | {'causal' if r['causal'] else 'full'} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    if sweep:
        md += ["", f"## Chunk kernel tile sweep (L={sweep[0]['L']}), TFLOP/s", "",
               "| BLOCK_M | BLOCK_N | warps | stages | mask | TFLOP/s |", "|---|---|---|---|---|---|"]
        for s in sweep:
            bm, bn, nw, ns = s["config"]
            val = f"{s['tflops']:.1f}" if "tflops" in s else "failed"
            md.append(f"| {bm} | {bn} | {nw} | {ns} | {'causal' if s['causal'] else 'full'} | {val} |")
    md += ["", "## Merge, GB/s (bytes = (S+1) x (out + lse) rows)", "",
           "| L | S | kernel | GB/s eager | GB/s graph | % of torch copy | torch eager merge GB/s |",
           "|---|---|---|---|---|---|---|"]
    for m in merge:
        g = f"{m['graph_gbs']:.1f}" if m.get("graph_gbs") else "n/a"
        md.append(f"| {m['L']} | {m['S']} | {m['name']} | {m['gbs']:.1f} | {g} | "
                  f"{100 * m['gbs'] / m['copy_gbs']:.1f} | {m['torch_gbs']:.1f} |")
    md.append("")
    with open(base + ".md", "w") as f:
        f.write("\n".join(md))
    return base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--write-thresholds", action="store_true",
                    help="store the fastest local backend for ring attention in thresholds.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention_chunk_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("attention_chunk_bench: unset TRITON_INTERPRET to benchmark compiled kernels", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}", flush=True)
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "host": platform.node(), "world": 1,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "lengths": args.lengths,
            "dtype": str(DTYPE).replace("torch.", ""), "B": B, "Hq": HQ, "Hkv": HKV, "D": D}
    t0 = time.time()
    chunk, sweep, merge, failures = [], [], [], []
    print("== chunk attention (TFLOP/s)", flush=True)
    chunk_section(args.lengths, chunk, failures)
    if not args.no_sweep:
        print("== chunk tile sweep", flush=True)
        sweep_section(16384 if 16384 in args.lengths else args.lengths[0], sweep)
    print("== merge (GB/s)", flush=True)
    merge_section(args.lengths, merge, failures)
    meta["seconds"] = time.time() - t0
    meta["kv_expanded_for"] = list(attention_sdpa.kv_expanded_backends())
    meta["local_backend_scores"] = local_backend_scores(chunk)
    best = max(meta["local_backend_scores"], key=meta["local_backend_scores"].get)
    meta["fastest_local_backend"] = best
    print(f"local backends, geometric-mean TFLOP/s: {meta['local_backend_scores']} -> {best}")
    if args.write_thresholds and not failures:
        thresholds.write_chunk_backend(gpu, best)
        # The cost model of ring_attention's auto variant uses the local kernel's rate.
        thresholds.write_ring_costs(gpu, attention_tflops=meta["local_backend_scores"][best])
        print(f"wrote chunk_backend[{gpu!r}] = {best!r} and its TFLOP/s to {thresholds.PATH}")
    base = write_outputs(args.out, meta, chunk, sweep, merge, failures)
    print(f"wrote {base}.json and {base}.md in {meta['seconds']:.0f} s")
    if failures:
        print("CORRECTNESS FAILURES:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
