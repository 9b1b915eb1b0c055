"""MoE routing studies on the real model (CPU): placement and load balancing, speculative token
shuffling (s-TS) predictors, dynamic gating vs static capacity, expert buffering.

    python bench/moe_studies.py                    # every study; tables + plots + records in bench/results
    python bench/moe_studies.py --study placement  # one study

Evaluation text: this project's own Python sources (``git ls-files '*.py'`` at HEAD), never seen by
the model. Files are split by a hash of their path: statistics are fitted on one half and reported on
the other. The routing traces are cached (``--cache``).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import statistics
import time
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import records as rec  # noqa: E402
from shardkit.models.moe import buffering, gating, placement, speculative  # noqa: E402
from bench.common import time_host  # noqa: E402
from shardkit.models.moe.experts import has_grouped_mm  # noqa: E402
from shardkit.models.moe.mixtral import Mixtral, combine_local, load_mixtral, route  # noqa: E402
from shardkit.models.moe.trace import RoutingTrace, collect_trace  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.environ.get("SHARDKIT_MOE_MODEL") or os.path.join(os.path.dirname(ROOT), "shared", "models", "tiny-moe-pycode")
RESULTS = os.path.join(ROOT, "bench", "results")
SEQ_LEN = 512


def corpus(commit: str) -> dict[str, list[str]]:
    """The project's Python sources at ``commit``, split by the CRC32 of their path: fit / held-out."""
    files = subprocess.run(["git", "-C", ROOT, "ls-tree", "-r", "--name-only", commit], capture_output=True,
                           text=True, check=True).stdout.split()
    split: dict[str, list[str]] = {"fit": [], "heldout": []}
    for path in sorted(f for f in files if f.endswith(".py")):
        text = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:{path}"], capture_output=True, text=True,
                              check=True).stdout
        split["heldout" if zlib.crc32(path.encode()) % 2 else "fit"].append(text)
    return split


def sequences(texts: list[str], max_tokens: int) -> list[torch.Tensor]:
    """Texts tokenised, joined by <|endoftext|> (id 0), cut into SEQ_LEN-token sequences."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text).ids + [0]
    n = min(len(ids), max_tokens) // SEQ_LEN
    return list(torch.tensor(ids[:n * SEQ_LEN]).view(n, SEQ_LEN))


def traces(cache: str, max_tokens: int) -> tuple[RoutingTrace, RoutingTrace, dict]:
    """(fit, held-out) routing traces, from the cache when it holds them."""
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    os.makedirs(cache, exist_ok=True)
    out, info = {}, {}
    for name in ("fit", "heldout"):
        path = os.path.join(cache, f"trace_{name}_{max_tokens}.pt")
        meta = path + ".commit"
        if os.path.exists(path) and os.path.exists(meta):
            out[name] = RoutingTrace.load(path)
            info["text_commit"] = open(meta).read().strip()
            continue
        texts = corpus(commit)[name]
        seqs = sequences(texts, max_tokens)
        config, weights = load_mixtral(MODEL, torch.float32)
        t0 = time.time()
        out[name] = collect_trace(Mixtral(config, weights), seqs)
        print(f"{name}: {len(texts)} files, {len(seqs)} x {SEQ_LEN} tokens, traced in {time.time() - t0:.0f} s",
              flush=True)
        out[name].save(path)
        with open(meta, "w") as f:
            f.write(commit)
        info["text_commit"] = commit
    return out["fit"], out["heldout"], info


# ---------------------------------------------------------------- output helpers

def table(header: list[str], rows: list[list]) -> list[str]:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]


def write(name: str, lines: list[str]) -> str:
    path = os.path.join(RESULTS, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")
    print("\n".join(lines) + "\n", flush=True)
    return path


def heading(title: str, info: dict) -> list[str]:
    return [f"# {title}", "",
            f"Model `tiny-moe-pycode` (6 layers, 16 experts, top-4). Text: this project's Python sources at "
            f"`{info['text_commit']}`, files split by path hash; statistics fitted on {info['fit_tokens']} tokens, "
            f"reported on {info['heldout_tokens']} held-out tokens ({SEQ_LEN}-token sequences). Generated by "
            f"`python bench/moe_studies.py` (commit `{rec.current_commit()}`).", ""]


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def cpu_record(bench: str, impl: str, world: int, params: dict, metrics: dict, us=None, dtype="bfloat16") -> dict:
    return rec.record(bench, impl, gpu="cpu", world=world, dtype=dtype, mode="cpu", params=params, us=us,
                      metrics=metrics)


# ---------------------------------------------------------------- placement

def src_ranks(trace: RoutingTrace, world: int) -> torch.Tensor:
    """Data-parallel attention: sequence s lives on rank s mod W."""
    return trace.seq % world


def placement_rows(fit: RoutingTrace, held: RoutingTrace, world: int) -> list[dict]:
    """Every algorithm (and s-EG at every cap / replica budget) fitted per layer, evaluated on held-out."""
    e, hidden = fit.num_experts, 384
    configs = [("contiguous", None, 0), ("greedy", None, 0), ("anti_correlation", 1.08, 0)]
    configs += [("s_eg", cap, 0) for cap in (1.04, 1.06, 1.08, 1.10, 1.12, 1.15, 1.25, 1.5, 2.0, 100.0)]
    configs += [("s_eg", cap, extra) for extra in (1, 2) for cap in (1.04, 1.06, 1.08, 1.10, 1.12)]
    src = src_ranks(held, world)
    halves = fit.seq * 2 // (int(fit.seq.max()) + 1)  # the cap holds on each half of the fit text
    rows = []
    for algo, cap, extra in configs:
        t0 = time.time()
        per_layer, tables = [], []
        for layer in range(fit.layers):
            idx = fit.topk_idx[layer]
            if algo == "contiguous":
                p = placement.contiguous(e, world)
            elif algo == "greedy":
                p = placement.greedy(idx, e, world)
            elif algo == "anti_correlation":
                p = placement.anti_correlation(idx, e, world, cap, chunks=halves)
            else:
                p = placement.s_eg(idx, e, world, cap, extra_slots=extra, chunks=halves)
            m = placement.evaluate(p, held.topk_idx[layer], src)
            per_layer.append(m)
            tables.append([list(r) for r in p.replicas])
        name = algo if extra == 0 else f"s_eg_rep{extra}"
        remote = sum(m.remote_copies_per_token for m in per_layer) / len(per_layer)
        rows.append({"impl": name, "cap": cap, "extra_slots": extra,
                     "copies_per_token": sum(m.copies_per_token for m in per_layer) / len(per_layer),
                     "remote_copies_per_token": remote,
                     "max_load_ratio": max(m.max_load_ratio for m in per_layer),
                     "mean_load_ratio": sum(m.max_load_ratio for m in per_layer) / len(per_layer),
                     "bytes_per_token": 2 * remote * hidden * 2,  # dispatch + combine, bf16 rows
                     "experts_per_rank_max": max(max(len([1 for r in t if rk in r]) for rk in range(world))
                                                 for t in tables),
                     "per_layer": [[round(m.copies_per_token, 4), round(m.max_load_ratio, 4)] for m in per_layer],
                     "replicas": tables, "fit_s": round(time.time() - t0, 1)})
        print(f"  EP={world} {name} cap={cap}: copies {rows[-1]['copies_per_token']:.3f}, max load "
              f"{rows[-1]['max_load_ratio']:.3f} ({rows[-1]['fit_s']} s)", flush=True)
    base = rows[0]["copies_per_token"]
    for r in rows:
        r["saving_vs_contiguous"] = 1 - r["copies_per_token"] / base
    return rows


def best_under(rows: list[dict], limit: float) -> dict:
    ok = [r for r in rows if r["max_load_ratio"] <= limit]
    return min(ok, key=lambda r: r["copies_per_token"]) if ok else None


def placement_study(fit: RoutingTrace, held: RoutingTrace, info: dict) -> list[dict]:
    records, lines, by_world = [], heading("MoE expert placement (study on the real model's routing)", info), {}
    lines += ["Per placement, on the held-out text: copies per token (distinct ranks a token's 4 experts live on: "
              "one copy each with per-rank dedup), max/mean rank load (slots computed per rank; the worst layer, "
              "and the mean over layers), remote copies and bytes per token (dispatch + combine of bf16 rows of "
              "hidden 384; attention is data parallel, sequence s on rank s mod W), the most expert copies a rank "
              "holds (memory; E/W without replicas). `cap`: the max/mean load the fit enforced on each half of "
              "the fit text (a cap on all of it alone overfits: held-out loads came out ~0.1 higher); "
              "`s_eg_repN`: s-EG with N spare expert slots per rank (uneven counts and hot-expert replicas, at "
              "most 2 copies of an expert).", ""]
    for world in (2, 4):
        rows = placement_rows(fit, held, world)
        by_world[world] = rows
        lines += [f"## EP = {world}", ""]
        lines += table(["placement", "fit cap", "copies/token", "saving vs contiguous", "max load (worst layer)",
                        "mean over layers", "remote copies/token", "bytes/token", "experts/rank (max)"],
                       [[r["impl"], "-" if r["cap"] is None else ("none" if r["cap"] >= 100 else r["cap"]),
                         r["copies_per_token"], f"{100 * r['saving_vs_contiguous']:.1f}%", r["max_load_ratio"],
                         r["mean_load_ratio"], r["remote_copies_per_token"], int(r["bytes_per_token"]),
                         r["experts_per_rank_max"]] for r in rows])
        best = best_under(rows, 1.15)
        lines += ["", f"Best at max load <= 1.15 (held-out): **{best['impl']}** (fit cap {best['cap']}): "
                      f"{best['copies_per_token']:.3f} copies/token, {100 * best['saving_vs_contiguous']:.1f}% fewer "
                      f"than contiguous ({rows[0]['copies_per_token']:.3f}, whose max load is "
                      f"{rows[0]['max_load_ratio']:.2f}); max load {best['max_load_ratio']:.3f}.", ""]
        for r in rows:
            params = {"cap": r["cap"], "extra_slots": r["extra_slots"], "text_commit": info["text_commit"],
                      "fit_tokens": info["fit_tokens"], "heldout_tokens": info["heldout_tokens"], "hidden": 384}
            metrics = {k: r[k] for k in ("copies_per_token", "max_load_ratio", "mean_load_ratio",
                                         "remote_copies_per_token", "bytes_per_token", "saving_vs_contiguous",
                                         "experts_per_rank_max", "per_layer")}
            records.append(cpu_record("moe_placement", r["impl"], world, params, metrics))
    write("moe_placement_cpu", lines)
    placement_plot(by_world)
    save_placements(by_world, held)
    return records


def placement_plot(by_world: dict[int, list[dict]]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(by_world), figsize=(6 * len(by_world), 4.5))
    for ax, (world, rows) in zip(axes, by_world.items()):
        for name, marker in (("s_eg", "o-"), ("s_eg_rep1", "s-"), ("s_eg_rep2", "^-")):
            pts = sorted((r["max_load_ratio"], r["copies_per_token"]) for r in rows if r["impl"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=name)
        for name, marker in (("contiguous", "kx"), ("greedy", "gD"), ("anti_correlation", "mv")):
            r = next(r for r in rows if r["impl"] == name)
            ax.plot([r["max_load_ratio"]], [r["copies_per_token"]], marker, markersize=9, label=name)
        ax.axvline(1.15, color="grey", ls=":", lw=1)
        ax.set_xlabel("max / mean rank load (held-out, worst layer)")
        ax.set_ylabel("copies per token (held-out)")
        ax.set_title(f"EP = {world}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "moe_placement_cpu.png"), dpi=120)
    plt.close(fig)


REPLAY = os.path.join(RESULTS, "moe_replay.json")


def save_placements(by_world: dict[int, list[dict]], held: RoutingTrace, tokens: int = 4096) -> None:
    """For the GPU benchmark: held-out routing of ``tokens`` tokens (top-k ids and pre-gate top-k per
    layer, base64 uint8) and the placements to replay it with (contiguous, greedy, anti-correlation,
    the best s-EG variants at max load <= 1.15)."""
    chosen = {}
    for world, rows in by_world.items():
        keep = {r["impl"]: r for r in rows if r["impl"] in ("contiguous", "greedy", "anti_correlation")}
        for name in ("s_eg", "s_eg_rep1", "s_eg_rep2"):
            best = best_under([r for r in rows if r["impl"] == name], 1.15)
            if best:
                keep[name] = best
        chosen[str(world)] = {k: {"replicas": r["replicas"], "cap": r["cap"], "copies_per_token": r["copies_per_token"],
                                  "max_load_ratio": r["max_load_ratio"]} for k, r in keep.items()}
    pack = lambda t: base64.b64encode(t.to(torch.uint8).numpy().tobytes()).decode()  # noqa: E731
    data = {"tokens": tokens, "layers": held.layers, "topk": held.topk_idx.shape[2], "num_experts": held.num_experts,
            "seq": pack(held.seq[:tokens] % 256), "topk_idx": pack(held.topk_idx[:, :tokens]),
            "pregate_topk": pack(held.pregate[:, :tokens].topk(held.topk_idx.shape[2], -1).indices),
            "placements": chosen}
    with open(REPLAY, "w") as f:
        json.dump(data, f)


# ---------------------------------------------------------------- speculative token shuffling

def speculative_study(fit: RoutingTrace, held: RoutingTrace, info: dict) -> list[dict]:
    records = []
    lines = heading("Speculative token shuffling (s-TS): predicting a token's destination ranks one layer ahead",
                    info)
    lines += ["Prediction of each held-out token's set of destination ranks at layer l+1 (contiguous placement) "
              "from what is known at layer l. `top1_table`: the most frequent set per top-1 expert at l (the "
              "baseline); `topk_table`: per top-4 set at l, backing off to the top-2 pair and top-1 (keys seen "
              "< 5 times in the fit text); `pregate`: layer l+1's router on the residual after layer l, its "
              "top-4 through the placement (no fitting); `probe`: logistic regression on router probs, one-hot "
              "top-4 at l, pre-gate log probs, its set and mass per rank (fitted on the fit text). Late remote copies: rows s-TS still sends "
              "after layer l+1's router (the critical path), against the remote copies a plain dispatch sends "
              "then (sequence s on rank s mod W).", ""]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, world in zip(axes, (2, 4)):
        p = placement.contiguous(fit.num_experts, world)
        predictors = [speculative.Top1Table(), speculative.TopkTable(),
                      speculative.PregatePredictor(p, fit.topk_idx.shape[2]), speculative.ProbePredictor(p)]
        src = src_ranks(held, world)
        rows, acc = [], {pr.name: [] for pr in predictors}
        for layer in range(fit.layers - 1):
            target_fit = speculative.rank_sets(p, fit.topk_idx[layer + 1])
            actual = speculative.rank_sets(p, held.topk_idx[layer + 1])
            quality = {}
            for pr in predictors:
                pr.fit(fit, layer, target_fit)
                quality[pr.name] = q = speculative.prediction_quality(pr.predict(held, layer), actual, src)
                acc[pr.name].append(q["accuracy"])
                records.append(cpu_record("moe_speculative", pr.name, world,
                                          {"layer": f"{layer}->{layer + 1}", "placement": "contiguous",
                                           "text_commit": info["text_commit"]},
                                          {**{k: round(v, 5) for k, v in q.items()},
                                           "critical_bytes_per_token": round(q["late_remote_copies_per_token"] * 768, 1),
                                           "plain_bytes_per_token": round(q["remote_copies_per_token"] * 768, 1)}))
            best = max(quality, key=lambda n: quality[n]["accuracy"])
            q = quality[best]
            rows.append([f"{layer}->{layer + 1}"] + [quality[pr.name]["accuracy"] for pr in predictors] +
                        [best, q["coverage"], q["waste_per_token"], q["remote_copies_per_token"],
                         q["late_remote_copies_per_token"]])
        means = [sum(acc[pr.name]) / len(acc[pr.name]) for pr in predictors]
        rows.append(["mean"] + means + ["", "", "", "", ""])
        for pr, m in zip(predictors, means):
            records.append(cpu_record("moe_speculative", pr.name, world, {"layer": "mean", "placement": "contiguous",
                                                                         "text_commit": info["text_commit"]},
                                      {"accuracy": round(m, 5)}))
        lines += [f"## EP = {world}", ""]
        lines += table(["layer", *[pr.name for pr in predictors], "best", "coverage", "waste/token",
                        "remote copies/token (plain)", "late remote copies/token (s-TS)"], rows)
        lines += [""]
        for pr in predictors:
            ax.plot(range(fit.layers - 1), acc[pr.name], "o-", label=pr.name)
        ax.set_xticks(range(fit.layers - 1), [f"{l}->{l + 1}" for l in range(fit.layers - 1)])
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer l -> l+1")
        ax.set_ylabel("exact destination-set accuracy (held-out)")
        ax.set_title(f"EP = {world}, contiguous placement")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "moe_speculative_cpu.png"), dpi=120)
    plt.close(fig)
    write("moe_speculative_cpu", lines)
    return records


# ---------------------------------------------------------------- dynamic gating vs static capacity

FACTORS = (1.0, 1.25, 2.0)


def gating_study(held: RoutingTrace, info: dict, quality_seqs: int = 8) -> list[dict]:
    records = []
    config, weights = load_mixtral(MODEL, torch.float32)
    e, k, hidden, ffn = config.num_experts, config.topk, config.hidden_size, config.intermediate_size
    lines = heading("Dynamic gating vs static expert capacity (GShard/Fairseq factors)", info)
    lines += ["Static capacity: each expert gets `ceil(factor * T * 4 / 16)` rows per layer call of T tokens; "
              "slots past it are dropped (top-1 choices first, token order). Dynamic: exact counts, no drops.", ""]
    # dropped slots from the held-out routing, per batch of T tokens
    rows = []
    for tokens in (SEQ_LEN, 8 * SEQ_LEN):
        for factor in FACTORS:
            drops = [gating.dropped_fraction(held.topk_idx[layer, i:i + tokens], e, factor)
                     for layer in range(held.layers) for i in range(0, held.tokens - tokens + 1, tokens)]
            act = gating.activation_bytes(e * gating.capacity(tokens, k, e, factor), hidden, ffn, 2)
            rows.append([tokens, f"capacity {factor}", sum(drops) / len(drops), max(drops), act / 2 ** 20])
        rows.append([tokens, "dynamic", 0.0, 0.0, gating.activation_bytes(tokens * k, hidden, ffn, 2) / 2 ** 20])
    lines += ["## Dropped slots and activation memory per layer call (held-out routing, bf16)", ""]
    lines += table(["tokens T", "gating", "dropped slots (mean over layers and batches)", "worst layer/batch",
                    "expert activations MiB"], rows)
    # quality: held-out NLL with each gating (the drops change the later layers' routing too)
    seqs = torch.stack([held.seq == s for s in range(quality_seqs)]).any(0)
    ids = torch.stack(sequences(corpus(info["text_commit"])["heldout"], quality_seqs * SEQ_LEN)[:quality_seqs])
    quality = {}
    for name, moe in [("dynamic", None)] + [(f"capacity {f}", gating.CapacityMoE(k, f)) for f in FACTORS]:
        model = Mixtral(config, weights, moe)
        with torch.no_grad():
            logp = torch.log_softmax(model.forward(ids), -1)
        nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
        dropped = sum(d for d, _ in moe.dropped) / max(1, sum(n for _, n in moe.dropped)) if moe else 0.0
        quality[name] = (nll, dropped)
    trace_nll = held.nll[seqs].nanmean().item()
    # time of the expert computation for one layer call of T tokens (CPU, fp32)
    layer = weights.layers[0]
    tokens = quality_seqs * SEQ_LEN
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(0))
    routing = route(x, layer.router, k)
    timed = {"dynamic": lambda: combine_local(x, routing.topk_idx, routing.topk_weights, layer.gate_up, layer.down)}
    if has_grouped_mm(torch.float32, torch.device("cpu")):
        timed["dynamic (grouped_mm)"] = lambda: combine_local(x, routing.topk_idx, routing.topk_weights, layer.gate_up,
                                                              layer.down, "grouped_mm")
    for f in FACTORS:
        timed[f"capacity {f}"] = lambda f=f: gating.capacity_moe(x, routing, layer, f)
    times = {name: time_host(fn, 3, 5, lambda: None) for name, fn in timed.items()}
    lines += ["", f"## Quality and time ({quality_seqs} held-out sequences = one batch of {tokens} tokens per layer call)",
              "", f"Time: CPU wall time of one layer's expert computation (routing given, fp32, {tokens} tokens, one "
              f"thread, median of 5) -- a relative figure on a shared CPU; the GPU figures are in "
              f"`moe_layer` (bench/moe_layer_bench.py).", ""]
    trows = []
    for name in timed:
        base = name.replace(" (grouped_mm)", "")
        nll, dropped = quality[base]
        factor = None if base == "dynamic" else float(base.split()[1])
        act = gating.activation_bytes(tokens * k if factor is None else e * gating.capacity(tokens, k, e, factor),
                                      hidden, ffn, 2)
        trows.append([name, nll, dropped, act / 2 ** 20, statistics.median(times[name]) / 1e3])
        records.append(cpu_record("moe_gating", name.replace(" (grouped_mm)", "_grouped_mm").replace(" ", "_"), 1,
                                  {"tokens": tokens, "factor": factor, "text_commit": info["text_commit"]},
                                  {"nll": round(nll, 5), "dropped_fraction": round(dropped, 5),
                                   "activation_bytes_bf16": act}, us=times[name], dtype="float32"))
    lines += table(["gating", "held-out NLL (nats/token)", "dropped slots (all layers)", "activations MiB (bf16)",
                    "expert time ms"], trows)
    lines += ["", f"(the dynamic NLL equals the traced model's {trace_nll:.4f} on these sequences)"]
    write("moe_gating_cpu", lines)
    return records



# ---------------------------------------------------------------- expert buffering

SLOTS = (2, 4, 6, 8, 10, 12, 14, 16)


def request_streams(held: RoutingTrace, layer: int, phase: str, size: int) -> tuple[list, list | None]:
    """(experts used per call, experts predicted for it) for one layer. decode: ``size`` sequences
    step by step (one token each per call); prefill: one ``size``-token chunk of a sequence per call.
    Predictions: the pre-gate of the layer before (top-4 of the next router on the residual), ordered
    by how many tokens want each expert; none for layer 0."""
    seq_len = SEQ_LEN
    idx = held.topk_idx[layer].view(-1, seq_len, held.topk_idx.shape[2])
    pre = None if layer == 0 else held.pregate[layer - 1].topk(held.topk_idx.shape[2], -1).indices.view(
        -1, seq_len, held.topk_idx.shape[2])
    groups = ([idx[:size, p] for p in range(seq_len)] if phase == "decode" else
              [idx[s, c:c + size] for s in range(idx.shape[0]) for c in range(0, seq_len, size)])
    pred_groups = None if pre is None else (
        [pre[:size, p] for p in range(seq_len)] if phase == "decode" else
        [pre[s, c:c + size] for s in range(pre.shape[0]) for c in range(0, seq_len, size)])

    def ordered(ids: torch.Tensor) -> list[int]:
        counts = torch.bincount(ids.reshape(-1), minlength=held.num_experts)
        return [e for e in torch.argsort(counts, descending=True, stable=True).tolist() if counts[e] > 0]

    used = [sorted(set(g.reshape(-1).tolist())) for g in groups]
    return used, None if pred_groups is None else [ordered(g) for g in pred_groups]


def buffering_study(held: RoutingTrace, info: dict) -> list[dict]:
    records = []
    lines = heading("Expert buffering: device cache of experts per layer, LIFO vs LRU (vs FIFO, Belady), prefetch",
                    info)
    lines += ["Hit rate of a per-layer device cache of `slots` experts (of 16) over the held-out routing, mean over "
              "the 6 layers. Decode: a batch of sequences, one token each per call; prefill: one chunk of a "
              "sequence per call. `+prefetch`: before each call the experts the pre-gate predicts (layer l+1's "
              "router on the residual after layer l, known during layer l+1's attention) are loaded on a side "
              "stream (layer 0 has no prediction); `prefetch waste` = prefetched experts evicted unused / call.",
              ""]
    cases = [("decode", 1), ("decode", 8), ("decode", 32), ("prefill", 64), ("prefill", 512)]
    variants = [("lifo", False), ("lru", False), ("fifo", False), ("belady", False), ("lifo", True), ("lru", True)]
    plot_data: dict = {}
    for phase, size in cases:
        streams = [request_streams(held, layer, phase, size) for layer in range(held.layers)]
        rows = []
        for slots in SLOTS:
            row = [slots]
            for policy, prefetch in variants:
                stats = [buffering.simulate(used, slots, policy, pred if prefetch else None) for used, pred in streams]
                calls = sum(len(u) for u, _ in streams)
                hit = sum(s.hits for s in stats) / sum(s.requests for s in stats)
                waste = sum(s.prefetches - s.prefetch_hits for s in stats) / calls
                name = policy + ("+prefetch" if prefetch else "")
                row.append(hit)
                plot_data.setdefault((phase, size, name), []).append(hit)
                records.append(cpu_record("moe_buffering", name, 1, {"phase": phase, "size": size, "slots": slots,
                                                                     "text_commit": info["text_commit"]},
                                          {"hit_rate": round(hit, 5),
                                           "misses_per_call": round(sum(s.misses for s in stats) / calls, 4),
                                           "prefetches_per_call": round(sum(s.prefetches for s in stats) / calls, 4),
                                           "prefetch_waste_per_call": round(waste, 4)}))
            rows.append(row)
        used_mean = sum(len(x) for u, _ in streams for x in u) / sum(len(u) for u, _ in streams)
        what = f"batch {size}" if phase == "decode" else f"{size}-token chunks"
        lines += [f"## {phase}, {what} ({used_mean:.1f} experts used per layer call on average)", ""]
        lines += table(["slots", *[p + ("+prefetch" if f else "") for p, f in variants]], rows) + [""]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (phase, size) in zip(axes, [("decode", 1), ("decode", 8), ("prefill", 64)]):
        for policy, prefetch in variants:
            name = policy + ("+prefetch" if prefetch else "")
            ax.plot(SLOTS, plot_data[(phase, size, name)], "o-" if not prefetch else "s--", label=name)
        ax.set_title(f"{phase}, {'batch' if phase == 'decode' else 'chunk'} {size}")
        ax.set_xlabel("device slots per layer (of 16 experts)")
        ax.set_ylabel("hit rate (held-out)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "moe_buffering_cpu.png"), dpi=120)
    plt.close(fig)
    write("moe_buffering_cpu", lines)
    return records


STUDIES = {"placement": lambda fit, held, info: placement_study(fit, held, info),
           "speculative": lambda fit, held, info: speculative_study(fit, held, info),
           "gating": lambda fit, held, info: gating_study(held, info),
           "buffering": lambda fit, held, info: buffering_study(held, info)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.environ.get("SHARDKIT_MOE_CACHE", "/tmp/shardkit-moe-trace"))
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens per split (fit, held-out)")
    p.add_argument("--study", choices=sorted(STUDIES), action="append", help="default: all")
    p.add_argument("--out", default=None, help="append the records to OUT/records.jsonl instead of the store "
                   "(merge later with python bench/report.py --merge)")
    p.add_argument("--no-records", action="store_true", help="tables and plots only, no records")
    args = p.parse_args()
    torch.set_num_threads(1)
    fit, held, info = traces(args.cache, args.max_tokens)
    info.update(fit_tokens=fit.tokens, heldout_tokens=held.tokens)
    for name in args.study or list(STUDIES):
        t0 = time.time()
        records = STUDIES[name](fit, held, info)
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        if not args.no_records:
            path = rec.STORE if args.out is None else os.path.join(args.out, rec.STORE_NAME)
            print(f"appended {rec.append(records, path)} records to {path}")


if __name__ == "__main__":
    main()
