"""Functions run on every rank of a ProcessWorld by the expert-parallel MoE tests (CPU and GPU).

Every rank builds the same random Mixtral (or loads the real one) and the same batch of sequences;
rank r runs attention for sequences r, r + W, ... (data parallel) and its experts under the
placement; the single-process forward of the same sequences is the reference (computed on the rank).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from shardkit.models.moe.ep import EPMoE
from shardkit.models.moe.mixtral import MixtralConfig, Mixtral, load_mixtral, random_mixtral
from shardkit.models.moe.placement import Placement, contiguous

# the checkpoint: $SHARDKIT_MOE_MODEL, else ../shared/models/tiny-moe-pycode beside the checkout
MODEL = os.environ.get("SHARDKIT_MOE_MODEL") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
    "shared", "models", "tiny-moe-pycode")

# A small config with the real model's routing shape (16 experts, top-4) and odd sizes.
SMALL = MixtralConfig(vocab_size=97, hidden_size=48, intermediate_size=40, num_layers=3, num_heads=6, num_kv_heads=2,
                      head_dim=8, num_experts=16, topk=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=128, tie_word_embeddings=True)


def placements_for(kind: str, num_layers: int, num_experts: int, world: int) -> list[Placement]:
    """"contiguous"; "mixed": per layer a different permutation, uneven counts, and replicated
    experts (expert 0 on every rank, expert 5 on two ranks) in the last layer."""
    if kind == "contiguous":
        return [contiguous(num_experts, world)] * num_layers
    out = []
    for i in range(num_layers):
        perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(i)).tolist()
        ranks = [(perm[e] * 7 + i) % world for e in range(num_experts)]
        replicas = [(r,) for r in ranks]
        if i == num_layers - 1:
            replicas[0] = tuple(range(world))
            replicas[5] = tuple(sorted({ranks[5], (ranks[5] + 1) % world}))
        out.append(Placement(world, tuple(replicas), kind))
    return out


def model_and_batch(source: str, dtype: torch.dtype, batch: int, seq: int, seed: int):
    if source == "real":
        config, weights = load_mixtral(MODEL, dtype)
    else:
        config = SMALL
        weights = random_mixtral(config, seed, dtype)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed + 1))
    return config, weights, tokens


def _ep_setup(source: str, placement_kind: str, batch: int, steps: int, transport: str, mode: str, backend: str,
              dtype: torch.dtype, seed: int, max_tokens: int):
    """(config, EP model, fp32 single-process model, same-dtype single-process model, this rank's sequences)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    config, weights, tokens = model_and_batch(source, torch.float32, batch, steps, seed)
    ref_weights = weights.to(dev, torch.float32)
    weights = weights.to(dev, dtype)
    placements = placements_for(placement_kind, config.num_layers, config.num_experts, world)
    moe = EPMoE.from_layers(weights.layers, placements, device=dev, topk=config.topk, max_tokens=max_tokens,
                            transport=transport, mode=mode, backend=backend, align=16 if backend == "grouped_mm" else 1)
    return (config, Mixtral(config, weights, moe), Mixtral(config, ref_weights), Mixtral(config, weights),
            tokens[list(range(rank, batch, world))].to(dev))


def _max_err(pairs) -> torch.Tensor:
    """max |a - b| over the pairs, NaN if any element is non-finite (0 when all are empty)."""
    errs = [torch.where(torch.isfinite(d), d, torch.full_like(d, float("nan"))).max()
            for d in ((a.double() - b.double()).abs() for a, b in pairs if a.numel())]
    return torch.stack(errs).max().cpu() if errs else torch.zeros((), dtype=torch.float64)  # max propagates NaN


def check_ep_model(source: str, placement_kind: str, batch: int, prompt: int, decode_steps: int, transport: str,
                   mode: str, backend: str, dtype_name: str, seed: int) -> dict:
    """Prefill ``prompt`` tokens, then ``decode_steps`` single-token steps with EP. Returns this rank's
    max |EP - fp32 single-process| over all logits (NaN if anything was non-finite), the same for the
    single-process model in the EP dtype (``same_dtype_err``: what the dtype alone costs), and the
    reference's scale."""
    dtype = getattr(torch, dtype_name)
    world = dist.get_world_size()
    total = prompt + decode_steps
    config, ep, ref, same, seqs = _ep_setup(source, placement_kind, batch, total, transport, mode, backend, dtype, seed,
                                            max_tokens=-(-batch // world) * prompt)
    models = (ep, ref, same) if dtype != torch.float32 else (ep, ref)
    caches = [m.new_cache(seqs.shape[0], total) for m in models]
    outs = []
    with torch.no_grad():
        outs.append([m.forward(seqs[:, :prompt], c, 0) for m, c in zip(models, caches)])
        for pos in range(prompt, total):
            outs.append([m.forward(seqs[:, pos:pos + 1], c, pos) for m, c in zip(models, caches)])
    ep.moe.close()
    scale = max((o[1].abs().max().item() for o in outs if o[1].numel()), default=0.0)
    return {"rank": dist.get_rank(), "sequences": seqs.shape[0], "max_err": _max_err((o[0], o[1]) for o in outs).item(),
            "same_dtype_err": _max_err((o[-1], o[1]) for o in outs).item(), "scale": scale}


def check_graph_decode(batch: int, prompt: int, steps: int) -> dict:
    """GPU: the real model in bf16 with EP (peer-memory dispatcher in graph mode, grouped_mm experts,
    a replicated expert in the last layer), prefill eagerly, then every decode step by replaying one
    CUDA graph (static token buffer, position as a device tensor); logits against fp32 single-process."""
    total = prompt + steps
    config, ep, ref, same, seqs = _ep_setup("real", "mixed", batch, total, "auto", "graph", "grouped_mm",
                                            torch.bfloat16, 0, max_tokens=-(-batch // dist.get_world_size()) * prompt)
    models = (ep, ref, same)
    caches = [m.new_cache(seqs.shape[0], total) for m in models]
    outs = []
    with torch.no_grad():
        for m, c in zip(models, caches):
            m.forward(seqs[:, :prompt], c, 0)
        token_buf = seqs[:, prompt:prompt + 1].clone()
        pos_buf = torch.tensor(prompt, device=seqs.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles, allocates) before the capture
            ep.forward(token_buf, caches[0], pos_buf)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits_buf = ep.forward(token_buf, caches[0], pos_buf)
        for pos in range(prompt, total):
            token_buf.copy_(seqs[:, pos:pos + 1])
            pos_buf.fill_(pos)
            graph.replay()
            outs.append([logits_buf.clone()] + [m.forward(seqs[:, pos:pos + 1], c, pos) for m, c in
                                                zip(models[1:], caches[1:])])
        torch.cuda.synchronize()
    for d in ep.moe.dispatchers.values():
        d.check()
    ep.moe.close()
    scale = max(o[1].abs().max().item() for o in outs)
    return {"rank": dist.get_rank(), "sequences": seqs.shape[0], "max_err": _max_err((o[0], o[1]) for o in outs).item(),
            "same_dtype_err": _max_err((o[2], o[1]) for o in outs).item(), "scale": scale}


def predict_rank0(layer: int, h: torch.Tensor, layer_weights) -> torch.Tensor:
    """A poor s-TS predictor: every token to rank 0 only (rows wasted there, late rows elsewhere)."""
    masks = torch.zeros(h.shape[0], dist.get_world_size(), dtype=torch.bool, device=h.device)
    masks[:, 0] = True
    return masks


def check_sts_model(source: str, batch: int, prompt: int, decode_steps: int, speculate: bool, seed: int,
                    predictor: str = "pregate") -> dict:
    """SpeculativeEPMoE (``predictor``: "pregate" or "rank0", corrections) against the fp32
    single-process model: prefill + decode; returns the max error, the scale and this rank's row
    counts (early / late / wasted / needed over all layers)."""
    from shardkit.models.moe.sts import SpeculativeEPMoE
    rank, world = dist.get_rank(), dist.get_world_size()
    config, weights, tokens = model_and_batch(source, torch.float32, batch, prompt + decode_steps, seed)
    placements = [Placement(world, tuple((r[0],) for r in p.replicas))
                  for p in placements_for("mixed", config.num_layers, config.num_experts, world)]
    moe = SpeculativeEPMoE.from_layers(weights.layers, placements, topk=config.topk, rms_eps=config.rms_norm_eps,
                                       speculate=speculate, predictor=predict_rank0 if predictor == "rank0" else None)
    ep, ref = Mixtral(config, weights, moe), Mixtral(config, weights)
    seqs = tokens[list(range(rank, batch, world))]
    total = prompt + decode_steps
    caches = [ep.new_cache(seqs.shape[0], total), ref.new_cache(seqs.shape[0], total)]
    outs = []
    with torch.no_grad():
        outs.append([m.forward(seqs[:, :prompt], c, 0) for m, c in zip((ep, ref), caches)])
        for pos in range(prompt, total):
            outs.append([m.forward(seqs[:, pos:pos + 1], c, pos) for m, c in zip((ep, ref), caches)])
    scale = max((o[1].abs().max().item() for o in outs if o[1].numel()), default=0.0)
    st = moe.stats
    return {"rank": rank, "max_err": _max_err((o[0], o[1]) for o in outs).item(), "scale": scale,
            "early": sum(s.early_rows for s in st), "late": sum(s.late_rows for s in st),
            "wasted": sum(s.wasted_rows for s in st), "needed": sum(s.needed_rows for s in st)}
