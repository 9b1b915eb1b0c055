"""Tensor-parallel decode latency: a Llama-70B-shaped block on W GPUs (TP=W) with every kind of sync
point, with and without Sync-Point Drop, on NVLink and on a slow link; and the real small model end to end.

One command for the whole study on all GPUs of the machine (< 3 minutes on 2xH200):
    python bench/tp_block_bench.py --session [--out DIR] [other options, passed on]
which runs, one after the other (W = torch.cuda.device_count()):
    torchrun --standalone --nproc-per-node=W bench/tp_block_bench.py            # NVLink: block + model
    NCCL_P2P_DISABLE=1 torchrun ... bench/tp_block_bench.py --slow-link         # host-memory NCCL: block
The model part needs --model-dir (default ../shared/models/tiny-llama-pycode); where it is missing,
only the block is measured (a device machine gets the checkpoint only if it is carried there).
No GPU: a functional run of the same code on a CPU world (tiny shapes, Triton kernels in the
interpreter; the times say nothing about GPUs):
    python bench/tp_block_bench.py --cpu-world 2 --smoke      # or 4, 8

Block (``--what block``): hidden 8192, 64 query / 8 KV heads (head dim 128), FFN 28672, split over W ranks
(TP=2: 32 query and 4 KV heads, FFN 14336 per rank; TP=8: 8 query heads, 1 KV head, FFN 3584), bf16, random weights, one decode token per sequence at position
``context - 1`` (KV cache of ``context`` = 4096 positions, all visible: SDPA without a mask, as a
kernel that knows the sequence lengths runs), batch 1, 8, 32. The block is
``shardkit.models.TPLlama``'s own (fused q/k/v and gate/up GEMMs, SDPA on the cache), replayed from a
CUDA graph of ``--iters`` blocks; µs per block, median of ``--reps``, max over ranks. Variants:
  none        no all-reduce: local add + RMSNorm (the compute alone; not a correct model)
  none_spd    the same for the SPD block (its compute alone)
  nccl        dist.all_reduce + torch add + F.rms_norm at both sync points
  shardkit    shardkit all_reduce_ (auto) + torch add + F.rms_norm
  fused       shardkit all_reduce_residual_rmsnorm (auto) at both sync points
  nccl_spd    SPD: the attention sync dropped, one NCCL sync of attention partial + FFN output
  fused_spd   SPD with the fused kernels: local add + RMSNorm kernel, one fused sync point
Slow link (``--slow-link``, run under NCCL_P2P_DISABLE=1, so NCCL moves data through host memory as
on PCIe servers without P2P): the same block; shardkit's variants use the Communicator's NCCL
fallback (``algo="nccl"``: what ``algo="auto"`` does on a group without peer access; here the GPUs
still have NVLink peer access, so the bench forces it), i.e. NCCL + add + RMSNorm inside the op.
Every variant's output is checked (bf16 tolerance) against the NCCL variant of the same block kind
before it is timed.

Model (``--what model``): tiny-llama-pycode (--model-dir) in bf16, prompt of 32 tokens, ``--new-tokens``
greedy tokens decoded by CUDA-graph replays; tokens/s of the decode for TP=W (``tp<W>_fused``: fused sync
points, ``tp<W>_nccl``: NCCL sync points, ``tp<W>_fused_spd``: fused + SPD on every block) against one GPU
(rank 0 alone, local add + RMSNorm), batch 1 and 8, and how many generated tokens equal the TP=W fused
model's.

Records: bench "tp_block" (params batch, context, link) and "tp_model" (params batch, new_tokens,
variant) in the store (or ``--out DIR``/records.jsonl); tables in bench/results (or DIR):
tp_block_<card>_x<W>.md (NVLink) and tp_block_<card>_x<W>_slowlink.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import records as store  # noqa: E402
from bench.common import environment, header_lines, max_over_ranks, run_distributed, time_cuda, time_host  # noqa: E402

BLOCK_VARIANTS = ("none", "none_spd", "nccl", "shardkit", "fused", "nccl_spd", "fused_spd")
SLOW_VARIANTS = ("none", "none_spd", "nccl", "fused", "nccl_spd", "fused_spd")
DEFAULT_MODEL = os.path.join(ROOT, "..", "shared", "models", "tiny-llama-pycode")
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def block_config(args: argparse.Namespace):
    from shardkit.models import LlamaConfig

    if args.smoke:  # CPU: the same structure, tiny
        return LlamaConfig(vocab_size=16, hidden_size=96, intermediate_size=128, num_layers=1, num_heads=8,
                           num_kv_heads=4, head_dim=12, rms_norm_eps=1e-5, rope_theta=10000.0,
                           max_position_embeddings=args.context, tie_word_embeddings=True)
    return LlamaConfig(vocab_size=16, hidden_size=8192, intermediate_size=28672, num_layers=1, num_heads=64,
                       num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=args.context, tie_word_embeddings=True)


def random_shard(config, rank: int, world: int, device: torch.device, dtype: torch.dtype):
    """This rank's shard of one random block, made directly at the local shapes (a full 70B block would
    not fit the host's patience); weights ~ N(0, 1/fan_in) so activations stay of order 1."""
    from shardkit.models.llama_tp import RankLayer, RankShard, contiguous_head_groups, local_kv_heads

    gen = torch.Generator(device).manual_seed(1234 + rank)
    h, hd, f = config.hidden_size, config.head_dim, config.intermediate_size // world

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) / shape[-1] ** 0.5).to(dtype)

    norm_gen = torch.Generator(device).manual_seed(99)  # replicated tensors: the same on every rank
    norm = (1 + 0.1 * torch.randn(h, generator=norm_gen, device=device)).to(dtype)
    heads = contiguous_head_groups(config, world)[0][rank]
    kv = local_kv_heads(config, heads)
    layer = RankLayer(heads=heads, kv_heads=kv, qkv=w((len(heads) + 2 * len(kv)) * hd, h), o=w(h, len(heads) * hd),
                      gate_up=w(2 * f, h), down=w(h, f), input_norm=norm, post_norm=norm.clone(), lead=rank == 0)
    embed = torch.randn(config.vocab_size, h, generator=norm_gen, device=device).to(dtype)
    return RankShard(rank, world, embed, norm, embed, [layer])


def make_sync(name: str, comm, slow_link: bool):
    from shardkit.models import FusedSync, LocalSync, UnfusedSync

    kind = name.removesuffix("_spd")
    fallback = "nccl" if slow_link else "auto"  # no peer memory on a slow link: the Communicator's NCCL path
    return {"none": lambda: LocalSync(), "nccl": lambda: UnfusedSync("nccl"),
            "shardkit": lambda: UnfusedSync("shardkit", comm=comm, algo=fallback),
            "fused": lambda: FusedSync(comm, fallback)}[kind]()


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def bench_block(args: argparse.Namespace, env: dict, comm, device: torch.device, timer) -> list[dict]:
    from shardkit.models import TPLlama

    rank, world = dist.get_rank(), dist.get_world_size()
    config = block_config(args)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shard = random_shard(config, rank, world, device, dtype)
    link = "p2p_disabled" if args.slow_link else ("cpu" if args.smoke else "nvlink")
    variants = SLOW_VARIANTS if args.slow_link else BLOCK_VARIANTS
    records = []
    for batch in args.batches:
        model = TPLlama(config, shard, make_sync("none", comm, args.slow_link), device=device, dtype=dtype,
                        max_batch=batch, max_seq=args.context)
        gen = torch.Generator(device).manual_seed(7 + batch)  # same on every rank: replicated activations
        for cache in model.k_cache + model.v_cache:  # a filled cache of `context` positions (this rank's heads)
            cache.normal_(generator=torch.Generator(device).manual_seed(rank * 1000 + batch))
        residual = torch.randn(batch, 1, config.hidden_size, generator=gen, device=device).to(dtype)
        x = torch.nn.functional.rms_norm(residual, (config.hidden_size,), shard.layers[0].input_norm, 1e-5)
        pos = torch.full((1,), args.context - 1, dtype=torch.long, device=device)
        outputs = {}
        for name in variants:
            model.sync = make_sync(name, comm, args.slow_link)
            model.set_spd([name.endswith("_spd")])

            def step() -> tuple[torch.Tensor, torch.Tensor]:
                return model.run_block(0, x, residual, pos, args.context)

            outputs[name] = [t.clone() for t in step()]
            ref = outputs.get("nccl_spd" if name.endswith("_spd") else "nccl")
            error = None
            if ref is not None and not name.startswith("none"):
                err = max(relative_error(a, b) for a, b in zip(outputs[name], ref))
                if not err <= 2e-2:
                    error = f"differs from the NCCL block by {err:.3g} (relative)"
            bad = torch.tensor([error is not None], dtype=torch.int32, device=device)
            dist.all_reduce(bad)
            samples = None if bad.item() else max_over_ranks(timer(step), device)
            records.append(store.record("tp_block", name, gpu=env["gpu"], world=world, dtype=dtype,
                                        mode="cpu" if args.smoke else "graph",
                                        params={"batch": batch, "context": args.context, "hidden": config.hidden_size,
                                                "ffn": config.intermediate_size, "heads": config.num_heads,
                                                "kv_heads": config.num_kv_heads, "link": link,
                                                "spd": name.endswith("_spd")},
                                        us=samples, error=None if samples else error or "wrong result on another rank"))
            if rank == 0:
                print(f"block batch {batch:3d} {name:10s} {link}: "
                      + (f"{records[-1]['us_median']:.1f} us" if samples else records[-1]["error"]), flush=True)
    return records


def bench_model(args: argparse.Namespace, env: dict, comm, device: torch.device) -> list[dict]:
    """Decode tokens/s of the real model: TP=world variants, then rank 0 alone (one GPU)."""
    from shardkit.models import FusedSync, LocalSync, TPLlama, UnfusedSync, load_llama, shard_llama

    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config, weights = load_llama(args.model_dir, dtype)
    if args.smoke:
        config = dataclasses.replace(config, num_layers=1)
        weights = dataclasses.replace(weights, layers=weights.layers[:1])
    prompt_len, new = (4, 3) if args.smoke else (32, args.new_tokens)
    gen = torch.Generator().manual_seed(5)
    records, reference = [], {}
    tp = f"tp{world}"
    cases = [(f"{tp}_fused", lambda: FusedSync(comm), False), (f"{tp}_nccl", lambda: UnfusedSync("nccl"), False),
             (f"{tp}_fused_spd", lambda: FusedSync(comm), True), ("one_gpu", LocalSync, False)]
    for batch in args.model_batches:
        prompt = torch.randint(1, config.vocab_size, (batch, prompt_len), generator=gen).to(device)
        for name, make, spd in cases:
            alone = name == "one_gpu"
            us_per_token, tokens = None, None
            if not alone or rank == 0:
                shard = shard_llama(config, weights, 0 if alone else rank, 1 if alone else world)
                model = TPLlama(config, shard, make(), device=device, dtype=dtype, spd=[spd] * config.num_layers,
                                max_batch=batch, max_seq=prompt_len + new)
                tokens, us_per_token = decode_timing(model, prompt, new, graph=not args.smoke, together=not alone)
                del model
            dist.barrier()
            if alone and rank != 0:
                continue
            if name == f"{tp}_fused" and rank == 0:
                reference[batch] = tokens
            same = None if reference.get(batch) is None else (tokens == reference[batch]).float().mean().item()
            if rank == 0:
                records.append(store.record(
                    "tp_model", name, gpu=env["gpu"], world=1 if alone else world, dtype=dtype,
                    mode="cpu" if args.smoke else "graph",
                    params={"model": "tiny-llama-pycode", "batch": batch, "prompt": prompt_len, "new_tokens": new,
                            "spd_blocks": config.num_layers if spd else 0},
                    us=us_per_token, metrics={"tokens_per_s": batch * 1e6 / statistics.median(us_per_token),
                                              f"same_tokens_as_{tp}_fused": same}))
                print(f"model batch {batch} {name:14s}: {records[-1]['us_median']:.1f} us/step, "
                      f"{records[-1]['metrics']['tokens_per_s']:.0f} tokens/s", flush=True)
    return records


def decode_timing(model, prompt: torch.Tensor, new: int, graph: bool,
                  together: bool) -> tuple[torch.Tensor, list[float]]:
    """Greedy tokens [B, new] and µs per decode step (repetitions of the whole decode; CUDA events
    around the graph replays after the prefill); ``together``: all ranks run it (line them up first)."""
    if not graph:
        t0 = time.perf_counter()
        tokens = model.generate(prompt, new)
        return tokens.cpu(), [(time.perf_counter() - t0) * 1e6 / new]
    times = []
    for _ in range(3):
        tokens = model.generate(prompt, new, graph=True)  # captures on first use, then re-prefills
        dec = model.decode_graph(prompt.shape[0])
        dec.tokens.copy_(tokens[:, 0])
        dec.pos.fill_(prompt.shape[1])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if together:
            dist.barrier()
        torch.cuda.synchronize()
        start.record()
        for _ in range(new - 1):
            dec.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (new - 1))
    return tokens.cpu(), times


def rank_main(args: argparse.Namespace):
    from shardkit import Communicator

    rank = dist.get_rank()
    cpu = dist.get_backend() != "nccl"
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    env = environment()
    if rank == 0:
        print("\n".join(header_lines(env)), file=sys.stderr)
    comm = Communicator()

    def sync() -> None:
        dist.barrier()
        if not cpu:
            torch.cuda.synchronize()

    def timer(fn):
        if cpu:
            return time_host(fn, args.iters, args.reps, sync)
        return time_cuda(fn, args.iters, args.reps, True, sync)

    records = []
    with torch.no_grad():
        if args.what in ("block", "all"):
            records += bench_block(args, env, comm, device, timer)
        if args.what in ("model", "all") and not args.slow_link:
            records += bench_model(args, env, comm, device)
    comm.check()
    comm.close()
    return (env, records) if rank == 0 else None


# ---------------------------------------------------------------------------------------------- tables
def block_table(recs: list[dict]) -> list[str]:
    by = {(r["params"]["link"], r["params"]["batch"], r["impl"]): r for r in recs}
    lines = []
    for link in dict.fromkeys(r["params"]["link"] for r in recs):
        names = [n for n in BLOCK_VARIANTS if any(k[0] == link and k[2] == n for k in by)]
        lines += ["", f"### link: {link}", "",
                  "| batch | " + " | ".join(names) + " | comm fused | comm fused+SPD | SPD saves |",
                  "|---|" + "---|" * (len(names) + 3)]
        for batch in sorted({k[1] for k in by if k[0] == link}):
            t = {n: by.get((link, batch, n), {}).get("us_median") for n in names}
            cells = [f"{t[n]:.1f}" if t[n] is not None else "error" for n in names]
            fused, spd = t.get("fused"), t.get("fused_spd")
            base, base_spd = t.get("none"), t.get("none_spd")
            comm = None if None in (fused, base) else fused - base
            comm_spd = None if None in (spd, base_spd) else spd - base_spd
            saves = f"{100 * (1 - comm_spd / comm):.0f}%" if comm and comm > 0 and comm_spd is not None else "-"
            lines.append(f"| {batch} | " + " | ".join(cells) + f" | {comm:.1f} | {comm_spd:.1f} | {saves} |"
                         if comm is not None and comm_spd is not None else
                         f"| {batch} | " + " | ".join(cells) + " | - | - | - |")
    return lines


def model_table(recs: list[dict], world: int) -> list[str]:
    lines = ["", f"| batch | variant | µs per decode step | tokens/s | vs one GPU | tokens equal to TP={world} fused |",
             "|---|---|---|---|---|---|"]
    one = {r["params"]["batch"]: r["us_median"] for r in recs if r["impl"] == "one_gpu"}
    for r in recs:
        b = r["params"]["batch"]
        same = r["metrics"].get(f"same_tokens_as_tp{world}_fused")
        lines.append(f"| {b} | {r['impl']} | {r['us_median']:.1f} | {r['metrics']['tokens_per_s']:.0f} | "
                     f"{one[b] / r['us_median']:.2f}x | " + ("-" if same is None else f"{100 * same:.0f}%") + " |")
    return lines


def report(args: argparse.Namespace, env: dict, records: list[dict], world: int, functional: bool) -> None:
    from bench.report import card

    blocks = [r for r in records if r["bench"] == "tp_block"]
    models = [r for r in records if r["bench"] == "tp_model"]
    head = [f"# Tensor-parallel decode: {env['gpu']} x{world}, commit {records[0]['commit']}, run {records[0]['run']}",
            "", *header_lines(env), ""]
    text = []
    if blocks:
        p = blocks[0]["params"]
        text += [f"## Llama-70B-shaped block, TP={world}, {blocks[0]['dtype']}, CUDA graph "
                 "(µs per block, median, max over ranks)", "",
                 f"hidden {p['hidden']}, {p['heads']} q / {p['kv_heads']} kv heads, FFN {p['ffn']}, KV context "
                 f"{p['context']}, one decode token per sequence. comm = variant - its compute alone (none / none_spd); "
                 "SPD saves = share of the fused block's communication time that SPD removes."]
        text += block_table(blocks)
    if models:
        text += ["", f"## tiny-llama-pycode end to end, TP={world}, {models[0]['dtype']}, CUDA-graph decode"] + \
            model_table(models, world)
    print("\n".join(head + text))
    if functional:
        print("Functional CPU run: interpreter times, nothing written unless --out.")
    path = store.destination(args.out, on_gpu=not functional)
    if path is None:
        return
    store.append(records, path)
    out_dir = os.path.dirname(path)
    suffix = "_slowlink" if args.slow_link else ""
    stem = os.path.join(out_dir, f"tp_block_{card(env['gpu'])}_x{world}{suffix}.md")
    with open(stem, "w") as f:
        f.write("\n".join(head + text) + "\n")
    print(f"appended {len(records)} records to {path}; wrote {stem}")


def session(args: argparse.Namespace) -> None:
    """The whole study as subprocess torchrun runs on every GPU of the machine (NVLink, then slow
    link), each with this command's other options."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise SystemExit(f"--session needs 2 or more GPUs, this machine has {gpus}")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", __file__]
    extra = [a for a in sys.argv[1:] if a != "--session"]
    env = {**os.environ, **GPU_ENV}
    runs = [(base + extra, env), (base + extra + ["--slow-link"], {**env, "NCCL_P2P_DISABLE": "1"})]
    for cmd, run_env in runs:
        print("+", ("NCCL_P2P_DISABLE=1 " if "--slow-link" in cmd else "") + " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=run_env, check=True)
        print(f"(took {time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--session", action="store_true", help="run the NVLink and slow-link studies on all GPUs")
    p.add_argument("--what", choices=("all", "block", "model"), default="all")
    p.add_argument("--slow-link", action="store_true", help="run under NCCL_P2P_DISABLE=1: shardkit's NCCL fallback")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20, help="blocks per CUDA graph")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--model-dir", default=DEFAULT_MODEL)
    p.add_argument("--model-batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=None, help="records to DIR/records.jsonl and the table to DIR")
    p.add_argument("--cpu-world", type=int, default=0, help="no GPU: a functional run on this many CPU processes")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU functional runs)")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.model_batches = [int(b) for b in args.model_batches.split(",")]
    if args.smoke:
        args.context, args.iters, args.reps, args.batches, args.model_batches = 16, 1, 1, [1, 3], [1]
    if args.what == "all" and not os.path.isdir(args.model_dir):
        print(f"no model at --model-dir {args.model_dir}: the block only", file=sys.stderr)
        args.what = "block"
    if args.session:
        session(args)
        return
    if args.slow_link and os.environ.get("NCCL_P2P_DISABLE") != "1" and args.cpu_world == 0:
        raise SystemExit("--slow-link must run under NCCL_P2P_DISABLE=1 (or use --session)")
    run_distributed(rank_main, args, report)


if __name__ == "__main__":
    main()
