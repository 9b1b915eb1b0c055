"""SPD at a fixed set of blocks: independent vs stacked block-to-block distillation (CPU, fp32).

The quality study (bench/spd_quality.py) distils every SPD block on the *original* model's block
inputs. With several SPD blocks the later ones then see inputs that the earlier SPD blocks have already
perturbed, which none of them was trained for. "Stacked" distillation trains the chosen blocks in
order, block i on the residual stream of the model with the earlier chosen blocks already SPD and
distilled, towards the original model's output of block i (the clean target): each block learns to
undo the error that reaches it, as well as its own.

    python bench/spd_stacked_distill.py --tp 4 --blocks 3,5,6,7 --methods independent,stacked [--steps 300]

Text, model, sequences, distillation settings and seeds are the study's (imported from it), so the
"independent" method at the study's settings reproduces its number (TP=4, blocks 3, 5, 6, 7 distilled:
+1.63% perplexity). Prints perplexity increase and next-token agreement over the TP model per method;
with --out, appends bench "spd_quality" records (impl "distilled" or "distilled_stacked", params with
the blocks and steps) to DIR/records.jsonl.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import records as store  # noqa: E402
from bench.spd_quality import DEFAULT_MODEL, is_calibration, python_sources, token_sequences  # noqa: E402
from shardkit.models import load_llama  # noqa: E402
from shardkit.models.spd import SimulatedTP, SPDPlan, block_io, distill_block  # noqa: E402


def distil(args, config, weights, model: SimulatedTP, calib: torch.Tensor, blocks: list[int], stacked: bool,
           log) -> SPDPlan:
    """The plan with ``blocks`` SPD, each distilled (in ascending order when ``stacked``)."""
    held = max(1, args.calib_seqs // 4)  # as the study: the last quarter is never trained on
    clean = block_io(model, calib)
    plan = SPDPlan.none(config.num_layers)
    for i in sorted(blocks):
        inputs = clean[i]
        if stacked and plan.spd != [False] * config.num_layers:  # the stream with the earlier SPD blocks
            with torch.no_grad():
                inputs = torch.cat([model.hidden_states(calib[lo:lo + 8], plan)[i]
                                    for lo in range(0, calib.shape[0], 8)])
        t0 = time.perf_counter()
        trained, losses = distill_block(config, weights.layers[i], inputs[:-held, :args.distill_len],
                                        clean[i + 1][:-held, :args.distill_len], world=args.tp, steps=args.steps,
                                        lr=args.lr, batch=args.batch, seed=i)
        log(f"block {i} ({'stacked' if stacked else 'independent'}): loss {losses[0]:.4f} -> "
            f"{sum(losses[-10:]) / 10:.4f} ({time.perf_counter() - t0:.0f} s)")
        plan.spd[i], plan.layers[i] = True, trained
    return plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--blocks", default="3,5,6,7", help="the SPD blocks (default: the study's TP=4 k=4 choice)")
    p.add_argument("--methods", default="independent,stacked")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--calib-seqs", type=int, default=48)
    p.add_argument("--eval-seqs", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--distill-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-commit", default="c6d1644")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    config, weights = load_llama(args.model, torch.float32)
    files = python_sources(args.text_commit)
    calib = token_sequences(args.model, [f for f in files if is_calibration(f[0])], args.seq, args.calib_seqs)
    evals = token_sequences(args.model, [f for f in files if not is_calibration(f[0])], args.seq, args.eval_seqs)
    model = SimulatedTP(config, weights, args.tp)
    base = model.evaluate(evals)
    log(f"TP={args.tp} baseline perplexity {base['ppl']:.4f} on {base['tokens']} tokens")
    blocks = [int(b) for b in args.blocks.split(",")]
    recs = []
    for method in args.methods.split(","):
        plan = distil(args, config, weights, model, calib, blocks, method == "stacked", log)
        res = model.evaluate(evals, plan, base["argmax"])
        increase = 100 * (res["ppl"] / base["ppl"] - 1)
        log(f"{method}: blocks {sorted(blocks)}, {args.steps} steps: perplexity {res['ppl']:.4f} ({increase:+.2f}%), "
            f"agreement {100 * res['agreement']:.2f}%")
        recs.append(store.record(
            "spd_quality", "distilled_stacked" if method == "stacked" else "distilled", gpu="cpu", world=args.tp,
            dtype="float32", mode="cpu", us=None,
            params={"model": "tiny-llama-pycode", "seq": args.seq, "eval_tokens": base["tokens"],
                    "calib_tokens": calib.numel(), "text_commit": args.text_commit, "steps": args.steps, "lr": args.lr,
                    "distill_len": args.distill_len, "k": len(blocks), "blocks": sorted(blocks),
                    "how": ["distilled"] * len(blocks), "method": method},
            metrics={"nll": res["nll"], "ppl": res["ppl"], "ppl_increase_pct": increase, "agreement": res["agreement"]}))
    if args.out:
        store.append(recs, os.path.join(args.out, store.STORE_NAME))


if __name__ == "__main__":
    main()
