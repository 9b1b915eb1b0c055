"""MoE dispatch + combine: shardkit's peer-memory kernels against the NCCL paths, in one run.

GPUs (one process per GPU; DeepSeek-V3 shapes: hidden 7168, 256 experts, top-8 uniform routing):
    torchrun --standalone --nproc-per-node=2 bench/moe_bench.py [--quick] [--tokens 1,32,...,4096]
    torchrun --standalone --nproc-per-node=2 bench/moe_bench.py --impls torch_symm_mem   # alone: see below
No GPU: the same code on a CPU world, Triton kernels in the interpreter (a functional run; the
numbers are the interpreter's, and nothing is written unless --out is given):
    python bench/moe_bench.py --cpu-world 2

Implementations (``impl`` in the records), each timed as one dispatch + one combine per call with
identity experts (the expert output of a row is the row) and bf16 rows:
  shardkit        MoeDispatcher (peer memory, graph mode): layout, counts exchange, dispatch and combine
                  kernels; "graph" = calls captured in a CUDA graph, "eager" = launched one by one
  shardkit_fp8    the same with fp8 (e4m3 + per-128-channel scales) dispatch
  nccl            count exchange (all_to_all_single), counts read on the host, one row per (token,
                  expert) out and back with all_to_all_single, weighted index_add_ at the source (no dedup)
  nccl_dedup      the same with one row per (token, destination rank): the top-k weights travel with
                  the rows, the receiver reduces its local experts (for identity experts: the row times
                  the sum of its local weights) and returns one row, the source sums them
  shardkit_nccl   MoeDispatcher(transport="nccl"): shardkit's fallback path (same dedup, exact mode)
  torch_symm_mem  torch.ops.symm_mem.all_to_all_vdev (NVSHMEM) with the dedup rows out and back, no
                  host sync; the source applies the rank's weight sum (what identity experts reduce
                  to). Needs torch with NVSHMEM, and symmetric memory's backend can be chosen only
                  before the first allocation: run it alone (--impls torch_symm_mem).
shardkit's combine reads its expert outputs (one row per (token, local expert), computed once before
timing: the routing stays fixed) while the NCCL baselines' receivers only scale a row: a slight
advantage to the baselines. Every implementation's output is checked against a float64 reference
before it is timed (a wrong answer is recorded as an error, not a time). Times: CUDA events around
``iters`` calls, median of ``reps`` repetitions, max over ranks. Records go to the store
(bench/results/records.jsonl, or --out DIR/records.jsonl) with bench "moe_dispatch_combine" and
params tokens/hidden/experts/topk; metrics: remote bytes per direction, GB/s over them, copies per
token, speedups, the launch grid (``grid``, MoeLaunchConfig.short()). A markdown table is printed
and written beside the records (moe_<card>_x<world>.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import environment, header_lines, max_over_ranks, run_distributed, time_cuda, time_host  # noqa: E402
from bench.records import STORE, append, current_commit, record  # noqa: E402

BENCH = "moe_dispatch_combine"
IMPLS = ("shardkit", "shardkit_fp8", "nccl", "nccl_dedup", "shardkit_nccl", "torch_symm_mem")
DEFAULT_IMPLS = "shardkit,shardkit_fp8,nccl,nccl_dedup,shardkit_nccl"
TOKENS = "1,32,128,512,1024,2048,4096"
QUICK_TOKENS = "1,128,1024,4096"
Round = Callable[[], torch.Tensor]


def routing(tokens: int, experts: int, topk: int, device: torch.device, seed: int):
    """x [T, hidden] is drawn by the caller; top-k of uniform scores (distinct experts), softmax weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.rand(tokens, experts, generator=gen, device=device).topk(topk, dim=1).indices
    weights = torch.softmax(torch.randn(tokens, topk, generator=gen, device=device), dim=1)
    return idx, weights


def reference(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Identity experts, every slot valid: out[t] = sum_k w[t, k] * x[t] (float64)."""
    return weights.double().sum(1, keepdim=True) * x.double()


# ---------------------------------------------------------------- the implementations

def all_to_all_rows(out: torch.Tensor, rows: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
    """``all_to_all_single`` of [n, hidden] rows; as bytes on gloo (CPU worlds), which has no bf16."""
    if dist.get_backend() == "gloo":
        out, rows = out.view(torch.uint8), rows.contiguous().view(torch.uint8)
    dist.all_to_all_single(out, rows, out_splits, in_splits)


def shardkit_round(disp, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> Round:
    """One dispatch + combine on ``disp``; the identity experts' outputs (the received rows in
    expert-major order, dequantised for fp8) are computed once, for the fixed routing."""
    recv_x, handle = disp.dispatch(x, idx, weights)
    rows = handle.expert_major(recv_x)
    expert_out = torch.zeros(disp.expert_capacity, x.shape[1], dtype=x.dtype, device=x.device)
    expert_out[:rows.shape[0]] = rows
    out = torch.empty_like(x)
    disp.combine(expert_out, handle, out=out)

    def run() -> torch.Tensor:
        _, h = disp.dispatch(x, idx, weights)
        return disp.combine(expert_out, h, out=out)
    return run


def nccl_round(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, expert_rank: torch.Tensor,
               world: int) -> Round:
    """No dedup: one row per (token, expert), counts exchanged and read on the host (as Megatron)."""
    tokens, k = idx.shape
    dest = expert_rank[idx].flatten()

    def run() -> torch.Tensor:
        order = torch.argsort(dest, stable=True)
        send = torch.bincount(dest, minlength=world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        send_l, recv_l = send.tolist(), recv.tolist()
        rows = x[order // k]
        got = x.new_empty(sum(recv_l), x.shape[1])
        all_to_all_rows(got, rows, recv_l, send_l)
        back = torch.empty_like(rows)  # identity experts: their outputs are the received rows
        all_to_all_rows(back, got, send_l, recv_l)
        out = torch.zeros(tokens, x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, order // k, back.float() * weights.flatten()[order, None])
        return out.to(x.dtype)
    return run


def nccl_dedup_round(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, expert_rank: torch.Tensor,
                     world: int) -> Round:
    """One row per (token, destination rank) with its top-k weights; the receiver returns one row."""
    dest = expert_rank[idx]
    ranks = torch.arange(world, device=x.device)

    def run() -> torch.Tensor:
        goes = (dest[:, :, None] == ranks).any(1)                     # [T, W]
        pairs = goes.t().nonzero()                                    # by destination, then token
        to, tokens = pairs[:, 0], pairs[:, 1]
        send = goes.sum(0)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        send_l, recv_l = send.tolist(), recv.tolist()
        local_w = torch.where(dest[tokens] == to[:, None], weights[tokens], 0.0)
        got = x.new_empty(sum(recv_l), x.shape[1])
        all_to_all_rows(got, x[tokens], recv_l, send_l)
        got_w = local_w.new_empty(sum(recv_l), local_w.shape[1])
        dist.all_to_all_single(got_w, local_w, recv_l, send_l)
        reduced = (got_w.sum(1, keepdim=True) * got.float()).to(x.dtype)  # identity experts, local slots
        back = torch.empty(tokens.numel(), x.shape[1], dtype=x.dtype, device=x.device)
        all_to_all_rows(back, reduced, send_l, recv_l)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, tokens, back.float())
        return out.to(x.dtype)
    return run


def symm_mem_round(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, expert_rank: torch.Tensor,
                   world: int) -> Round:
    """torch.ops.symm_mem.all_to_all_vdev with the dedup rows out and back (splits on the device)."""
    import torch.distributed._symmetric_memory as symm_mem

    group = dist.group.WORLD.group_name
    tokens, hidden = x.shape
    dest = expert_rank[idx]
    goes = (dest[:, :, None] == torch.arange(world, device=x.device)).any(1)  # [T, W]
    rank_w = torch.stack([torch.where(dest == r, weights, 0.0).sum(1) for r in range(world)], 1)  # [T, W]
    cap = tokens * world * hidden
    inp, out = symm_mem.empty(cap, dtype=x.dtype, device=x.device), symm_mem.empty(cap, dtype=x.dtype, device=x.device)
    in_splits = symm_mem.empty(world, dtype=torch.int64, device=x.device)
    splits_offsets = symm_mem.empty(2, world, dtype=torch.int64, device=x.device)
    back_splits = symm_mem.empty(world, dtype=torch.int64, device=x.device)
    back_offsets = symm_mem.empty(2, world, dtype=torch.int64, device=x.device)
    for t in (inp, out, in_splits, splits_offsets, back_splits, back_offsets):
        symm_mem.rendezvous(t, group)
    # Sync-free packing: (rank, token) pairs that travel first, by rank then token.
    keys = torch.where(goes.t(), torch.arange(world * tokens, device=x.device).view(world, tokens), world * tokens)
    order = torch.sort(keys.flatten()).values.clamp(max=world * tokens - 1)
    rows_token = order % tokens

    def run() -> torch.Tensor:
        in_splits.copy_(goes.sum(0) * hidden)
        inp.view(-1, hidden)[:world * tokens].copy_(x[rows_token])
        torch.ops.symm_mem.all_to_all_vdev(inp, out, in_splits, splits_offsets, group)
        back_splits.copy_(splits_offsets[0])
        torch.ops.symm_mem.all_to_all_vdev(out, inp, back_splits, back_offsets, group)
        sent = goes.t().flatten()[keys.flatten().argsort()]  # valid rows among the packed ones
        w = rank_w.t().flatten()[order] * sent
        total = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device)
        total.index_add_(0, rows_token, inp.view(-1, hidden)[:world * tokens].float() * w[:, None])
        return total.to(x.dtype)
    return run


# ---------------------------------------------------------------- the run

def bench_rank(args: argparse.Namespace) -> tuple[dict, list[dict]] | None:
    """Every token count and implementation on this rank; rank 0 returns (environment, records)."""
    from shardkit.collectives.moe import MoeDispatcher

    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = dist.get_backend() != "nccl"
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    env = environment()
    if rank == 0:
        print("\n".join(header_lines(env)), file=sys.stderr)
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"unknown --impls {unknown}; known: {IMPLS}")
    if "torch_symm_mem" in impls:
        env["torch_symm_mem"] = symm_mem_setup(impls, cpu)
    expert_rank = (torch.arange(args.experts, device=device) * world // args.experts)
    commit = current_commit()

    def sync() -> None:
        dist.barrier()
        if not cpu:
            torch.cuda.synchronize()

    records = []
    for tokens in args.tokens:
        gen = torch.Generator(device=device).manual_seed(1000 + rank)
        x = torch.randn(tokens, args.hidden, generator=gen, device=device).to(torch.bfloat16)
        idx, weights = routing(tokens, args.experts, args.topk, device, 2000 + rank)
        ref = reference(x, weights)
        dest = expert_rank[idx]
        goes = (dest[:, :, None] == torch.arange(world, device=device)).any(1)
        remote_rows = int(goes.sum()) - int(goes[:, rank].sum())
        stats = torch.tensor([remote_rows, int(goes.sum()), tokens], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        for impl in impls:
            if impl == "torch_symm_mem" and env["torch_symm_mem"] != "ok":
                continue
            dispatcher = None
            try:
                if impl.startswith("shardkit"):
                    dispatcher = MoeDispatcher(num_experts=args.experts, hidden=args.hidden, dtype=torch.bfloat16,
                                               max_tokens=tokens, topk=args.topk, fp8=impl == "shardkit_fp8",
                                               mode="exact" if impl == "shardkit_nccl" else "graph",
                                               transport="nccl" if impl == "shardkit_nccl" else "peer")
                    fn = shardkit_round(dispatcher, x, idx, weights)
                else:
                    make = {"nccl": nccl_round, "nccl_dedup": nccl_dedup_round, "torch_symm_mem": symm_mem_round}[impl]
                    fn = make(x, idx, weights, expert_rank, world)
                error = check(fn(), ref, fp8=impl == "shardkit_fp8")
            except Exception as e:  # an implementation that cannot run here is reported, not fatal
                fn, error = None, f"{type(e).__name__}: {e}"
            bad = torch.tensor([error is not None], dtype=torch.int32, device=device)
            dist.all_reduce(bad)
            graphable = impl in ("shardkit", "shardkit_fp8", "torch_symm_mem") and not cpu
            for mode in (["graph", "eager"] if graphable else ["eager"]):
                samples = None
                if not bad.item():
                    samples = (time_host(fn, args.iters, args.reps, sync) if cpu
                               else time_cuda(fn, args.iters, args.reps, mode == "graph", sync))
                    samples = max_over_ranks(samples, device)
                row_bytes = args.hidden + 4 * -(-args.hidden // 128) if impl == "shardkit_fp8" else 2 * args.hidden
                metrics = {"remote_rows": int(stats[0]), "copies_per_token": round(float(stats[1]) / max(tokens, 1), 3)}
                if dispatcher is not None and dispatcher.launch_config is not None:
                    metrics["grid"] = dispatcher.launch_config.short()  # the MoeLaunchConfig measured
                if samples:
                    moved = stats[0].item() * (row_bytes + 2 * args.hidden)  # dispatch + combine, busiest rank
                    metrics["remote_gbps"] = round(moved / (statistics.median(samples) * 1e-6) / 1e9, 1)
                if bad.item():
                    metrics["error"] = error or "wrong result on another rank"
                records.append(record(BENCH, impl, gpu=env["gpu"], world=world, dtype="bfloat16",
                                      mode="cpu" if cpu else mode, us=samples, metrics=metrics, commit=commit,
                                      params={"tokens": tokens, "hidden": args.hidden, "experts": args.experts,
                                              "topk": args.topk}))
            if dispatcher is not None:
                dispatcher.close()
            sync()
    return (env, records) if rank == 0 else None


def symm_mem_setup(impls: list[str], cpu: bool) -> str:
    """Select NVSHMEM for torch's symmetric memory; 'ok' or why torch_symm_mem cannot run."""
    if cpu:
        return "no GPUs"
    if impls != ["torch_symm_mem"]:
        return "run it alone (--impls torch_symm_mem): the symmetric-memory backend is fixed at the first allocation"
    try:
        import torch.distributed._symmetric_memory as symm_mem
        if not symm_mem.is_nvshmem_available():
            return "this torch has no NVSHMEM"
        torch.ops.symm_mem.all_to_all_vdev  # noqa: B018 (probe)
        symm_mem.set_backend("NVSHMEM")
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def check(got: torch.Tensor, ref: torch.Tensor, fp8: bool) -> str | None:
    """An error text when the output is off the float64 reference by more than the dtype allows."""
    rel = ((got.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item() if ref.numel() else 0.0
    limit = 6e-2 if fp8 else 1e-2
    return None if rel <= limit else f"wrong result: relative error {rel:.3g}"


def add_speedups(records: list[dict]) -> None:
    """speedup_vs_<baseline> (baseline time / this time, same tokens, baseline's eager time)."""
    base = {(r["impl"], r["params"]["tokens"]): r["us_median"] for r in records
            if r["impl"] in ("nccl", "nccl_dedup") and r["us_median"]}
    for r in records:
        for b in ("nccl", "nccl_dedup"):
            t = base.get((b, r["params"]["tokens"]))
            if t and r["us_median"] and r["impl"] != b:
                r.setdefault("metrics", {})[f"speedup_vs_{b}"] = round(t / r["us_median"], 2)


def markdown(env: dict, records: list[dict], world: int, functional: bool) -> str:
    p = records[0]["params"] if records else {}
    lines = [f"# MoE dispatch + combine: {env['gpu']}, {world} ranks, bf16, hidden {p.get('hidden')}, "
             f"{p.get('experts')} experts, top-{p.get('topk')} uniform", ""]
    if functional:
        lines += ["**Functional run**: Triton kernels in the CPU interpreter; the times say nothing about GPUs.", ""]
    lines += ["```"] + header_lines(env) + ["```", "",
              "Median µs per dispatch + combine, max over ranks (commit " + (records[0]["commit"] if records else "-")
              + "). In brackets: GB/s over the busiest rank's remote bytes (dispatch + combine, deduplicated rows), "
              "and the speedup over nccl_dedup.", ""]
    if "torch_symm_mem" in env:
        lines += [f"torch_symm_mem: {env['torch_symm_mem']}", ""]
    columns = list(dict.fromkeys((r["impl"], r["mode"]) for r in records))
    lines += ["| tokens/rank | copies/token | " + " | ".join(f"{i} {m}" for i, m in columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    for tokens in dict.fromkeys(r["params"]["tokens"] for r in records):
        cells, copies = [], "-"
        for impl, mode in columns:
            r = next((r for r in records
                      if (r["impl"], r["mode"], r["params"]["tokens"]) == (impl, mode, tokens)), None)
            m = (r or {}).get("metrics", {})
            copies = m.get("copies_per_token", copies)
            if r is None:
                cells.append("-")
            elif m.get("error"):
                cells.append(f"ERROR: {m['error'][:80]}")
            else:
                extra = [f"{m['remote_gbps']} GB/s"] if "remote_gbps" in m else []
                if "speedup_vs_nccl_dedup" in m:
                    extra.append(f"{m['speedup_vs_nccl_dedup']}x")
                cells.append(f"{r['us_median']:.1f}" + (f" ({', '.join(extra)})" if extra else ""))
        lines.append(f"| {tokens} | {copies} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace, env: dict, records: list[dict], world: int, functional: bool) -> None:
    add_speedups(records)
    text = markdown(env, records, world, functional)
    print(text)
    path = os.path.join(args.out, "records.jsonl") if args.out else (None if functional else STORE)
    if path is None:
        print("functional CPU run: no records written (--out DIR keeps them in DIR/records.jsonl)")
        return
    n = append(records, path)
    card = env["gpu"].replace("NVIDIA ", "").split(" (")[0].replace(" ", "-")
    table = os.path.join(os.path.dirname(path), f"moe_{card}_x{world}.md")
    with open(table, "w") as f:
        f.write(text)
    print(f"appended {n} records to {path}; wrote {table}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default=None, help=f"tokens per rank, comma-separated (default {TOKENS}; "
                                                  f"--quick {QUICK_TOKENS}; CPU 1,7)")
    p.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS}, fewer calls (fits ~2 min on 2xH200)")
    p.add_argument("--hidden", type=int, default=None, help="default 7168 (CPU 256)")
    p.add_argument("--experts", type=int, default=None, help="default 256 (CPU 8)")
    p.add_argument("--topk", type=int, default=None, help="default 8 (CPU 2)")
    p.add_argument("--impls", default=DEFAULT_IMPLS, help=f"comma-separated, of {IMPLS}")
    p.add_argument("--iters", type=int, default=None, help="calls per repetition (default 20, --quick 10; CPU 2)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5, --quick 3; CPU 2)")
    p.add_argument("--out", default=None, help="directory for records.jsonl and the table (default: the store on "
                                               "GPUs, nothing on CPU)")
    p.add_argument("--cpu-world", type=int, default=0, help="no GPUs: run a CPU world of this many processes")
    args = p.parse_args()
    cpu = args.cpu_world > 0
    tokens = args.tokens or ("1,7" if cpu else QUICK_TOKENS if args.quick else TOKENS)
    args.tokens = [int(t) for t in tokens.split(",")]
    args.hidden = args.hidden or (256 if cpu else 7168)
    args.experts = args.experts or (8 if cpu else 256)
    args.topk = args.topk or (2 if cpu else 8)
    args.iters = args.iters or (2 if cpu else 10 if args.quick else 20)
    args.reps = args.reps or (2 if cpu else 3 if args.quick else 5)
    run_distributed(bench_rank, args, report)


if __name__ == "__main__":
    main()
