"""Sync-Point Drop quality study on the real model (CPU, fp32): sensitivity classes, perplexity and
next-token agreement against the number of SPD blocks, zero-shot / distilled / head-grouped.

    python bench/spd_quality.py [--tp 2,4] [--eval-seqs 32] [--calib-seqs 48] [--seq 256] [--steps 300]
    python bench/spd_quality.py --smoke        # minutes: tiny text, few steps, no records

Model: ../shared/models/tiny-llama-pycode (--model). Text: this project's own Python sources at
``--text-commit`` (git), which the model never saw; files whose path hash is 0 mod 4 are the
calibration text, the others the evaluation text (disjoint by file). Both are cut into sequences of
``--seq`` tokens (files joined by <|endoftext|>).

Steps (shardkit/models/spd.py; all ranks simulated in one process, which the tests tie to the real
tensor-parallel model within 1e-4):
1. baseline: perplexity of the TP model (= the original model) on the evaluation text;
2. sensitivity: per block, the calibration loss increase of a zero-shot SPD of that block alone;
   classes: ISB <= --isb-max nats/token, SB <= --sb-max, ESB above;
3. head grouping: the similarity of the heads' attention scores proposes two placements of heads
   on ranks, similar heads together and similar heads spread apart (``group_heads``); the one with
   the lower zero-shot SPD error on training calibration sequences initialises the grouped block;
4. per block, block-to-block distillation (Adam, --steps steps, MSE to the original block's output
   on calibration activations) with the contiguous head placement ("distilled") and with the
   grouped placement ("grouped" + distilled); block-level errors on held-out calibration sequences
   for all of them and for the zero-shot block under each placement;
5. the curve: SPD on the k least sensitive blocks, k = 0..layers, evaluated zero-shot, distilled
   (every SPD block distilled), grouped (every SPD block regrouped + distilled), and with the class
   recipe (ISB zero-shot, SB distilled, ESB grouped + distilled). Identical plans are evaluated once.
Writes bench "spd_quality" records to the store (or --out DIR/records.jsonl), and
bench/results/spd_quality_tp<TP>.{md,png}. Intermediate results (sensitivity, trained blocks) are
cached in --cache so that an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import records as store  # noqa: E402
from shardkit.models import load_llama  # noqa: E402
from shardkit.models.spd import (SimulatedTP, SPDPlan, block_forward, block_io, classify, distill_block,  # noqa: E402
                                 group_heads, head_similarity, sensitivity)
from shardkit.models.llama_tp import contiguous_head_groups, rope_tables  # noqa: E402

DEFAULT_MODEL = os.path.join(ROOT, "..", "shared", "models", "tiny-llama-pycode")
VARIANTS = ("zero_shot", "distilled", "grouped", "recipe")
RECIPE = {"ISB": "zero_shot", "SB": "distilled", "ESB": "grouped"}
# ISB: a block whose zero-shot SPD costs <= 0.25% perplexity. With half of the 8 blocks dropped the
# issue allows 1% in all, i.e. 0.25% per block if the costs add up (the curve checks that they do).
ISB_MAX = math.log(1.0025)
# SB / ESB: see the --sb-max help and docs (chosen from where distillation alone stops recovering).
SB_MAX = math.log(1.03)


# ---------------------------------------------------------------------------------------------- text
def python_sources(commit: str) -> list[tuple[str, str]]:
    """(path, text) of every tracked .py file of the project at ``commit``."""
    names = subprocess.run(["git", "-C", ROOT, "ls-tree", "-r", "--name-only", commit], check=True,
                           capture_output=True, text=True).stdout.split()
    return [(n, subprocess.run(["git", "-C", ROOT, "show", f"{commit}:{n}"], check=True, capture_output=True,
                               text=True).stdout) for n in sorted(names) if n.endswith(".py")]


def is_calibration(path: str) -> bool:
    return int(hashlib.sha1(path.encode()).hexdigest(), 16) % 4 == 0


def token_sequences(model_dir: str, files: list[tuple[str, str]], seq: int, count: int) -> torch.Tensor:
    """[count, seq + 1] consecutive windows of the files' tokens joined by <|endoftext|> (id 0)."""
    from tokenizers import Tokenizer  # the checkpoint's own tokenizer.json

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    stream = []
    for _, text in files:
        stream += tok.encode(text).ids + [0]
    available = len(stream) // (seq + 1)
    if available < count:
        raise SystemExit(f"only {available} sequences of {seq + 1} tokens in this text, {count} asked for")
    return torch.tensor(stream[:count * (seq + 1)], dtype=torch.long).view(count, seq + 1)


# ---------------------------------------------------------------------------------------------- study
def cached(cache: dict, path: str, key: str, compute):
    if key not in cache:
        cache[key] = compute()
        torch.save(cache, path)
    return cache[key]


def block_error(config, layer, inputs, targets, world, heads) -> float:
    """SPD block error on held-out activations, relative to the original block's update (0 = exact)."""
    cos, sin = rope_tables(config, inputs.shape[1])
    with torch.no_grad():
        out = block_forward(config, layer, inputs, cos, sin, spd=True, world=world, heads=heads)
    return ((out - targets).pow(2).mean() / (targets - inputs).pow(2).mean()).item()


def study(args: argparse.Namespace, tp: int, log) -> tuple[list[dict], dict]:
    config, weights = load_llama(args.model, torch.float32)
    weights = weights.to(args.device)
    files = python_sources(args.text_commit)
    calib_files = [f for f in files if is_calibration(f[0])]
    eval_files = [f for f in files if not is_calibration(f[0])]
    calib = token_sequences(args.model, calib_files, args.seq, args.calib_seqs).to(args.device)
    evals = token_sequences(args.model, eval_files, args.seq, args.eval_seqs).to(args.device)
    log(f"text {args.text_commit}: {len(calib_files)} calibration files ({calib.numel()} tokens used), "
        f"{len(eval_files)} evaluation files ({evals.numel()} tokens used)")
    model = SimulatedTP(config, weights, tp)
    tag = f"tp{tp}_seq{args.seq}_c{args.calib_seqs}_e{args.eval_seqs}_{args.text_commit}" + (
        "" if args.device == "cpu" else f"_{args.device}")
    train_tag = f"s{args.steps}_lr{args.lr}_b{args.batch}_len{args.distill_len}"
    cache_path = os.path.join(args.cache, f"spd_quality_{tag}.pt")
    os.makedirs(args.cache, exist_ok=True)
    cache = torch.load(cache_path, weights_only=False) if os.path.exists(cache_path) else {}
    n = config.num_layers

    base = cached(cache, cache_path, "base", lambda: model.evaluate(evals))
    log(f"baseline: ppl {base['ppl']:.4f} (nll {base['nll']:.5f}) on {base['tokens']} tokens")
    calib_nll = cached(cache, cache_path, "calib_nll", lambda: model.evaluate(calib)["nll"])
    delta = cached(cache, cache_path, "sensitivity", lambda: sensitivity(model, calib, calib_nll))
    classes = classify(delta, args.isb_max, args.sb_max)
    order = sorted(range(n), key=lambda i: delta[i])
    log("sensitivity (calibration loss increase, nats/token): "
        + ", ".join(f"{i}:{d:+.4f} {c}" for i, (d, c) in enumerate(zip(delta, classes))))

    states = block_io(model, calib)
    held = max(1, args.calib_seqs // 4)  # the last quarter of calibration: block errors, never trained on
    contiguous = contiguous_head_groups(config, tp)[0]
    blocks = []
    for i in range(n):
        layer = weights.layers[i]
        # distillation sees the first distill_len positions of each training sequence (a causal prefix
        # is a whole sequence): half the cost per step of full sequences, on a shared CPU
        train_in, train_out = states[i][:-held, :args.distill_len], states[i + 1][:-held, :args.distill_len]
        test_in, test_out = states[i][-held:], states[i + 1][-held:]
        sim = cached(cache, cache_path, f"sim{i}", lambda: head_similarity(config, layer, train_in[:4]))
        placements = {"contiguous": contiguous, "together": group_heads(sim, tp, True),
                      "apart": group_heads(sim, tp, False)}
        pick = min(("together", "apart"), key=lambda name: block_error(
            config, layer, states[i][:8], states[i + 1][:8], tp, placements[name]))  # training sequences

        def train(heads, what):
            t0 = time.perf_counter()
            trained, losses = distill_block(config, layer, train_in, train_out, world=tp, heads=heads,
                                            steps=args.steps, lr=args.lr, batch=args.batch, seed=i)
            log(f"block {i} {what}: loss {losses[0]:.4f} -> {sum(losses[-10:]) / 10:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
            return trained

        distilled = cached(cache, cache_path, f"distilled{i}_{train_tag}", lambda: train(contiguous, "distilled"))
        grouped = cached(cache, cache_path, f"grouped{i}_{pick}_{train_tag}",
                         lambda: train(placements[pick], f"grouped ({pick}) {placements[pick]}"))
        info = {"block": i, "delta_nll": delta[i], "class": classes[i], "grouping": pick,
                "grouped_heads": placements[pick], "together": placements["together"], "apart": placements["apart"],
                "similarity_within": {name: float(sum(sim[a, b] for g in p for a in g for b in g if a < b))
                                      for name, p in placements.items()},
                "error": {**{f"zero_shot_{name}": block_error(config, layer, test_in, test_out, tp, p)
                             for name, p in placements.items()},
                          "distilled": block_error(config, distilled, test_in, test_out, tp, contiguous),
                          "grouped": block_error(config, grouped, test_in, test_out, tp, placements[pick])},
                "distilled": distilled, "grouped": grouped}
        log(f"block {i}: " + ", ".join(f"{k} {v:.4f}" for k, v in info["error"].items()))
        blocks.append(info)

    def choices(k: int, variant: str) -> tuple:
        """((block, how), ...) of the k least sensitive blocks; how: zero_shot, distilled or grouped."""
        return tuple((i, RECIPE[classes[i]] if variant == "recipe" else variant) for i in sorted(order[:k]))

    def plan(picked: tuple) -> SPDPlan:
        p = SPDPlan.none(n)
        for i, how in picked:
            p.spd[i] = True
            if how != "zero_shot":
                p.layers[i] = blocks[i][how]
            if how == "grouped":
                p.heads[i] = blocks[i]["grouped_heads"]
        return p

    curve = []
    for k in range(n + 1):
        for variant in VARIANTS if k else VARIANTS[:1]:
            picked = choices(k, variant)
            key = f"eval{picked}" if all(h == "zero_shot" for _, h in picked) else f"eval{picked}_{train_tag}"
            res = cached(cache, cache_path, key,
                         lambda: {key: v for key, v in model.evaluate(evals, plan(picked), base["argmax"]).items()
                                  if key != "argmax"})
            row = {"k": k, "variant": variant, "blocks": sorted(order[:k]), "how": [h for _, h in picked], **res,
                   "ppl_increase_pct": 100 * (res["ppl"] / base["ppl"] - 1)}
            log(f"k={k} {variant}: ppl {res['ppl']:.4f} ({row['ppl_increase_pct']:+.2f}%), "
                f"agreement {100 * res['agreement']:.2f}%")
            curve.append(row)
    summary = {"tp": tp, "config": tag, "base": {k: v for k, v in base.items() if k != "argmax"},
               "order": order, "blocks": [{k: v for k, v in b.items() if k not in ("distilled", "grouped")}
                                          for b in blocks], "curve": curve,
               "calib_tokens": calib.numel(), "eval_tokens": evals.numel(), "text_commit": args.text_commit,
               "device": args.device}
    return curve, summary


# ---------------------------------------------------------------------------------------------- output
def to_records(summary: dict, args: argparse.Namespace) -> list[dict]:
    tp = summary["tp"]
    cuda = args.device.startswith("cuda")
    common = dict(gpu=torch.cuda.get_device_name(args.device) if cuda else "cpu", world=tp, dtype="float32",
                  mode="eager" if cuda else "cpu", us=None)
    params0 = {"model": "tiny-llama-pycode", "seq": args.seq, "eval_tokens": summary["eval_tokens"],
               "calib_tokens": summary["calib_tokens"], "text_commit": args.text_commit, "steps": args.steps,
               "lr": args.lr, "distill_len": args.distill_len}
    recs = [store.record("spd_quality", "baseline", params={**params0, "k": 0}, metrics=summary["base"], **common)]
    for b in summary["blocks"]:
        recs.append(store.record("spd_quality", "sensitivity", params={**params0, "block": b["block"]},
                                 metrics={"delta_nll": b["delta_nll"], "class": b["class"], "grouping": b["grouping"],
                                          "grouped_heads": b["grouped_heads"], "together": b["together"],
                                          "apart": b["apart"], **{f"error_{k}": v for k, v in b["error"].items()}},
                                 **common))
    for row in summary["curve"]:
        recs.append(store.record("spd_quality", row["variant"], params={**params0, "k": row["k"],
                                                                      "blocks": row["blocks"], "how": row["how"]},
                                 metrics={k: row[k] for k in ("nll", "ppl", "ppl_increase_pct", "agreement")},
                                 **common))
    return recs


def markdown(summary: dict) -> str:
    tp, base = summary["tp"], summary["base"]
    lines = [f"# SPD quality: tiny-llama-pycode, TP={tp} (simulated ranks), fp32, {summary['device']}", "",
             f"Evaluation: {summary['eval_tokens']} tokens of this project's Python sources (commit "
             f"{summary['text_commit']}), calibration {summary['calib_tokens']} tokens of other files. "
             f"Baseline (TP model, no SPD): perplexity {base['ppl']:.4f}.", "",
             "## Blocks", "",
             "Zero-shot loss increase of SPD on that block alone (calibration), class, and the block's error on "
             "held-out calibration sequences relative to its update (mean square of out - target over mean square "
             "of the block's update): zero-shot with contiguous heads, with similar heads together, spread apart; "
             "after distillation (contiguous) and grouped (the placement of the two with the lower zero-shot "
             "error on training sequences) + distilled.", "",
             "| block | Δ loss (nats/tok) | Δ ppl | class | zero-shot | together | apart | distilled | grouping | "
             "grouped+distilled |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in summary["blocks"]:
        e = b["error"]
        lines.append(f"| {b['block']} | {b['delta_nll']:+.4f} | {100 * (math.exp(b['delta_nll']) - 1):+.2f}% | "
                     f"{b['class']} | {e['zero_shot_contiguous']:.4f} | {e['zero_shot_together']:.4f} | "
                     f"{e['zero_shot_apart']:.4f} | {e['distilled']:.4f} | {b['grouping']} {b['grouped_heads']} | "
                     f"{e['grouped']:.4f} |")
    lines += ["", "## Perplexity vs number of SPD blocks (least sensitive first)", "",
              f"Order: {summary['order']}. Cells: perplexity (increase over the baseline), next-token agreement "
              "with the TP model.", "",
              "| k | blocks | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    rows: dict[int, dict] = {}
    for r in summary["curve"]:
        rows.setdefault(r["k"], {})[r["variant"]] = r
    for k, by in sorted(rows.items()):
        cells = []
        for v in VARIANTS:
            r = by.get(v, by.get("zero_shot"))
            cells.append(f"{r['ppl']:.3f} ({r['ppl_increase_pct']:+.2f}%), {100 * r['agreement']:.1f}%")
        lines.append(f"| {k} | {by['zero_shot']['blocks']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v in VARIANTS:
        pts = sorted((r["k"], r["ppl_increase_pct"]) for r in summary["curve"] if r["variant"] == v or r["k"] == 0)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v.replace("_", "-"))
    ax.axhline(0, color="gray", lw=0.8)
    ax.axhline(1, color="gray", lw=0.8, ls="--", label="1% budget")
    ax.set_xlabel("SPD blocks (least sensitive first)")
    ax.set_ylabel("perplexity increase over the TP model (%)")
    ax.set_yscale("symlog", linthresh=1, linscale=1.5)  # linear within the 1% budget, log above
    ticks = [t for t in (0, 0.5, 1, 2, 5, 10, 20, 50, 100) if t <= max(r["ppl_increase_pct"] for r in summary["curve"])]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_ylim(bottom=min(-0.1, 1.2 * min(r["ppl_increase_pct"] for r in summary["curve"])))
    ax.set_title(f"tiny-llama-pycode, TP={summary['tp']}: Sync-Point Drop "
                 f"(baseline perplexity {summary['base']['ppl']:.2f})")
    ax.legend(loc="upper left")  # recipe = distilled wherever no ESB block is in SPD
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tp", default="2,4", help="tensor-parallel degrees, comma-separated")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--calib-seqs", type=int, default=48)
    p.add_argument("--eval-seqs", type=int, default=32)
    p.add_argument("--steps", type=int, default=300, help="distillation steps per block")
    p.add_argument("--distill-len", type=int, default=128, help="positions of each sequence distillation sees")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=1, help="sequences per distillation step")
    p.add_argument("--isb-max", type=float, default=ISB_MAX, help="ISB: zero-shot loss increase <= this "
                   "(nats/token; default ln 1.0025: 0.25%% perplexity per block)")
    p.add_argument("--sb-max", type=float, default=SB_MAX, help="SB: <= this, ESB above (default ln 1.03)")
    p.add_argument("--text-commit", default="c6d1644", help="the project commit whose sources are the text")
    p.add_argument("--cache", default=os.path.join(ROOT, "build", "spd_quality_cache"))
    p.add_argument("--out", default=None, help="records to DIR/records.jsonl and tables to DIR "
                   "(default: the store and bench/results)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the simulation runs (cpu; cuda works too, in fp32)")
    p.add_argument("--smoke", action="store_true", help="a tiny run (few sequences and steps), no records")
    args = p.parse_args()
    if args.smoke:
        args.seq, args.calib_seqs, args.eval_seqs, args.steps, args.distill_len = 32, 4, 2, 3, 16
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", flush=True)

    out_dir = args.out or store.RESULTS_DIR
    for tp in (int(t) for t in args.tp.split(",")):
        _, summary = study(args, tp, log)
        text = markdown(summary)
        print(text)
        if args.smoke:
            continue
        path = store.destination(args.out, on_gpu=True)  # real results (not interpreter timings): to the store
        n = store.append(to_records(summary, args), path)
        stem = os.path.join(out_dir, f"spd_quality_tp{tp}")
        with open(stem + ".md", "w") as f:
            f.write(text)
        plot(summary, stem + ".png")
        log(f"appended {n} records to {path}; wrote {stem}.md, {stem}.png")


if __name__ == "__main__":
    main()
