#!/usr/bin/env python
"""Token-dimension pipeline benchmark (HPipe): time to first token of a long prompt on two stages.

GPU (2 GPUs, one process each):

    torchrun --standalone --nproc-per-node=2 bench/pipeline_bench.py [--quick] [--out DIR]

CPU machine (two CPU stages, spawned here; one core each where there are two):

    python bench/pipeline_bench.py --device cpu [--out DIR]
    python bench/pipeline_bench.py --device cpu --smoke        # a few seconds: checks the script

Parts (``--parts``; default ``homogeneous,loaded,gpu_cpu`` on GPUs, ``loaded`` on the CPU):

* ``homogeneous``: a Llama-shaped model with random weights (GPU: 32 layers, hidden 4096, 32/8
  heads, FFN 14336, bf16; a 32K-token prompt). Each rank profiles one decoder layer and the head on
  its device (``profile_compute``) and the link between them (``profile_links``); the planner
  (``plan_pipeline``, slices of profiled lengths only) picks the layer cut and the optimal slicing.
  Calibration: that plan runs once (after a warm-up); per stage, its compute time over the
  profile's model scales the stage's costs (``run_scales``), and the planner plans again from the
  scaled costs. Measured: the one-device time to first token (the whole prompt in one forward on
  one device, both ranks at once, rank 0's time), the pipeline with uniform slicings of 1..64
  slices, and with the planner's slicing; each with its predicted makespan (calibrated; the
  profile's alone beside it). Targets (issue 15): 2 GPUs >= 1.7x one GPU; optimal >= 1.15x best
  uniform.
* ``loaded``: rank 1's device shares with a co-running load (another process: a matmul loop on the
  same GPU, or three matmul threads on the same core), so stage 1 is a weaker device, and the link goes through host
  memory over gloo (``--loaded-wire host``, a slow link). Both ranks re-profile under these
  conditions; calibrated on one run of the even cut's plan; the DP partition (``partition_layers``)
  against the even split, each with its optimal slicing (the DP cut's prediction is calibrated on
  the other cut's run). Targets: DP >= 1.3x even; predicted makespan within 15% of the measured.
* ``gpu_cpu`` (GPU machines): rank 1 is a CPU stage (half the host's cores), the link through host
  memory; a smaller model in fp32 (8 layers, hidden 1024, a 2K-token prompt); DP against even.

Timing: a barrier, then the prefill on every rank; the time until the last stage has the first
token (argmax of the last logits) and every rank is done, max over ranks, median of ``--reps``
after one warm-up; the configurations of a part take turns repetition by repetition, so drifts of
a shared machine hit them alike. Each rank's per-slice compute start/end (CUDA events / wall clock) give the
schedule plot. Outputs are checked against the one-device model (last-token logits, bf16).
Records: bench "pipeline" in the store (``--out DIR``: DIR/records.jsonl), a markdown table and a
schedule plot (stages x time, slices coloured; measured beside predicted) in the same directory,
and the measured profiles as JSON.

``--quick`` (GPU): 16 layers and a 16K-token prompt instead of 32 and 32K, fewer uniform slicings.
``--budget-s`` (default 170): no part starts after that many seconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench import records as store  # noqa: E402
from bench.common import environment  # noqa: E402
from shardkit.pipeline import (ComputeCost, LinkCost, LlamaConfig, LlamaStage, PipelineRuntime,  # noqa: E402
                               even_partition, plan_pipeline, profile_compute, profile_links, random_weights,
                               save_profile, schedule, stage_models, uniform_slicing)
from shardkit.pipeline.plan import run_scales  # noqa: E402
from shardkit.pipeline.slicing import makespan_lower_bound  # noqa: E402

BENCH = "pipeline"


def settings(args: argparse.Namespace) -> dict:
    """Per part: model, prompt, dtype and planner grid (``granularity``: cut positions; the profile's
    ``slice_lengths`` bound the slices the planner may pick, so its model never extrapolates)."""
    if args.smoke:
        cfg = LlamaConfig(vocab=256, hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, ffn=160)
        tiny = dict(cfg=cfg, tokens=96, dtype=torch.float32, granularity=8, slice_lengths=[8, 24, 48],
                    prefixes=[0, 48], uniform=[1, 2, 4, 12])
        return {"homogeneous": tiny, "loaded": tiny, "gpu_cpu": tiny}
    if args.device == "cpu":
        cfg = LlamaConfig(vocab=2048, hidden=256, layers=8, heads=4, kv_heads=2, head_dim=64, ffn=688)
        small = dict(cfg=cfg, tokens=1024, dtype=torch.float32, granularity=64, slice_lengths=[64, 128, 256, 512],
                     prefixes=[0, 256, 768], uniform=[1, 2, 4, 8, 16])
        return {"homogeneous": small, "loaded": small}
    layers, tokens = (16, 16384) if args.quick else (32, 32768)
    cfg = LlamaConfig(vocab=32000, hidden=4096, layers=layers, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                      rope_theta=500000.0, tie_embeddings=False)
    big = dict(cfg=cfg, tokens=tokens, dtype=torch.bfloat16, granularity=512,
               slice_lengths=[512, 1024, 1536, 2048, 3072, 4096, 8192], prefixes=[p for p in (0, 8192, 16384, 24576) if p < tokens],
               uniform=[2, 4, 8, 16, 32] if args.quick else [1, 2, 4, 8, 16, 32, 64])
    # GPU + CPU stage: a smaller model in fp32 (the CPU's fast precision), a shorter prompt.
    small = LlamaConfig(vocab=32000, hidden=1024, layers=8, heads=8, kv_heads=8, head_dim=128, ffn=2816,
                        tie_embeddings=False)
    mixed = dict(cfg=small, tokens=2048, dtype=torch.float32, granularity=128, slice_lengths=[128, 256, 512, 1024],
                 prefixes=[0, 512, 1024])
    return {"homogeneous": big, "loaded": big, "gpu_cpu": mixed}


def plain(plan) -> tuple:
    """A plan's cut and slicing (what the ranks need; its stage models hold functions)."""
    return plan.partition.bounds, plan.slices


class CoLoad:
    """A co-running load on a device: another process looping matmuls until stopped (by its pid)."""

    def __init__(self, device: str, core: int | None) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--co-load", device]
        if core is not None:
            cmd += ["--core", str(core)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError(f"co-running load on {device} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def co_load(device: str, core: int | None) -> None:
    """The load process's loop (``--co-load``): matmuls on ``device`` until terminated."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        n, dtype = 8192, torch.bfloat16
    else:  # three busy threads on the stage's core: the stage gets at most a quarter of it
        torch.set_num_threads(3)
        n, dtype = 384, torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    c = torch.empty_like(a)
    torch.mm(a, a, out=c)
    print("ready", flush=True)
    while True:
        for _ in range(8):
            torch.mm(a, a, out=c)
        if dev.type == "cuda":
            torch.cuda.synchronize()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world != 2:
            raise SystemExit(f"pipeline_bench runs two stages: world size 2, got {self.world}")
        self.cuda = args.device == "cuda"
        self.settings = settings(args)
        self.env = environment()
        self.gpu = self.env["gpu"] if self.cuda else "cpu"
        self.core = None
        if self.cuda:
            self.device = torch.device("cuda", self.rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            cores = sorted(os.sched_getaffinity(0))
            self.core = cores[self.rank % len(cores)]
            os.sched_setaffinity(0, {self.core})
            torch.set_num_threads(1)
        self.records: list[dict] = []
        self.panels: list[tuple] = []  # (title, measured timelines, predicted Schedule, slices) to plot
        self.profiles: dict = {}
        self.t_start = time.perf_counter()

    # ----------------------------------------------------------------- helpers
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[{time.perf_counter() - self.t_start:6.1f}s] {msg}", flush=True)

    def sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def gather(self, obj):
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_rank0(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def stage(self, cfg: LlamaConfig, bounds, tokens: int, device: torch.device, dtype: torch.dtype) -> LlamaStage:
        layers = range(bounds[self.rank], bounds[self.rank + 1])
        first, last = self.rank == 0, self.rank == self.world - 1
        w = random_weights(cfg, layers, first, last, seed=0, device=device, dtype=dtype)
        return LlamaStage(cfg, w, layers, first=first, last=last, device=device, dtype=dtype, max_tokens=tokens,
                          attention=self.attention(device))

    def attention(self, device: torch.device) -> str:
        """The stages' attention kernel: ``--attention`` on CUDA, the stage's own choice elsewhere."""
        return self.args.attention if device.type == "cuda" else "auto"

    def prompt(self, cfg: LlamaConfig, tokens: int) -> torch.Tensor:
        return torch.randint(1, cfg.vocab, (1, tokens), generator=torch.Generator().manual_seed(7))

    def profile(self, name: str, device: torch.device) -> dict:
        """Every rank profiles its own device; returns every rank's fits (same on every rank)."""
        st = self.settings[name]
        samples = profile_compute(st["cfg"], device=device, dtype=st["dtype"], slice_lengths=st["slice_lengths"],
                                  prefixes=st["prefixes"], reps=self.args.profile_reps,
                                  min_seconds=0.0 if self.args.smoke else self.args.profile_min_s,
                                  attention=self.attention(device))
        layer, head = ComputeCost.fit(samples["layer"]), ComputeCost.fit(samples["head"])
        fits = self.gather({"device": str(device), "layer": layer, "head": head, "samples": samples,
                            "layer_fit_error": layer.max_relative_error(samples["layer"])})
        self.profiles[name] = {"compute": fits}
        for r, f in enumerate(fits):
            lay = f["layer"]
            self.log(f"  {name}: rank {r} ({f['device']}) layer a={lay.a:.3g} b={lay.b:.3g} c={lay.c:.3g} d={lay.d:.3g} "
                     f"+ {len(lay.lengths)} per-length lines (max error {100 * f['layer_fit_error']:.1f}%), head "
                     f"a={f['head'].a:.3g} b={f['head'].b:.3g}")
        return fits

    def link(self, name: str, rt: PipelineRuntime) -> LinkCost:
        lengths = self.settings[name]["slice_lengths"]
        counts = [lengths[0], lengths[-1] // 4, lengths[-1]]
        samples = profile_links(rt, counts, reps=self.args.profile_reps)[0]
        cost = LinkCost.fit(samples)
        self.profiles[name]["link"] = {"wire": rt.wire, "samples": samples, "fit": cost}
        self.log(f"  {name}: link ({rt.wire}) latency {cost.latency * 1e6:.0f} us, {cost.bytes_per_s / 1e9:.2f} GB/s")
        return cost

    def prefill_once(self, rt: PipelineRuntime, ids: torch.Tensor, slices) -> tuple:
        """(seconds on this rank from a common start to the first token, last-token logits on the last rank)."""
        dev = rt.stage.device
        self.sync(dev)
        dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = rt.prefill(ids, slices)
            if logits is not None:
                logits = logits[:, -1].float()
                logits.argmax(dim=-1)  # the first token
        self.sync(dev)
        return time.perf_counter() - t0, logits

    def one_device(self, cfg: LlamaConfig, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> tuple:
        """Time to first token of the whole model on this rank's device, the prompt in one forward."""
        st = LlamaStage(cfg, random_weights(cfg, range(cfg.layers), True, True, seed=0, device=device, dtype=dtype),
                        range(cfg.layers), first=True, last=True, device=device, dtype=dtype,
                        max_tokens=ids.shape[1], attention=self.attention(device))
        x = ids.to(device)
        times = []
        for rep in range(self.args.reps + 1):
            self.sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = st.logits(st.forward(x, 0, head=False)[:, -1:])[:, -1].float()
                logits.argmax(dim=-1)
            self.sync(device)
            if rep:
                times.append((time.perf_counter() - t0) * 1e6)
        del st
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return times, logits

    def add(self, impl: str, params: dict, us, metrics: dict, dtype: torch.dtype) -> None:
        rec = store.record(BENCH, impl, gpu=self.gpu, world=self.world, dtype=str(dtype).replace("torch.", ""),
                           mode="eager" if self.cuda else "cpu", params=params, us=us, metrics=metrics)
        self.records.append(rec)
        med = statistics.median(us) if us else float("nan")
        pred, alone = metrics.get("predicted_us"), metrics.get("predicted_profile_us")
        self.log(f"  {impl:24s} {params.get('label', ''):28s} measured {med / 1e3:9.2f} ms"
                 + (f"   predicted {pred / 1e3:9.2f} ms ({100 * (pred / med - 1):+.1f}%)" if pred else "")
                 + (f" [profile alone {alone / 1e3:.2f} ms ({100 * (alone / med - 1):+.1f}%)]" if alone else ""))

    # ----------------------------------------------------------------- parts
    def runtime(self, cfg, bounds, tokens, device, dtype, wire) -> PipelineRuntime:
        """This rank's runtime for the cut ``bounds`` (kept while a part runs)."""
        key = (cfg, tuple(bounds), tokens, str(device), dtype, wire)
        if key not in self._runtimes:
            self._runtimes[key] = PipelineRuntime(self.stage(cfg, bounds, tokens, device, dtype), wire=wire,
                                                  link_ctas=self.args.link_ctas or None)
        return self._runtimes[key]

    def drop_runtimes(self) -> None:
        self._runtimes = {}
        if self.cuda:
            torch.cuda.empty_cache()

    def calibrate(self, rt: PipelineRuntime, ids: torch.Tensor, slices, costs: tuple, bpt: int) -> tuple:
        """A calibration pass: one pipelined prefill of ``slices`` (after a warm-up) on ``rt``; per
        stage its compute time over the profile's model (``run_scales``). Returns the costs scaled
        by those factors (layer costs per stage, the head by the last stage's) and the factors."""
        bounds = [r.start for r in rt.layers] + [rt.layers[-1].stop]
        for _ in range(2):  # the first meets new shapes (cuDNN plans, allocations)
            self.prefill_once(rt, ids, slices)
        scales = run_scales(stage_models(bounds, *costs, bpt), slices, self.gather(rt.timeline()))
        layer, head, link = costs
        self.log(f"  calibration: one run of {len(slices)} slices {slices[0]}..{slices[-1]} on cut {bounds}: stage "
                 "compute " + ", ".join(f"{k:.3f}x" for k in scales) + " the profile's")
        return ([c.scaled(k) for c, k in zip(layer, scales)], head.scaled(scales[-1]), link), scales

    def measure(self, configs: list[dict], ids: torch.Tensor, base: dict) -> list[float]:
        """Time the prefill of ``ids`` for each config (label, impl, rt, slices, models, and
        profile_models: the uncalibrated ones): one warm-up each, then ``--reps`` rounds over all
        configs in turn (so slow drifts of the machine hit them alike); max over ranks per
        repetition. Records each with its predicted makespans; returns the median microseconds."""
        for c in configs:
            self.prefill_once(c["rt"], ids, c["slices"])
        seconds = [[0.0] * self.args.reps for _ in configs]
        timelines, logits = [None] * len(configs), [None] * len(configs)
        for rep in range(self.args.reps):
            for i, c in enumerate(configs):
                seconds[i][rep], logits[i] = self.prefill_once(c["rt"], ids, c["slices"])
                timelines[i] = c["rt"].timeline()
        t = torch.tensor(seconds, dtype=torch.float64) * 1e6
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        timelines = self.gather(timelines)
        checks = [{} for _ in configs]
        if self.rank == self.world - 1 and self.reference is not None:
            ref = self.reference.to(logits[0].device)
            checks = [{"last_logits_rel_err": round(float((x - ref).abs().max() / ref.abs().max()), 5),
                       "same_first_token": bool(x.argmax() == ref.argmax())} for x in logits]
        checks = self.gather(checks)[-1]
        medians = []
        for i, c in enumerate(configs):
            rt, slices = c["rt"], list(c["slices"])
            predicted = schedule(c["models"], slices)
            measured = [timelines[r][i] for r in range(self.world)]
            metrics = {"predicted_us": round(predicted.makespan * 1e6, 1),
                       "predicted_profile_us": round(schedule(c["profile_models"], slices).makespan * 1e6, 1),
                       "calibration_scales": [round(k, 4) for k in c["scales"]], **checks[i],
                       "timeline_s": [[[round(x, 6) for x in ab] for ab in tl] for tl in measured],
                       "predicted_timeline_s": [[[round(x, 6) for x in ab] for ab in row] for row in predicted.compute]}
            bounds = [r.start for r in rt.layers] + [rt.layers[-1].stop]
            params = {**base, "label": c["label"], "partition": bounds, "slices": slices, "wire": rt.wire,
                      "attention": list(rt.stage.attention_kernels), "link_ctas": self.args.link_ctas or None}
            self.add(c["impl"], params, t[i].tolist(), metrics, rt.stage.dtype)
            self.schedules[c["label"]] = (measured, predicted, slices)
            medians.append(statistics.median(t[i].tolist()))
        return medians

    def homogeneous(self) -> None:
        sh = self.settings["homogeneous"]
        cfg, dtype, tokens = sh["cfg"], sh["dtype"], sh["tokens"]
        self.log(f"homogeneous: {cfg.layers} layers, hidden {cfg.hidden}, {tokens} tokens, {dtype}")
        ids = self.prompt(cfg, tokens)
        base = {"layers": cfg.layers, "hidden": cfg.hidden, "tokens": tokens, "part": "homogeneous"}
        one_us, logits = self.one_device(cfg, ids, self.device, dtype)
        one_us = self.gather(one_us)[0]  # rank 0's device (both ran at once, each on its own)
        self.reference = self.from_rank0(logits.cpu() if self.rank == 0 else None)
        self.add("one_device", {**base, "label": "one device"}, one_us, {}, dtype)
        one = statistics.median(one_us)
        fits = self.profile("homogeneous", self.device)
        even = even_partition(cfg.layers, 2).bounds
        link = self.link("homogeneous", self.runtime(cfg, even, tokens, self.device, dtype, "auto"))
        costs = ([f["layer"] for f in fits], fits[-1]["head"], [link])
        bpt = cfg.hidden * torch.empty(0, dtype=dtype).element_size()
        kw = dict(layers=cfg.layers, tokens=tokens, bytes_per_token=bpt, granularity=sh["granularity"],
                  max_slice_tokens=sh["slice_lengths"][-1], lengths=sh["slice_lengths"])
        # The profile's plan, run once to calibrate the costs (run_scales); the plan made again from them.
        first_bounds, first_slices = self.from_rank0(None if self.rank else plain(plan_pipeline(*costs, **kw)))
        calibrated, scales = self.calibrate(self.runtime(cfg, first_bounds, tokens, self.device, dtype, "auto"), ids,
                                            first_slices, costs, bpt)
        bounds, slices = self.from_rank0(None if self.rank else plain(plan_pipeline(*calibrated, **kw)))
        self.log(f"  plan: cut {bounds}, {len(slices)} slices {slices}" + (
            "" if (bounds, slices) == (first_bounds, first_slices) else
            f" (the profile's: cut {first_bounds}, {len(first_slices)} slices {first_slices})"))
        rt = self.runtime(cfg, bounds, tokens, self.device, dtype, "auto")
        for key in [k for k in self._runtimes if k[1] != tuple(bounds)]:
            self._runtimes.pop(key)  # free the probe's and the calibration's stages
        models = stage_models(bounds, *calibrated, bpt)
        same = {"rt": rt, "models": models, "profile_models": stage_models(bounds, *costs, bpt), "scales": scales}
        configs = [{"label": f"uniform x{n}", "impl": "pipeline_uniform", "slices": uniform_slicing(tokens, n), **same}
                   for n in sh["uniform"]]
        configs.append({"label": "optimal slicing", "impl": "pipeline_optimal", "slices": slices, **same})
        times = self.measure(configs, ids, base)
        uniform = dict(zip(sh["uniform"], times[:-1]))
        best_n, opt = min(uniform, key=uniform.get), times[-1]
        for r in self.records[-len(configs):]:
            r["metrics"]["speedup_vs_one_device"] = round(one / r["us_median"], 3)
        # What any slicing could gain at most, in the model: best uniform over the lower bound.
        bound = makespan_lower_bound(models, tokens, granularity=sh["granularity"],
                                     max_slice_tokens=sh["slice_lengths"][-1], lengths=sh["slice_lengths"])
        best_model = min(schedule(models, uniform_slicing(tokens, n)).makespan for n in sh["uniform"]
                         if -(-tokens // n) <= sh["slice_lengths"][-1])
        self.records[-1]["metrics"].update({"speedup_vs_best_uniform": round(uniform[best_n] / opt, 3),
                                            "best_uniform_slices": best_n, "lower_bound_us": round(bound * 1e6, 1),
                                            "model_gain_bound": round(best_model / bound, 3)})
        self.panels += [("optimal slicing",) + self.schedules["optimal slicing"],
                        (f"best uniform (x{best_n})",) + self.schedules[f"uniform x{best_n}"]]
        best = uniform[best_n]
        self.log(f"  TTFT one device {one / 1e3:.1f} ms; planner's plan ({len(slices)} slices) {opt / 1e3:.1f} ms: "
                 f"{one / opt:.2f}x one device (target 1.7x) and {best / opt:.3f}x the best uniform (target 1.15x), "
                 f"best uniform x{best_n} {best / 1e3:.1f} ms: {one / best:.2f}x one device; model: no slicing below "
                 f"{bound * 1e3:.1f} ms, the best uniform models {best_model * 1e3:.1f} ms (any slicing gains <= "
                 f"{best_model / bound:.3f}x)")
        self.drop_runtimes()

    def heterogeneous(self, part: str) -> None:
        """DP partition vs even split with stage 1 on a weaker device: loaded (co-running load) or CPU."""
        sh = self.settings[part]
        cfg, tokens, dtype = sh["cfg"], sh["tokens"], sh["dtype"]
        if part == "gpu_cpu":
            wire, load = "host", None
            device = self.device if self.rank == 0 else torch.device("cpu")
            if self.rank == 1:
                torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
            self.reference = None  # another model than the homogeneous part's
        else:
            device, wire = self.device, self.args.loaded_wire
            load = CoLoad(str(self.device), self.core) if self.rank == 1 else None
        try:
            self.log(f"{part}: {cfg.layers} layers, hidden {cfg.hidden}, {tokens} tokens, {dtype}, link {wire}")
            ids = self.prompt(cfg, tokens)
            base = {"layers": cfg.layers, "hidden": cfg.hidden, "tokens": tokens, "part": part,
                    "stage1": "cpu" if part == "gpu_cpu" else "loaded " + device.type}
            if not self.cuda:  # a shared CPU machine: how busy it was says how far to trust the times
                base["host_load_1min"] = round(os.getloadavg()[0], 1)
            fits = self.profile(part, device)
            even = even_partition(cfg.layers, 2).bounds
            link = self.link(part, self.runtime(cfg, even, tokens, device, dtype, wire))
            costs = ([f["layer"] for f in fits], fits[-1]["head"], [link])
            bpt = cfg.hidden * torch.empty(0, dtype=dtype).element_size()
            kw = dict(layers=cfg.layers, tokens=tokens, bytes_per_token=bpt, granularity=sh["granularity"],
                      max_slice_tokens=sh["slice_lengths"][-1], lengths=sh["slice_lengths"])
            # Calibrated on the even cut's run (the DP cut's prediction then comes from another cut's run).
            first = self.from_rank0(None if self.rank else plain(plan_pipeline(*costs, bounds=even, **kw)))[1]
            calibrated, scales = self.calibrate(self.runtime(cfg, even, tokens, device, dtype, wire), ids, first,
                                                costs, bpt)
            plans = self.from_rank0(None if self.rank else {"even": plain(plan_pipeline(*calibrated, bounds=even, **kw)),
                                                            "dp": plain(plan_pipeline(*calibrated, **kw))})
            configs = []
            for which in ("even", "dp"):
                bounds, slices = plans[which]
                self.log(f"  {which}: cut {bounds}, {len(slices)} slices {slices}")
                configs.append({"label": f"{part}: {which} cut {list(bounds)}", "impl": f"{part}_{which}",
                                "rt": self.runtime(cfg, bounds, tokens, device, dtype, wire), "slices": slices,
                                "models": stage_models(bounds, *calibrated, bpt),
                                "profile_models": stage_models(bounds, *costs, bpt), "scales": scales})
            t_even, t_dp = self.measure(configs, ids, base)
            # How much weaker stage 1's device is (r: its layer time over stage 0's, over the profiled
            # shapes): two stages of speeds 1 and 1/r gain at most (1 + r) / 2 from the best cut
            # over the even one (no fill, drain or link), which is what the DP can approach.
            shapes = [(s_, p_) for s_, p_, _ in fits[0]["samples"]["layer"]]
            r = sum(fits[1]["layer"](*x) for x in shapes) / sum(fits[0]["layer"](*x) for x in shapes)
            self.records[-1]["metrics"].update({"speedup_dp_vs_even": round(t_even / t_dp, 3),
                                                "stage1_slowdown": round(r, 3),
                                                "ideal_dp_vs_even": round(max(r, 1 / r) / 2 + 0.5, 3)})
            self.panels += [(c["label"],) + self.schedules[c["label"]] for c in configs]
            self.log(f"  DP cut {t_even / t_dp:.2f}x faster than even (target 1.3x); stage 1 profiles {r:.2f}x "
                     f"stage 0's layer time: no cut can beat the even one by more than {max(r, 1 / r) / 2 + 0.5:.2f}x")
        finally:
            self.drop_runtimes()
            if load is not None:
                load.stop()

    def run(self) -> None:
        self.reference = None
        self._runtimes: dict = {}
        self.schedules: dict = {}  # label -> (measured timelines per stage, predicted Schedule, slices)
        for part in self.args.parts:
            if self.from_rank0(time.perf_counter() - self.t_start > self.args.budget_s):
                self.log(f"budget of {self.args.budget_s:.0f} s spent: skipping {part}")
                continue
            if part == "homogeneous":
                self.homogeneous()
            else:
                self.heterogeneous(part)


# --------------------------------------------------------------------- output (rank 0)
def table(records: list[dict]) -> str:
    lines = [f"# Pipeline (HPipe): time to first token, {records[0]['gpu']} x2, run {records[0]['run']}",
             "", "| part | config | cut | slices | measured ms (min-max) | predicted ms | pred/meas | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        m, p = r.get("metrics", {}), r["params"]
        pred = m.get("predicted_us")
        ratio = f"{pred / r['us_median']:.2f}" if pred else "-"
        slices = p.get("slices", [])
        sl = f"{len(slices)}: {slices[0]}..{slices[-1]}" if slices else "-"
        notes = ", ".join(f"{k} {v}" for k, v in m.items() if k.startswith(("speedup", "last_logits", "same_first",
                                                                              "best_uniform", "model_gain", "lower_bound",
                                                                              "stage1_slowdown", "ideal_dp",
                                                                              "calibration")))
        if m.get("predicted_profile_us"):
            notes += f", profile alone predicted {m['predicted_profile_us'] / 1e3:.2f} ms"
        lines.append(f"| {p.get('part')} | {p.get('label')} | {p.get('partition', '-')} | {sl} | "
                     f"{r['us_median'] / 1e3:.2f} ({r['us_min'] / 1e3:.2f}-{r['us_max'] / 1e3:.2f}) | "
                     f"{pred / 1e3 if pred else float('nan'):.2f} | {ratio} | {notes} |")
    return "\n".join(lines) + "\n"


def plot(panels: list[tuple], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(panels)
    fig, axes = plt.subplots(rows, 2, figsize=(15, 1.9 * rows + 0.6), squeeze=False)
    for i, (title, timelines, predicted, slices) in enumerate(panels):
        cmap = plt.get_cmap("viridis", max(2, len(slices)))
        right = 1.02e3 * max(max(b for tl in timelines for _, b in tl), predicted.makespan)
        for col, (what, per_stage) in enumerate((("measured", timelines),
                                                 ("predicted", [list(row) for row in predicted.compute]))):
            ax = axes[i][col]
            for m, tl in enumerate(per_stage):
                for j, (a, b) in enumerate(tl):
                    ax.broken_barh([(a * 1e3, (b - a) * 1e3)], (m - 0.4, 0.8), facecolors=cmap(j), edgecolor="white",
                                   linewidth=0.3)
            if col == 1:
                for m, row in enumerate(predicted.transfer):
                    for j, (a, b) in enumerate(row):
                        ax.broken_barh([(a * 1e3, (b - a) * 1e3)], (m + 0.42, 0.16), facecolors=cmap(j))
            ax.set_yticks(range(len(per_stage)), [f"stage {m}" for m in range(len(per_stage))])
            ax.invert_yaxis()
            end = max(b for tl in per_stage for _, b in tl)
            ax.set_title(f"{title}: {what} {end * 1e3:.1f} ms ({len(slices)} slices)", fontsize=9)
            ax.set_xlim(0, right)  # measured and predicted on one scale
            ax.set_xlabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(b: Bench, args: argparse.Namespace) -> None:
    if b.rank != 0 or not b.records:
        return
    text = table(b.records)
    print(text)
    path = store.destination(args.out, b.cuda)
    if path is None:
        print("CPU run without --out: no records written")
        return
    out_dir = os.path.dirname(path)
    store.append(b.records, path)
    card = "cpu" if not b.cuda else b.gpu.replace("NVIDIA ", "").split(" ")[0]
    stem = os.path.join(out_dir, f"pipeline_{card}_x2")
    with open(stem + ".md", "w") as f:
        f.write(text)
    save_profile(stem + "_profiles.json", b.profiles)
    if b.panels:
        plot(b.panels, stem + "_schedule.png")
    print(f"appended {len(b.records)} records to {path}; wrote {stem}.md, {stem}_profiles.json, {stem}_schedule.png")


def rank_main(args: argparse.Namespace) -> None:
    b = Bench(args)
    try:
        b.run()
    except Exception:
        traceback.print_exc()
        finish(b, args)  # what was measured before the failure
        raise
    finish(b, args)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", default=None, help="comma list of homogeneous, loaded, gpu_cpu (default: "
                    "homogeneous,loaded,gpu_cpu on GPUs, loaded on the CPU)")
    ap.add_argument("--quick", action="store_true", help="GPU: 16 layers, 16K tokens")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3 on GPUs, 5 on the CPU)")
    ap.add_argument("--profile-reps", type=int, default=3)
    ap.add_argument("--profile-min-s", type=float, default=None,
                    help="each profile repetition calls the layer back to back for at least this long (default "
                    "0.03 s on GPUs, 0.2 s on the CPU): as sustained as the prefill it predicts")
    ap.add_argument("--attention", choices=("auto", "cudnn", "flash"), default="auto",
                    help="attention kernel of the GPU stages (LlamaStage attention=; auto: cuDNN for slices >= 64 tokens)")
    ap.add_argument("--link-ctas", type=int, default=2,
                    help="most CTAs an NCCL link transfer may hold (PipelineRuntime link_ctas; 0: NCCL's default)")
    ap.add_argument("--loaded-wire", choices=("auto", "host"), default="host",
                    help="link of the loaded part: host memory over gloo (default, a slow link) or device")
    ap.add_argument("--budget-s", type=float, default=170.0, help="start no new part after this many seconds")
    ap.add_argument("--out", default=None, help="directory for records.jsonl, table, plot, profiles "
                    "(default: the store for GPU runs, nothing for CPU runs)")
    ap.add_argument("--co-load", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--core", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.device, args.reps, args.profile_reps, args.parts = "cpu", 1, 1, args.parts or "homogeneous,loaded"
    cpu = args.device == "cpu"
    args.parts = [p for p in (args.parts or ("loaded" if cpu else "homogeneous,loaded,gpu_cpu")).split(",") if p]
    args.reps = args.reps or (5 if cpu else 3)
    if args.profile_min_s is None:
        args.profile_min_s = 0.2 if cpu else 0.03
    bad = [p for p in args.parts if p not in ("homogeneous", "loaded", "gpu_cpu")]
    if bad or ("gpu_cpu" in args.parts and args.device != "cuda"):
        ap.error(f"--parts: unknown or impossible here: {bad or ['gpu_cpu']}")
    return args


def main() -> None:
    args = parse()
    if args.co_load:
        co_load(args.co_load, args.core)
        return
    if args.device == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        dist.init_process_group("cpu:gloo,cuda:nccl")
        try:
            rank_main(args)
        finally:
            dist.destroy_process_group()
        return
    from shardkit.testing import ProcessWorld
    world = ProcessWorld(2, "gloo")
    try:
        world.run(rank_main, args, timeout=3600)
    finally:
        world.close()


if __name__ == "__main__":
    main()
