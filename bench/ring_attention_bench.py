#!/usr/bin/env python
"""Ring-attention benchmark: pass-KV scaling over GPUs, and pass-Q vs pass-KV across KV-cache miss rates.

Run on one node under torchrun (one process per GPU):

    torchrun --standalone --nproc-per-node=4 bench/ring_attention_bench.py

1. **Scaling** (causal prefill, bf16, B=1, 32 q heads / 8 kv heads, head dim 128, lengths
   ``--lengths``, default 32K and 128K): ``T1`` = ``attention_chunk`` over the full sequence on one
   GPU (every rank runs it on its own GPU at the same time; each repetition counts the fastest
   rank, the conservative choice for the efficiency), ``TW`` = pass-KV ``ring_attention`` on the
   load-balanced shards of ``W`` GPUs (``--worlds``, default 2 and all GPUs), each repetition the
   slowest rank; both with the same
   local kernel, for each of ``--local-backends`` (default: shardkit's Triton kernel and torch's
   flash / cuDNN kernels with the LSE, where this torch has them).
   Parallel efficiency = ``T1 / (W * TW)`` (issue 5 target: >= 85% at 128K on 4 GPUs).
   Checks: every rank's ring output against its shard of the single-GPU output, and (first
   length only) 64 rows per rank against an fp32 torch reference over the full sequence.
2. **Cache miss rates** (all GPUs, context ``--context`` tokens, default 128K): ``P`` cached +
   ``T`` new tokens with ``T / (T + P)`` in ``--miss-rates``; pass-KV and pass-Q timed on the same
   inputs (and checked against each other). The threshold that best separates the two
   (``best_threshold``) is what ``ring_attention(variant="auto")`` should switch at;
   ``--write-thresholds`` stores it per GPU and world size (shardkit/thresholds.json)
   and auto then uses it (Meta reports ~5% on their H100 hosts). Each row also says what Meta's
   cost model (``shardkit.collectives.attention.variant``) with this GPU's measured rates would pick.
3. **CP decode** (all GPUs, contexts ``--decode-contexts``, default 32K, 128K and the longest
   ``--lengths``; batches ``--decode-batches``, default 1 and 8): one query token per sequence
   against a KV cache in the load-balanced layout over the GPUs (``cp_decode_attention``: local
   ``attention_chunk`` + one all-gather of the partials + merge), against, on one GPU, the same
   local kernel over the whole cache (``single_gpu_decode``: speedup and efficiency
   ``T1 / (W * TW)``) and torch SDPA with the query heads of a KV head as its query rows
   (``torch_sdpa_decode``: what a one-GPU engine runs). Graph (``--decode-iters`` calls in one
   CUDA graph, the way decode runs) and eager; checked against each other first, and the first
   context against an fp32 torch reference.

The studies run in the order 2, 3, 1, so that a spent ``--budget-s`` cuts the longest scaling
lengths rather than the threshold fit.

Timing (1. and 2.): CUDA events around one call, group barrier before each repetition, median of
``--reps`` after one untimed warm-up (which also compiles the kernels). Eager only: a ring-attention
call reads its metadata on the host, so it is not CUDA-graph capturable. Each call is a full prefill
of one attention layer; nothing is overlapped across calls. The run stops starting new
measurements after ``--budget-s`` seconds (default 100) and keeps what it has; a run that fails
midway still stores the measurements made before. The records go to the store
(bench/results/records.jsonl, or ``--out DIR``/records.jsonl) with the table and plot
``ring_attention_<card>_x<world>.md``/``.png`` (bench/report.py).

``--smoke``: tiny shapes on CPU with gloo and the Triton interpreter, to check the script's logic
without a GPU (``torchrun --nproc-per-node=2 bench/ring_attention_bench.py --smoke``; records and
tables only with ``--out DIR``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import traceback

if "--smoke" in sys.argv:  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.common import best_cut, budget_spent, environment, header_lines, time_cuda, time_host  # noqa: E402
from bench.records import record  # noqa: E402
from bench.report import publish  # noqa: E402
from shardkit import thresholds  # noqa: E402
from shardkit.collectives.attention.cp_decode import cp_decode_attention  # noqa: E402
from shardkit.collectives.attention.ring import choose_variant, ring_attention  # noqa: E402
from shardkit.collectives.attention.variant import RingCosts, choose_variant_by_model  # noqa: E402
from shardkit.collectives.attention.sharding import shard, shard_positions  # noqa: E402
from shardkit.kernels.attention.chunk import attention_chunk  # noqa: E402
from shardkit.kernels.attention.sdpa import sdpa_backends, sdpa_with_lse  # noqa: E402
from shardkit.reference.attention import reference_attention  # noqa: E402

ATOL = RTOL = 3.2e-2  # 2 x tests/tolerances.py ATTENTION[bf16]: the ring rounds partials twice


def best_threshold(rows: list) -> float:
    """The pass-Q miss-rate threshold that one rule ("pass-Q below it") would best fit to a sweep of
    measured ``{"miss_rate", "pass_kv_ms", "pass_q_ms"}`` (``best_cut``): the midpoint of the two
    rates around the best cut (0 = never pass-Q, 1 = always below a miss rate of 1)."""
    rates, cut = best_cut(rows, "miss_rate", "pass_q_ms", "pass_kv_ms")
    if cut == 0:
        return 0.0
    if cut == len(rates):
        return 1.0
    return round((rates[cut - 1] + rates[cut]) / 2, 4)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.dev = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32  # interpreter: no bf16 dots
        self.heads = (args.q_heads, args.kv_heads, args.head_dim)
        self.env = environment()
        device_name = self.env.get("gpu", "cpu") if self.cuda else "cpu"
        self.pass_q_threshold = thresholds.pass_q_miss_rate(device_name, dist.get_world_size())
        rates = thresholds.ring_costs(device_name)
        self.costs = RingCosts(**rates) if rates is not None else None
        self.shape = {"q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim}
        self.records: list[dict] = []  # store records (rank 0's are the ones published)
        self.checks: list[dict] = []
        self.pass_q_fit: float | None = None
        # Sub-groups for the smaller worlds; new_group must be called by every rank.
        self.groups = {w: (dist.group.WORLD if w == self.world else dist.new_group(list(range(w))))
                       for w in args.worlds}

    # ------------------------------------------------------------------ plumbing

    def over_budget(self, what: str) -> bool:
        """Whether ``--budget-s`` is spent (rank 0 decides); then ``what`` is skipped."""
        spent = budget_spent(self.t0, self.args.budget_s, self.dev)
        if spent:
            self.log(f"  skipped (budget of {self.args.budget_s:g} s spent): {what}")
        return spent

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_us(self, fn, group, reduce=dist.ReduceOp.MAX) -> list[float]:
        """Microseconds of each of ``--reps`` calls of ``fn()`` after one warm-up call, each the
        slowest of the group's ranks (``reduce=MIN``: the fastest)."""
        fn()
        samples = []
        for _ in range(self.args.reps):
            dist.barrier(group=group)
            self.sync()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1e3)
            else:
                t = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t) * 1e6)
        t = torch.tensor(samples, dtype=torch.float64, device=self.dev)
        dist.all_reduce(t, op=reduce, group=group)
        return t.tolist()

    def record(self, impl: str, world: int, params: dict, samples: list[float], metrics: dict | None = None,
               mode: str = "eager") -> dict:
        self.records.append(record("ring_attention", impl, gpu=self.env["gpu"], world=world, dtype=self.dtype,
                                   mode=mode if self.cuda else "cpu", params={**params, **self.shape}, us=samples,
                                   metrics=metrics))
        return self.records[-1]

    def check(self, name: str, got: torch.Tensor, want: torch.Tensor, group=None) -> None:
        """Records the worst error over the group's ranks; a failed check fails the run (exit status 1)."""
        err = (got.float() - want.float()).abs()
        bad = (err > ATOL + RTOL * want.float().abs()) | torch.isnan(got.float())
        stats = torch.tensor([err.max().item() if err.numel() else 0.0, float(bad.sum().item())],
                             dtype=torch.float64, device=self.dev)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
        ok = stats[1].item() == 0
        self.checks.append({"name": name, "max_abs_err": stats[0].item(), "ok": ok})
        self.log(f"  check {name}: max |err| {stats[0].item():.2e} {'ok' if ok else 'FAILED'}")

    def rand(self, gen: torch.Generator, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=self.dev, dtype=torch.float32).to(self.dtype)

    # ------------------------------------------------------------------ 1. scaling

    def scaling(self) -> None:
        Hq, Hkv, D = self.heads
        for L in self.args.lengths:
            gen = torch.Generator(device=self.dev).manual_seed(L)  # same full sequence on every rank
            q, k, v = self.rand(gen, 1, Hq, L, D), self.rand(gen, 1, Hkv, L, D), self.rand(gen, 1, Hkv, L, D)
            flops = 4.0 * Hq * L * L * D / 2  # causal: half of the score matrix
            for backend in self.args.local_backends:
                if self.over_budget(f"scaling L={L} {backend}"):
                    return
                full = {}

                def single(backend=backend) -> None:  # T1: the same local kernel on the whole sequence
                    if backend == "triton":
                        full["out"], _ = attention_chunk(q, k, v, causal=True)
                    else:
                        full["out"], _ = sdpa_with_lse(q, k, v, causal=True, backend=backend)

                # The fastest GPU's T1: the lower T1, the lower (more conservative) the efficiency.
                case = {"study": "scaling", "seq_len": L, "local_backend": backend}
                single_us = self.time_us(single, dist.group.WORLD, reduce=dist.ReduceOp.MIN)
                t1 = statistics.median(single_us)
                self.record("single_gpu", 1, case, single_us, {"tflops": round(flops / t1 / 1e6, 1)})
                self.log(f"L={L} {backend}: 1 GPU {t1 / 1e3:.2f} ms ({flops / t1 / 1e6:.0f} TFLOP/s)")
                for w, group in self.groups.items():
                    if self.over_budget(f"scaling L={L} W={w} {backend}"):
                        break
                    if self.rank < w:
                        ql, kl, vl = (shard(t, self.rank, w) for t in (q, k, v))
                        out = {}

                        def ring(backend=backend) -> None:
                            out["o"] = ring_attention(ql, kl, vl, group, variant="pass_kv", causal=True,
                                                      local_backend=backend)

                        ring_us = self.time_us(ring, group)
                        self.check(f"ring L={L} W={w} {backend} vs 1-GPU kernel", out["o"],
                                   shard(full["out"], self.rank, w), group)
                        if L == self.args.lengths[0]:
                            self.reference_check(f"ring L={L} W={w} {backend} vs fp32 reference", q, k, v,
                                                 out["o"], w, group)
                        tw = statistics.median(ring_us)
                        self.record("ring_pass_kv", w, case, ring_us,
                                    {"efficiency": round(t1 / (w * tw), 4), "speedup": round(t1 / tw, 3),
                                     "tflops": round(flops / tw / 1e6, 1)})
                        self.log(f"  W={w}: pass-KV ring {tw / 1e3:.2f} ms, speedup {t1 / tw:.2f}x, "
                                 f"efficiency {100 * t1 / (w * tw):.1f}%")
                    dist.barrier()
                del full
            del q, k, v

    def reference_check(self, name, q, k, v, out, w, group) -> None:
        """64 rows of this rank's shard against an fp32 torch reference over the whole sequence."""
        pos = shard_positions(q.shape[2], self.rank, w, device=self.dev, dtype=torch.int64)
        rows = torch.linspace(0, pos.numel() - 1, min(64, pos.numel()), device=self.dev).long()
        ref, _ = reference_attention(q[:, :, pos[rows]], k, v, causal=True, q_pos=pos[rows], kv_pos=0,
                                     dtype=torch.float32)
        self.check(name, out[:, :, rows], ref, group)

    # ------------------------------------------------------------------ 2. cache miss rates

    def miss_rates(self) -> None:
        Hq, Hkv, D = self.heads
        N, W = self.args.context, self.world
        # At least 2 new tokens per rank; rates that round to the same T are measured once.
        sizes = sorted({min(N, max(2 * W, round(rate * N))) for rate in self.args.miss_rates})
        rows = []
        for T in sizes:
            if self.over_budget(f"miss rate {T / N:.4f}"):
                return
            P = N - T
            gen = torch.Generator(device=self.dev).manual_seed(1000 * self.rank + T)
            lt, lp = shard_positions(T, self.rank, W).numel(), shard_positions(P, self.rank, W).numel()
            q, k, v = self.rand(gen, 1, Hq, lt, D), self.rand(gen, 1, Hkv, lt, D), self.rand(gen, 1, Hkv, lt, D)
            kw = {"k_cache": self.rand(gen, 1, Hkv, lp, D), "v_cache": self.rand(gen, 1, Hkv, lp, D)} if P else {}
            case = {"study": "miss_rate", "context": N, "new_tokens": T, "cached_tokens": P,
                    "miss_rate": round(T / N, 6), "local_backend": "auto"}
            picks = {"auto_picks": choose_variant(T, P, pass_q_threshold=self.pass_q_threshold)}
            if self.costs is not None:  # what Meta's cost model would pick, for comparison
                picks["model_picks"] = choose_variant_by_model(T, P, W, Hq, Hkv, D, self.dtype.itemsize, self.costs)
            outs, row = {}, {"miss_rate": T / N}
            for variant in ("pass_kv", "pass_q"):
                def call(variant=variant) -> None:
                    outs[variant] = ring_attention(q, k, v, variant=variant, causal=True, **kw)

                rec = self.record(f"ring_{variant}", W, case, self.time_us(call, dist.group.WORLD), picks)
                row[f"{variant}_ms"] = rec["us_median"] / 1e3
            self.check(f"pass-Q vs pass-KV at miss rate {T / N:.4f}", outs["pass_q"], outs["pass_kv"])
            self.log(f"miss rate {100 * T / N:6.2f}% (T={T}, P={P}): pass-KV {row['pass_kv_ms']:.3f} ms, "
                     f"pass-Q {row['pass_q_ms']:.3f} ms")
            rows.append(row)
        if not rows:
            return
        crossover = next((r["miss_rate"] for r in rows if r["pass_kv_ms"] <= r["pass_q_ms"]), None)
        self.pass_q_fit = best_threshold(rows)
        self.log(f"first miss rate at which pass-KV is faster: {crossover}; best single threshold: "
                 f"{self.pass_q_fit}; auto's threshold in this run: {self.pass_q_threshold}")

    # ------------------------------------------------------------------ 3. CP decode

    def time_calls(self, fn, mode: str, reduce) -> list[float]:
        """Microseconds per call of ``fn``, ``--decode-iters`` calls per repetition (captured in one
        CUDA graph in mode "graph"), each of ``--reps`` repetitions reduced over the ranks (MAX: the
        slowest, MIN: the fastest)."""
        def sync() -> None:
            dist.barrier()
            self.sync()

        iters, reps = self.args.decode_iters, self.args.reps
        samples = time_cuda(fn, iters, reps, mode == "graph", sync) if self.cuda else time_host(fn, iters, reps, sync)
        t = torch.tensor(samples, dtype=torch.float64, device=self.dev)
        dist.all_reduce(t, op=reduce)
        return t.tolist()

    def decode(self) -> None:
        """CP decode against one GPU (the module docstring's study 3)."""
        Hq, Hkv, D = self.heads
        W = self.world
        for C in self.args.decode_contexts:
            for B in self.args.decode_batches:
                if self.over_budget(f"CP decode context {C} batch {B}"):
                    return
                gen = torch.Generator(device=self.dev).manual_seed(C + B)  # the same cache and query on every rank
                q, k, v = self.rand(gen, B, Hq, 1, D), self.rand(gen, B, Hkv, C, D), self.rand(gen, B, Hkv, C, D)
                kl, vl = shard(k, self.rank, W), shard(v, self.rank, W)
                outs = {}

                def single() -> None:  # every rank on its own GPU, the whole cache
                    outs["single_gpu_decode"], _ = attention_chunk(q, k, v)

                def torch_sdpa() -> None:  # a KV head's query heads as its query rows: no KV expansion
                    outs["torch_sdpa_decode"] = F.scaled_dot_product_attention(
                        q.view(B, Hkv, Hq // Hkv, D), k, v).view(B, Hq, 1, D)

                def cp() -> None:
                    outs["cp_decode"] = cp_decode_attention(q, kl, vl)

                calls = {"single_gpu_decode": single, "torch_sdpa_decode": torch_sdpa, "cp_decode": cp}
                for fn in calls.values():
                    fn()
                name = f"CP decode context {C} batch {B} W={W}"
                self.check(f"{name} vs 1-GPU kernel", outs["cp_decode"], outs["single_gpu_decode"])
                self.check(f"torch SDPA decode context {C} batch {B} vs 1-GPU kernel", outs["torch_sdpa_decode"],
                           outs["single_gpu_decode"])
                if C == self.args.decode_contexts[0]:
                    ref, _ = reference_attention(q, k, v, causal=False, dtype=torch.float32)
                    self.check(f"{name} vs fp32 reference", outs["cp_decode"], ref)
                case = {"study": "cp_decode", "context": C, "batch": B, "q_len": 1}
                kv_bytes = 2 * B * Hkv * C * D * self.dtype.itemsize
                for mode in ("graph", "eager") if self.cuda else ("cpu",):
                    t = {}
                    for impl, fn in calls.items():
                        one_gpu = impl != "cp_decode"  # the fastest rank's time, as T1 in the scaling study
                        samples = self.time_calls(fn, mode, dist.ReduceOp.MIN if one_gpu else dist.ReduceOp.MAX)
                        t[impl] = statistics.median(samples)
                        metrics = {"kv_gbps": round(kv_bytes / t[impl] / 1e3, 1)}
                        if not one_gpu:
                            t1 = t["single_gpu_decode"]
                            metrics.update(speedup=round(t1 / t[impl], 3), efficiency=round(t1 / (W * t[impl]), 4),
                                           speedup_vs_torch_sdpa=round(t["torch_sdpa_decode"] / t[impl], 3))
                        self.record(impl, 1 if one_gpu else W, case, samples, metrics, mode=mode)
                    self.log(f"CP decode {mode} context {C} batch {B}: 1 GPU {t['single_gpu_decode']:.1f} us "
                             f"(torch SDPA {t['torch_sdpa_decode']:.1f} us), W={W} {t['cp_decode']:.1f} us, "
                             f"speedup {t['single_gpu_decode'] / t['cp_decode']:.2f}x")
                del q, k, v, kl, vl, outs


def store_pass_q_threshold(b: Bench) -> None:
    """With --write-thresholds on GPUs: store the fitted pass-Q threshold, unless a check failed."""
    if b.args.write_thresholds and b.cuda and b.pass_q_fit is not None and all(c["ok"] for c in b.checks):
        thresholds.write_pass_q_miss_rate(b.env["gpu"], b.world, b.pass_q_fit)
        print(f"stored pass-Q threshold {b.pass_q_fit} for {b.env['gpu']} x{b.world}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="directory for records.jsonl and the tables "
                    "(default: the store on GPUs; nothing with --smoke)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="scaling: total tokens (default 32K 128K)")
    ap.add_argument("--worlds", type=int, nargs="+", default=None, help="scaling: GPU counts (default 2 and all)")
    ap.add_argument("--context", type=int, default=None, help="miss-rate sweep: P + T (default 128K)")
    ap.add_argument("--miss-rates", type=float, nargs="+",
                    default=[0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0])
    ap.add_argument("--decode-contexts", type=int, nargs="+", default=None,
                    help="CP decode: KV-cache tokens (default 32K, 128K and the longest --lengths); 0: none")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=None, help="CP decode: sequences (default 1 8)")
    ap.add_argument("--decode-iters", type=int, default=None, help="CP decode: calls per repetition (default 20)")
    ap.add_argument("--q-heads", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--local-backends", nargs="+", default=None,
                    help="scaling: local kernels to compare (default: triton and torch's SDPA kernels available)")
    ap.add_argument("--budget-s", type=float, default=100.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (gloo, Triton interpreter)")
    ap.add_argument("--write-thresholds", action="store_true",
                    help="store the measured pass-Q/pass-KV crossover for ring_attention(variant='auto')")
    args = ap.parse_args()
    small = args.smoke
    args.lengths = args.lengths or ([48, 96] if small else [32768, 131072])
    args.context = args.context or (64 if small else 131072)
    args.q_heads = args.q_heads or (2 if small else 32)
    args.kv_heads = args.kv_heads or (1 if small else 8)
    args.head_dim = args.head_dim or (16 if small else 128)
    args.reps = args.reps or (2 if small else 5)
    args.decode_contexts = [c for c in sorted(set(args.decode_contexts or ([37, 96] if small else
                                                                           [32768, 131072, max(args.lengths)])))
                            if c > 0]
    args.decode_batches = args.decode_batches or ([1, 2] if small else [1, 8])
    args.decode_iters = args.decode_iters or (2 if small else 20)
    dev = torch.device("cuda") if torch.cuda.is_available() and not small else torch.device("cpu")
    args.local_backends = args.local_backends or \
        ["triton"] + list(sdpa_backends(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32))

    cuda = torch.cuda.is_available() and not small
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # A short timeout: a rank that dies must not leave the others waiting for 10 minutes.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120),
                            **({"device_id": torch.device("cuda", torch.cuda.current_device())} if cuda else {}))
    world = dist.get_world_size()
    args.worlds = sorted({w for w in (args.worlds or [2, world]) if 1 <= w <= world})
    b = Bench(args)
    if b.rank == 0:
        print("\n".join(header_lines(b.env)), flush=True)
        print(f"world {world}, {b.dtype}, heads {args.q_heads}/{args.kv_heads}, head dim {args.head_dim}", flush=True)
    try:
        b.miss_rates()  # the cheap studies first: a spent --budget-s cuts the longest scaling lengths only
        b.decode()
        b.scaling()
    except Exception:
        print(f"rank {b.rank}: {traceback.format_exc()}", file=sys.stderr, flush=True)
        if b.rank == 0 and b.records:
            publish(b.records, args.out, on_gpu=b.cuda)  # what was measured before the failure
            store_pass_q_threshold(b)  # measured first: a later study's failure does not void it
        raise
    failed = [c["name"] for c in b.checks if not c["ok"]]
    if b.rank == 0:
        if b.records:
            publish(b.records, args.out, on_gpu=b.cuda)
        print(f"finished in {time.monotonic() - b.t0:.0f} s"
              + (f"; FAILED checks: {failed}" if failed else "; all checks ok"), flush=True)
        store_pass_q_threshold(b)
    dist.barrier()
    dist.destroy_process_group()
    if b.rank == 0 and failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
