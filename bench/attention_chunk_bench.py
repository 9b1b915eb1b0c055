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

Usage:  python bench/attention_chunk_bench.py [--out DIR] [--lengths 8192 16384 32768]
        [--no-sweep]    (skip the small tile-config sweep of the chunk kernel)
        [--write-thresholds]
The records go to the store (bench/results/records.jsonl, or ``--out DIR``/records.jsonl) with the
table and plot ``attention_chunk_<card>_x1.md``/``.png`` (bench/report.py). Record names: chunk
kernels ``shardkit_chunk``, ``torch_sdpa``, ``torch_<backend>_lse`` (params ``study="chunk"``, or
``"tile_sweep"`` with the tile); merges ``shardkit_merge_inplace`` (two partials),
``shardkit_merge``, ``torch_merge`` and the ``torch_copy`` yardstick (``study="merge"``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.records import record  # noqa: E402
from bench.report import local_backend_scores, publish  # noqa: E402
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


SHAPE = {"batch": B, "q_heads": HQ, "kv_heads": HKV, "head_dim": D}


def bench_us(fn) -> list[float]:
    """Microseconds of each timed run of ``fn`` (do_bench: L2 flushed before each)."""
    return [t * 1e3 for t in triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")]


def bench_graph_us(fn) -> list[float] | None:
    try:
        return [t * 1e3 for t in triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="all")]
    except Exception as e:  # graphs are a bonus; never fail the run for them
        print(f"    (cuda graph timing unavailable: {type(e).__name__}: {e})")
        return None


def keep(records: list[dict], impl: str, params: dict, us: list[float] | None, metrics: dict | None = None,
         mode: str = "eager", error: str | None = None) -> dict:
    records.append(record("attention_chunk", impl, gpu=torch.cuda.get_device_name(), world=1, dtype=DTYPE, mode=mode,
                          params={**params, **SHAPE}, us=us, metrics=metrics, error=error))
    return records[-1]


def attn_flops(L: int, causal: bool) -> float:
    # 2 matmuls of 2*L*L*D flops per head; causal visits half of the score matrix.
    f = 4.0 * B * HQ * L * L * D
    return f / 2 if causal else f


def tflops(flops: float, us: list[float]) -> float:
    return round(flops / statistics.median(us) / 1e6, 1)


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


def chunk_section(lengths, records, failures):
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
            case = {"study": "chunk", "seq_len": L, "causal": causal}
            out, lse = attention_chunk(q, k, v, causal=causal)
            torch.cuda.synchronize()
            ok, err = check_chunk_slice(q, k, v, out, lse, causal, gen)
            print(f"  {tag}: shardkit check vs fp32 torch slice: {'OK' if ok else 'FAIL'} (max err {err:.2e})")
            if not ok:
                failures.append(f"shardkit chunk {tag}: max err {err:.2e}")

            def ours():
                attention_chunk(q, k, v, causal=causal)

            baselines = {}  # impl -> (call, index of the LSE in its result or None, kv heads expanded)
            # SDPA with native GQA if this torch has it, else with expanded kv.
            try:
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                baselines["torch_sdpa"] = (lambda: F.scaled_dot_product_attention(
                    q, k, v, is_causal=causal, enable_gqa=True), None, False)
            except Exception:
                baselines["torch_sdpa"] = (lambda: F.scaled_dot_product_attention(
                    q, k_exp, v_exp, is_causal=causal), None, True)
            # ring attention's other local backends: torch's kernels that return the LSE
            # (shardkit.kernels.attention.sdpa; native GQA where the op has it).
            for backend in sdpa_backends(q.device, q.dtype):
                baselines[f"torch_{backend}_lse"] = (
                    lambda backend=backend: sdpa_with_lse(q, k, v, causal=causal, backend=backend), 1, backend)

            us = bench_us(ours)
            keep(records, "shardkit_chunk", case, us, {"tflops": tflops(flops, us)},
                 error=None if ok else f"differs from the fp32 reference (max err {err:.2e})")
            for name, (fn, lse_idx, expanded) in baselines.items():
                try:
                    res = fn()
                    torch.cuda.synchronize()
                    bo = res[0] if isinstance(res, (tuple, list)) else res
                    ok_o, err_o = close(out, bo)
                    note = f"out vs shardkit max diff {err_o:.2e}"
                    if lse_idx is not None:
                        bl = res[lse_idx]
                        if bl.numel() >= lse.numel():
                            bl = bl.reshape(B, HQ, -1)[..., :L]
                            ok_l, err_l = close(lse, bl, atol=2e-2, rtol=1e-3)
                            ok_o = ok_o and ok_l
                            note += f", lse diff {err_l:.2e}"
                    if isinstance(expanded, str):  # a backend: did it refuse the grouped-query shape?
                        expanded = expanded in attention_sdpa.kv_expanded_backends()
                    params = {**case, **({"kv_expanded": True} if expanded else {})}
                    base_us = bench_us(fn)
                    keep(records, name, params, base_us, {"tflops": tflops(flops, base_us)},
                         error=None if ok_o else f"differs from shardkit ({note})")
                    print(f"    {name:26s} {tflops(flops, base_us):7.1f} TFLOP/s  "
                          f"({statistics.median(base_us) / 1e3:.3f} ms; {note})")
                except Exception as e:
                    keep(records, name, case, None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    print(f"    {name:26s} unavailable: {records[-1]['error']}")
            print(f"    {'shardkit':26s} {tflops(flops, us):7.1f} TFLOP/s")
        del q, k, v, k_exp, v_exp
        torch.cuda.empty_cache()


def sweep_section(L, records):
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
            case = {"study": "tile_sweep", "seq_len": L, "causal": causal,
                    "tile": {"block_m": bm, "block_n": bn, "warps": nw, "stages": ns}}
            try:
                o, l = attention_chunk(q, k, v, causal=causal, **kw)
                ok = close(o, ref[causal][0])[0] and close(l, ref[causal][1], atol=1e-3, rtol=1e-4)[0]
                us = bench_us(lambda: attention_chunk(q, k, v, causal=causal, **kw))
                rate = tflops(attn_flops(L, causal), us)
                keep(records, "shardkit_chunk", case, us, {"tflops": rate},
                     error=None if ok else "differs from the default tile")
                print(f"  BLOCK_M={bm:3d} BLOCK_N={bn:3d} warps={nw} stages={ns} "
                      f"{'causal' if causal else 'full  '}: {rate:7.1f} TFLOP/s  agree={ok}")
            except Exception as e:
                keep(records, "shardkit_chunk", case, None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                print(f"  BLOCK_M={bm} BLOCK_N={bn} warps={nw} stages={ns}: failed ({type(e).__name__})")
    del q, k, v
    torch.cuda.empty_cache()


def torch_merge(outs: torch.Tensor, lses: torch.Tensor):
    """The eager torch merge a user would write (NaN for rows that are -inf everywhere)."""
    lse = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - lse).unsqueeze(-1)
    return (outs.float() * w).sum(0).to(outs.dtype), lse


def gbps(nbytes: int, us: list[float] | None) -> float | None:
    return None if not us else round(nbytes / statistics.median(us) / 1e3, 1)


def merge_section(lengths, records, failures):
    gen = torch.Generator(device=DEV).manual_seed(2)
    for L in lengths:
        rows = B * HQ * L
        row_bytes = D * DTYPE.itemsize + 4  # one out row + its lse
        # torch device copy of one [B, H, L, D] output: read + write, the yardstick.
        src = torch.randn(B, HQ, L, D, device=DEV, generator=gen).to(DTYPE)
        dst = torch.empty_like(src)
        copied = 2 * src.numel() * src.element_size()
        copy_us = bench_us(lambda: dst.copy_(src))
        keep(records, "torch_copy", {"study": "merge", "seq_len": L, "bytes": copied}, copy_us,
             {"gbps": gbps(copied, copy_us)})
        print(f"  L={L}: torch copy of {src.numel() * 2 / 2**20:.0f} MiB: {gbps(copied, copy_us):7.1f} GB/s")
        del src, dst
        for S in (2, 4, 8):
            outs = torch.randn(S, B, HQ, L, D, device=DEV, generator=gen).to(DTYPE)
            lses = torch.randn(S, B, HQ, L, device=DEV, generator=gen) * 3
            moved = (S + 1) * rows * row_bytes
            case = {"study": "merge", "seq_len": L, "partials": S, "bytes": moved}
            # Correctness before timing (fp32 torch, full tensors).
            ro, rl = torch_merge(outs.float(), lses)
            if S == 2:
                o, l = outs[0].clone(), lses[0].clone()
                merge_attention_(o, l, outs[1], lses[1])
                name = "shardkit_merge_inplace"
                o_buf, l_buf = outs[0].clone(), lses[0].clone()

                def fn():
                    merge_attention_(o_buf, l_buf, outs[1], lses[1])
            else:
                o, l = merge_attention(outs, lses)
                name = "shardkit_merge"
                o_out = torch.empty_like(outs[0])
                l_out = torch.empty_like(lses[0])

                def fn():
                    merge_attention(outs, lses, out=o_out, lse=l_out)
            torch.cuda.synchronize()
            ok1, e1 = close(o, ro, atol=8e-3, rtol=1.6e-2)
            ok2, e2 = close(l, rl, atol=1e-5, rtol=1e-5)
            error = None if ok1 and ok2 else f"differs from the torch merge: err out {e1:.2e} lse {e2:.2e}"
            if error:
                failures.append(f"{name} L={L} S={S}: {error}")
            eager_us, graph_us = bench_us(fn), bench_graph_us(fn)
            torch_us = bench_us(lambda: torch_merge(outs, lses))
            keep(records, name, case, eager_us, {"gbps": gbps(moved, eager_us)}, error=error)
            if graph_us:
                keep(records, name, case, graph_us, {"gbps": gbps(moved, graph_us)}, mode="graph", error=error)
            keep(records, "torch_merge", case, torch_us, {"gbps": gbps(moved, torch_us)})
            print(f"    {name} S={S}: {'OK' if not error else 'FAIL'}  {gbps(moved, eager_us):7.1f} GB/s "
                  f"({100 * gbps(moved, eager_us) / gbps(copied, copy_us):5.1f}% of copy; graph "
                  f"{gbps(moved, graph_us) or float('nan'):7.1f} GB/s)   torch eager merge "
                  f"{gbps(moved, torch_us):7.1f} GB/s")
            del outs, lses, ro, rl, o, l
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="directory for records.jsonl and the tables (default: the store)")
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
    print(f"GPU: {gpu}, torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}", flush=True)
    t0 = time.time()
    records, failures = [], []
    print("== chunk attention (TFLOP/s)", flush=True)
    chunk_section(args.lengths, records, failures)
    if not args.no_sweep:
        print("== chunk tile sweep", flush=True)
        sweep_section(16384 if 16384 in args.lengths else args.lengths[0], records)
    print("== merge (GB/s)", flush=True)
    merge_section(args.lengths, records, failures)
    scores = local_backend_scores(records)
    best = max(scores, key=scores.get)
    print(f"local backends, geometric-mean TFLOP/s: {scores} -> {best} "
          f"(kv heads expanded for: {list(attention_sdpa.kv_expanded_backends()) or 'none'})")
    publish(records, args.out, on_gpu=True)
    if args.write_thresholds and not failures:
        thresholds.write_chunk_backend(gpu, best)
        # The cost model of ring_attention's auto variant uses the local kernel's rate.
        thresholds.write_ring_costs(gpu, attention_tflops=scores[best])
        print(f"wrote chunk_backend[{gpu!r}] = {best!r} and its TFLOP/s to {thresholds.PATH}")
    print(f"finished in {time.time() - t0:.0f} s")
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
