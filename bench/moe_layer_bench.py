#!/usr/bin/env python
"""Expert-parallel MoE on 2 GPUs: a DeepSeek-shaped layer, EP=2 against one GPU; dispatch + combine
time of the studied placements on the real model's routing; static capacity vs dynamic gating;
the expert buffer at run time.

    torchrun --standalone --nproc-per-node=2 bench/moe_layer_bench.py            # 2 GPUs, < 3 min
    torchrun --standalone --nproc-per-node=2 bench/moe_layer_bench.py --smoke    # CPU, gloo, tiny shapes

1. ``moe_layer``: router (softmax top-8) + 256 SwiGLU experts (hidden 7168, expert FFN 2048,
   random bf16 weights, the same on both sides) for T tokens per rank. ``one_gpu``: one GPU runs
   the layer over W*T tokens with all 256 experts (``combine_local``: sort by expert, one
   ``torch._grouped_mm`` pair, weighted sum); ``ep_peer``: each rank runs its T tokens with its 128
   experts through shardkit's MoeDispatcher (peer memory, graph mode; ``EPMoE`` with grouped_mm);
   ``ep_nccl``: the same over ``all_to_all_single`` (exact mode, eager only). Graph mode: 10 layer
   calls captured in one CUDA graph and replayed; eager: launched one by one. Median of 5
   repetitions, max over ranks. Checked: EP output == one-GPU output on the same tokens (bf16).
2. ``moe_placement`` (GPU rows): dispatch + combine (identity experts) of the held-out routing of
   ``tiny-moe-pycode`` (bench/results/moe_replay.json, written by bench/moe_studies.py: 4096 tokens,
   sequence s on rank s mod 2) under each studied placement, rows of hidden 384 (the model) and
   7168 (bytes dominate); graph mode, mean over layers 0, 2, 4 (each with its own placement).
3. ``moe_gating`` (GPU rows): one GPU, the DeepSeek-shaped layer over 1024 / 8192 tokens: dynamic
   (exact counts, grouped_mm) against static capacity (padded [E, C, hidden] bmm) at 1.0 / 1.25 / 2.0.
5. ``moe_speculative`` (GPU rows): decode steps (8 sequences per rank after a 64-token prompt) of
   tiny-moe-pycode (the checkpoint from $SHARDKIT_MOE_MODEL or ../shared/models, else random weights
   of its shape) with EP=2 over NCCL all-to-all: ``SpeculativeEPMoE`` with the pre-gate prediction
   against the same code without speculation; eager; rows sent early / late.
4. ``moe_buffering`` (GPU rows): ``ExpertBuffer`` with 16 experts per layer of DeepSeek-V2-Lite's
   expert shape (hidden 2048, FFN 1408, bf16, pinned host copies), replaying the held-out routing
   (6 layers): decode of 8 sequences (48 steps) and prefill of 8 512-token chunks, a 2048^2 GEMM per
   layer standing in for attention: time per layer call for LIFO / LRU, 4 / 8 / 12 / 16 slots, with
   and without pre-gate prefetch on a side stream.

No new measurement starts after ``--budget-s`` (default 140 s). Records go to
bench/results/records.jsonl (or ``--out DIR``/records.jsonl); tables ``moe_<part>_<card>_x2.md`` beside them.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import statistics
import sys
import time
import traceback
import types

if "--smoke" in sys.argv:  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench import records as rec  # noqa: E402
from bench.common import budget_spent, environment, header_lines, time_cuda, time_host  # noqa: E402
from bench.report import card  # noqa: E402
from shardkit.collectives.moe import MoeDispatcher  # noqa: E402
from shardkit.models.moe import buffering, gating  # noqa: E402
from shardkit.models.moe.ep import EPMoE, VirtualExperts  # noqa: E402
from shardkit.models.moe.experts import has_grouped_mm  # noqa: E402
from shardkit.models.moe.mixtral import MixtralLayer, combine_local, route  # noqa: E402
from shardkit.models.moe.placement import Placement, contiguous  # noqa: E402

REPLAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "moe_replay.json")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0 = args, time.monotonic()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.dev = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.backend = "grouped_mm" if has_grouped_mm(self.dtype, self.dev) else "loop"
        self.env = environment()
        self.gpu = self.env["gpu"] if self.cuda else "cpu"
        self.mode_name = "graph" if self.cuda else "cpu"
        self.records: list[dict] = []
        self.failed: list[str] = []

    def over_budget(self, what: str) -> bool:
        """Whether ``--budget-s`` is spent (rank 0 decides); then ``what`` is skipped."""
        spent = budget_spent(self.t0, self.args.budget_s, self.dev)
        if spent:
            self.log(f"  skipped (budget of {self.args.budget_s:g} s spent): {what}")
        return spent

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def barrier(self) -> None:
        dist.barrier()

    def time_us(self, fn, graph: bool, over_ranks: bool = True, iters: int | None = None) -> list[float]:
        """Per-call microseconds of each repetition (max over ranks when ``over_ranks``)."""
        iters = iters or self.args.iters
        if self.cuda:
            us = time_cuda(fn, iters, self.args.reps, graph, self.barrier if over_ranks else (lambda: None))
        else:
            us = time_host(fn, 1, 2, self.barrier if over_ranks else (lambda: None))
        if over_ranks:
            t = torch.tensor(us, dtype=torch.float64, device=self.dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            us = t.tolist()
        return us

    def add(self, bench: str, impl: str, world: int, params: dict, us, metrics: dict | None = None,
            mode: str | None = None, error: str | None = None) -> None:
        mode = mode or self.mode_name
        self.records.append(rec.record(bench, impl, gpu=self.gpu, world=world, dtype=str(self.dtype), mode=mode,
                                       params=params, us=us, metrics=metrics, error=error))
        if us:
            self.log(f"  {bench} {impl} {mode} {params}: {statistics.median(us):.1f} us")

    # ------------------------------------------------------------------ 1. DeepSeek-shaped layer
    def deepseek_weights(self, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router [E, H] and the given experts' (gate_up [n, 2F, H], down [n, H, F]), each expert from
        its own seed (the same weights on every rank and in the one-GPU layer)."""
        a = self.args
        gen = torch.Generator(device=self.dev)
        gen.manual_seed(1234)
        router = (torch.randn(a.experts, a.hidden, generator=gen, device=self.dev) * 0.02).to(self.dtype)
        gate_up = torch.empty(len(experts), 2 * a.ffn, a.hidden, dtype=self.dtype, device=self.dev)
        down = torch.empty(len(experts), a.hidden, a.ffn, dtype=self.dtype, device=self.dev)
        for i, e in enumerate(experts):
            gen.manual_seed(10_000 + e)
            gate_up[i] = torch.randn(2 * a.ffn, a.hidden, generator=gen, device=self.dev).mul_(0.02).to(self.dtype)
            down[i] = torch.randn(a.hidden, a.ffn, generator=gen, device=self.dev).mul_(0.02).to(self.dtype)
        return router, gate_up, down

    def deepseek_layer(self) -> None:
        a = self.args
        self.log(f"\n1. DeepSeek-shaped layer: {a.experts} experts, top-{a.topk}, hidden {a.hidden}, FFN {a.ffn}, "
                 f"{self.dtype}, tokens per rank {a.tokens}")
        p = contiguous(a.experts, self.world)
        router, gate_up, down = self.deepseek_weights(list(range(a.experts)))
        local = VirtualExperts(p).local(self.rank)
        local_gu, local_dn = gate_up[local].contiguous(), down[local].contiguous()
        shape = {"experts": a.experts, "topk": a.topk, "hidden": a.hidden, "ffn": a.ffn}
        for tokens in a.tokens:
            if self.over_budget(f"moe_layer at {tokens} tokens per rank"):
                break
            gen = torch.Generator(device=self.dev)
            gen.manual_seed(self.rank * 7919 + tokens)
            x = torch.randn(tokens, a.hidden, generator=gen, device=self.dev).to(self.dtype)
            x_all = torch.randn(self.world * tokens, a.hidden, generator=gen, device=self.dev).to(self.dtype)
            params = {**shape, "tokens_per_rank": tokens, "tokens": self.world * tokens}

            def one_gpu() -> torch.Tensor:
                r = route(x_all, router, a.topk)
                return combine_local(x_all, r.topk_idx, r.topk_weights, gate_up, down, self.backend)

            modes = [True, False] if self.cuda else [False]
            for graph in modes:
                self.add("moe_layer", "one_gpu", 1, params, self.time_us(one_gpu, graph, over_ranks=False),
                         mode="graph" if graph else ("eager" if self.cuda else "cpu"))
            transports = [("ep_peer", "auto", "graph"), ("ep_nccl", "nccl", "exact")] if self.cuda else \
                [("ep_nccl", "nccl", "exact")]
            for impl, transport, dmode in transports:
                moe = EPMoE([local_gu], [local_dn], [p], topk=a.topk, max_tokens=tokens, transport=transport,
                            mode=dmode, backend=self.backend)
                layer = types.SimpleNamespace(router=router)
                step = lambda: moe(0, x, layer)[0]  # noqa: E731
                with torch.no_grad():
                    got = step()
                    r = route(x, router, a.topk)
                    want = combine_local(x, r.topk_idx, r.topk_weights, gate_up, down, self.backend)
                err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()
                ok = err < (0.02 if self.dtype == torch.bfloat16 else 1e-4)
                if not ok:
                    self.failed.append(f"moe_layer {impl} T={tokens}: relative error {err:.3g}")
                for graph in ([True, False] if dmode == "graph" and self.cuda else [False]):
                    us = self.time_us(step, graph)
                    self.add("moe_layer", impl, self.world, params, us, {"max_rel_err_vs_one_gpu": round(err, 5)},
                             mode="graph" if graph else ("eager" if self.cuda else "cpu"))
                moe.close()
            if self.cuda:
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ 2. placements on real routing
    def replay(self) -> dict | None:
        if not os.path.exists(REPLAY):
            self.log(f"\n2./4. skipped: {REPLAY} missing (python bench/moe_studies.py --study placement writes it)")
            return None
        with open(REPLAY) as f:
            data = json.load(f)
        unpack = lambda s, *shape: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).long().view(*shape)  # noqa: E501,E731
        n, layers, k = data["tokens"], data["layers"], data["topk"]
        data["topk_idx"] = unpack(data["topk_idx"], layers, n, k)
        data["pregate_topk"] = unpack(data["pregate_topk"], layers, n, k)
        data["seq"] = unpack(data["seq"], n)
        return data

    def placements(self, data: dict) -> None:
        self.log("\n2. Dispatch + combine of the held-out routing under each placement (identity experts)")
        mine = (data["seq"] % self.world == self.rank).nonzero().squeeze(1)
        counts = [int((data["seq"] % self.world == r).sum()) for r in range(self.world)]
        for hidden in self.args.replay_hidden:
            gen = torch.Generator(device=self.dev)
            gen.manual_seed(self.rank)
            x = torch.randn(mine.numel(), hidden, generator=gen, device=self.dev).to(self.dtype)
            for name, spec in data["placements"].get(str(self.world), {}).items():
                if self.over_budget(f"moe_placement {name} hidden {hidden}"):
                    return
                per_layer = []
                for layer in self.args.replay_layers:  # each layer has its own placement
                    table = spec["replicas"][layer]
                    v = VirtualExperts(Placement(self.world, tuple(tuple(r) for r in table), name))
                    disp = MoeDispatcher(num_experts=len(v.rank_of), hidden=hidden, dtype=self.dtype,
                                         max_tokens=max(counts), topk=data["topk"], placement=list(v.rank_of),
                                         mode="graph" if self.cuda else "exact",
                                         transport="auto" if self.cuda else "nccl")
                    idx = v.ids(data["topk_idx"][layer, mine].to(self.dev)).contiguous()
                    w = torch.full(idx.shape, 1.0 / idx.shape[1], device=self.dev)

                    def step() -> torch.Tensor:
                        recv, handle = disp.dispatch(x, idx, w)
                        return disp.combine(handle.expert_major(recv), handle)

                    per_layer.append(statistics.median(self.time_us(step, self.cuda)))
                    disp.close()
                self.add("moe_placement", name, self.world, {"hidden": hidden, "tokens": data["tokens"],
                                                             "cap": spec["cap"], "layers": self.args.replay_layers},
                         [sum(per_layer) / len(per_layer)],
                         {"copies_per_token": spec["copies_per_token"], "max_load_ratio": spec["max_load_ratio"],
                          "per_layer_us": [round(u, 2) for u in per_layer]})

    # ------------------------------------------------------------------ 3. gating
    def gating(self) -> None:
        a = self.args
        self.log("\n3. Dynamic gating vs static capacity, one GPU")
        router, gate_up, down = self.deepseek_weights(list(range(a.experts)))
        layer = MixtralLayer(*([None] * 6), router=router, gate_up=gate_up, down=down)
        for tokens in a.gating_tokens:
            gen = torch.Generator(device=self.dev)
            gen.manual_seed(tokens)
            x = torch.randn(tokens, a.hidden, generator=gen, device=self.dev).to(self.dtype)
            r = route(x, router, a.topk)
            params = {"experts": a.experts, "topk": a.topk, "hidden": a.hidden, "ffn": a.ffn, "tokens": tokens}
            cases = {"dynamic": lambda: combine_local(x, r.topk_idx, r.topk_weights, gate_up, down, self.backend)}
            for f in (1.0, 1.25, 2.0):
                cases[f"capacity_{f}"] = lambda f=f: gating.capacity_moe(x, r, layer, f)
            for name, fn in cases.items():
                factor = None if name == "dynamic" else float(name.split("_")[1])
                rows = tokens * a.topk if factor is None else a.experts * gating.capacity(tokens, a.topk, a.experts,
                                                                                          factor)
                dropped = 0.0 if factor is None else gating.dropped_fraction(r.topk_idx, a.experts, factor)
                self.add("moe_gating", name, 1, {**params, "factor": factor}, self.time_us(fn, self.cuda, False),
                         {"dropped_fraction": round(dropped, 5),
                          "activation_bytes": gating.activation_bytes(rows, a.hidden, a.ffn, 2)})

    # ------------------------------------------------------------------ 5. s-TS latency
    def speculative(self) -> None:
        """Decode steps of tiny-moe-pycode with EP over NCCL all-to-all: s-TS (pre-gate) vs the same
        code without speculation; the real checkpoint where $SHARDKIT_MOE_MODEL (or
        ../shared/models/tiny-moe-pycode) has it, else random weights of its shape."""
        from shardkit.models.moe.mixtral import Mixtral, MixtralConfig, load_mixtral, random_mixtral
        from shardkit.models.moe.sts import SpeculativeEPMoE
        a = self.args
        path = os.environ.get("SHARDKIT_MOE_MODEL") or os.path.join(os.path.dirname(os.path.dirname(
            os.path.dirname(os.path.abspath(__file__)))), "shared", "models", "tiny-moe-pycode")
        if os.path.exists(os.path.join(path, "model.safetensors")):
            config, weights, source = *load_mixtral(path, torch.float32), "tiny-moe-pycode"
        else:
            config = MixtralConfig(vocab_size=8192, hidden_size=384, intermediate_size=192, num_layers=6, num_heads=6,
                                   num_kv_heads=2, head_dim=64, num_experts=16, topk=4, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True)
            weights, source = random_mixtral(config, 0), "random weights of its shape"
        self.log(f"\n5. s-TS decode latency, EP={self.world} over all_to_all_single, model: {source}")
        weights = weights.to(self.dev, self.dtype)
        p = contiguous(config.num_experts, self.world)
        gen = torch.Generator().manual_seed(100 + self.rank)
        prompt = torch.randint(0, config.vocab_size, (a.sts_batch, a.sts_prompt), generator=gen).to(self.dev)
        steps = torch.randint(0, config.vocab_size, (a.sts_batch, a.sts_steps), generator=gen).to(self.dev)
        for speculate in (False, True):
            moe = SpeculativeEPMoE.from_layers(weights.layers, [p] * config.num_layers, device=self.dev,
                                               topk=config.topk, rms_eps=config.rms_norm_eps, speculate=speculate,
                                               backend=self.backend)
            model = Mixtral(config, weights, moe)
            times = []
            for rep in range(a.reps):
                cache = model.new_cache(a.sts_batch, a.sts_prompt + a.sts_steps)
                model.forward(prompt, cache, 0)
                self.barrier()
                if self.cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for i in range(a.sts_steps):
                    model.forward(steps[:, i:i + 1], cache, a.sts_prompt + i)
                if self.cuda:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e6 / a.sts_steps)
            t = torch.tensor(times, dtype=torch.float64, device=self.dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            st = moe.stats
            rows = {k: sum(getattr(x, k) for x in st) for k in ("early_rows", "late_rows", "wasted_rows",
                                                                 "needed_rows")}
            self.add("moe_speculative", "sts_pregate" if speculate else "no_speculation", self.world,
                     {"model": source, "batch_per_rank": a.sts_batch, "prompt": a.sts_prompt, "phase": "decode"},
                     t.tolist(), {**rows, "late_fraction": round(rows["late_rows"] / max(1, rows["needed_rows"]), 4)},
                     mode="eager" if self.cuda else "cpu")

    # ------------------------------------------------------------------ 4. expert buffer
    def buffer(self, data: dict) -> None:
        a = self.args
        self.log(f"\n4. Expert buffer: 16 experts/layer of hidden {a.buf_hidden}, FFN {a.buf_ffn}; decode of "
                 f"{a.buf_batch} sequences ({a.buf_steps} steps), prefill of {a.buf_batch} {a.buf_chunk}-token chunks")
        gen = torch.Generator().manual_seed(5)
        layers = [MixtralLayer(*([None] * 6), router=None,
                               gate_up=(torch.randn(16, 2 * a.buf_ffn, a.buf_hidden, generator=gen) * 0.02).to(self.dtype),
                               down=(torch.randn(16, a.buf_hidden, a.buf_ffn, generator=gen) * 0.02).to(self.dtype))
                  for _ in range(data["layers"])]
        n_layers, k = data["layers"], data["topk"]
        seq_len = data["tokens"] // a.buf_batch
        idx = data["topk_idx"].view(n_layers, a.buf_batch, seq_len, k)
        pre = data["pregate_topk"].view(n_layers, a.buf_batch, seq_len, k)
        attn_a = torch.randn(a.buf_hidden, a.buf_hidden, device=self.dev).to(self.dtype)

        def by_count(ids: torch.Tensor) -> list[int]:
            counts = torch.bincount(ids.reshape(-1), minlength=16)
            return [e for e in counts.argsort(descending=True).tolist() if counts[e] > 0]

        # (per call: per layer the routing [T, K] and the pre-gate prediction, or None for layer 0)
        phases = {"decode": [(idx[:, :, s], pre[:, :, s]) for s in range(a.buf_steps)],
                  "prefill": [(idx[:, q, :a.buf_chunk], pre[:, q, :a.buf_chunk]) for q in range(a.buf_batch)]}
        for phase, calls in phases.items():
            tokens = calls[0][0].shape[1]
            x = torch.randn(tokens, a.buf_hidden, device=self.dev).to(self.dtype)
            w = torch.full((tokens, k), 1.0 / k, device=self.dev)
            steps = [[ids[l].to(self.dev).contiguous() for l in range(n_layers)] for ids, _ in calls]
            predicted = [[None] + [by_count(p[l - 1]) for l in range(1, n_layers)] for _, p in calls]
            for policy in ("lifo", "lru"):
                if self.over_budget(f"moe_buffering {phase} {policy}"):
                    return
                for slots in a.buf_slots:
                    for prefetch in (False, True):
                        buf = buffering.ExpertBuffer(layers, slots, policy, self.dev)
                        if self.cuda:
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for step, guess in zip(steps, predicted):
                            for l in range(n_layers):
                                if prefetch and guess[l]:
                                    buf.prefetch(l, guess[l])
                                attn_a @ attn_a  # stands in for the layer's attention
                                buf.run(l, x, step[l], w)
                        if self.cuda:
                            torch.cuda.synchronize()
                        n = len(steps) * n_layers
                        us = (time.perf_counter() - t0) * 1e6 / n
                        hits = sum(st.hits for st in buf.stats) / max(1, sum(st.requests for st in buf.stats))
                        self.add("moe_buffering", policy + ("+prefetch" if prefetch else ""), 1,
                                 {"phase": phase, "size": a.buf_batch if phase == "decode" else a.buf_chunk,
                                  "slots": slots, "hidden": a.buf_hidden, "ffn": a.buf_ffn}, [us],
                                 {"hit_rate": round(hits, 4),
                                  "prefetches_per_call": round(sum(st.prefetches for st in buf.stats) / n, 3)},
                                 mode="eager" if self.cuda else "cpu")


def table_lines(records: list[dict], bench: str) -> list[str]:
    rows = [r for r in records if r["bench"] == bench]
    if not rows:
        return []
    out = [f"# {bench}: {rows[0]['gpu']} x{max(r['world'] for r in rows)}, {rows[0]['dtype']}", "",
           f"commit `{rows[0]['commit']}`, run {rows[0]['run']}; us: median over repetitions (max over ranks)", "",
           "| impl | mode | world | params | us median | metrics |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['impl']} | {r['mode']} | {r['world']} | "
                   f"{' '.join(f'{k}={v}' for k, v in r['params'].items())} | "
                   f"{r['us_median'] if r['us_median'] is not None else '-'} | "
                   f"{', '.join(f'{k} {v}' for k, v in (r.get('metrics') or {}).items() if k != 'per_layer_us')} |")
    if bench == "moe_layer":
        out += ["", "EP=2 speed-up over one GPU (same global tokens, graph mode):", "",
                "| tokens per rank | one GPU us | EP=2 peer us | speed-up |", "|---|---|---|---|"]
        for r in rows:
            if r["impl"] == "ep_peer" and r["mode"] == "graph":
                base = next((b for b in rows if b["impl"] == "one_gpu" and b["mode"] == "graph"
                             and b["params"]["tokens_per_rank"] == r["params"]["tokens_per_rank"]), None)
                if base:
                    out.append(f"| {r['params']['tokens_per_rank']} | {base['us_median']} | {r['us_median']} | "
                               f"{base['us_median'] / r['us_median']:.2f}x |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="records to OUT/records.jsonl (default: the store on GPUs; "
                    "CPU smoke runs write records only with --out)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (gloo)")
    ap.add_argument("--parts", nargs="+", default=["layer", "placement", "gating", "buffer", "speculative"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=140.0, help="no new measurement starts after this (the run "
                    "keeps what it has)")
    args = ap.parse_args()
    small = args.smoke
    args.experts, args.topk = (16, 4) if small else (256, 8)
    args.hidden, args.ffn = (64, 32) if small else (7168, 2048)
    args.tokens = [1, 5, 33] if small else [1, 16, 128, 512, 2048]
    args.gating_tokens = [64] if small else [1024, 8192]
    args.replay_hidden = [64] if small else [384, 7168]
    args.replay_layers = [0, 2, 4]
    args.buf_hidden, args.buf_ffn = (64, 32) if small else (2048, 1408)
    args.buf_batch, args.buf_steps, args.buf_chunk = 8, (4 if small else 48), (16 if small else 512)
    args.buf_slots = [4, 16] if small else [4, 8, 12, 16]
    args.sts_batch, args.sts_prompt, args.sts_steps = (2, 5, 2) if small else (8, 64, 32)
    cuda = torch.cuda.is_available() and not small
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120),
                            **({"device_id": torch.device("cuda", torch.cuda.current_device())} if cuda else {}))
    b = Bench(args)
    b.log("\n".join(header_lines(b.env)) + f"\nworld {b.world}, expert backend {b.backend}")
    try:
        with torch.no_grad():
            if "layer" in args.parts:
                b.deepseek_layer()
            data = b.replay()
            if data is not None and "placement" in args.parts:
                b.placements(data)
            if "gating" in args.parts and not b.over_budget("moe_gating"):
                b.gating()
            if data is not None and "buffer" in args.parts:
                b.buffer(data)
            if "speculative" in args.parts and not b.over_budget("moe_speculative"):
                b.speculative()
    except Exception:
        print(f"rank {b.rank}: {traceback.format_exc()}", file=sys.stderr, flush=True)
        b.failed.append("exception (see above)")
    if b.rank == 0:
        path = rec.destination(args.out, cuda)
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        for bench in ("moe_layer", "moe_placement", "moe_gating", "moe_buffering", "moe_speculative"):
            lines = table_lines(b.records, bench)
            if lines:
                print("\n" + "\n".join(lines), flush=True)
                if path is not None:
                    name = f"{bench}_{card(b.gpu)}_x{b.world}.md"
                    with open(os.path.join(os.path.dirname(path), name), "w") as f:
                        f.write("\n".join(lines) + "\n")
        if path is not None and b.records:
            print(f"appended {rec.append(b.records, path)} records to {path}")
        print(f"finished in {time.monotonic() - b.t0:.0f} s" +
              (f"; FAILED: {b.failed}" if b.failed else "; all checks ok"), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if b.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
