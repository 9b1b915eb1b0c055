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

MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
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


def check_ep_model(source: str, placement_kind: str, batch: int, prompt: int, decode_steps: int, transport: str,
                   mode: str, backend: str, dtype_name: str, seed: int) -> dict:
    """Prefill ``prompt`` tokens then ``decode_steps`` single-token steps (greedy continuation of the
    reference, so both sides see the same tokens) with EP; returns this rank's max |EP - reference|
    over prefill and decode logits (NaN if anything was non-finite) and the reference's scale."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    dtype = getattr(torch, dtype_name)
    config, weights, tokens = model_and_batch(source, torch.float32, batch, prompt + decode_steps, seed)
    weights = weights.to(dev, dtype)
    mine = list(range(rank, batch, world))
    placements = placements_for(placement_kind, config.num_layers, config.num_experts, world)
    moe = EPMoE.from_layers(weights.layers, placements, device=dev, topk=config.topk,
                            max_tokens=max(1, len(range(0, batch, world))) * prompt, transport=transport, mode=mode,
                            backend=backend, align=16 if backend == "grouped_mm" else 1)
    ep = Mixtral(config, weights, moe)
    ref = Mixtral(config, weights)
    seqs = tokens[mine].to(dev)
    total = prompt + decode_steps
    ep_cache, ref_cache = ep.new_cache(len(mine), total), ref.new_cache(len(mine), total)
    errors, scale = [], torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        outs = [(ep.forward(seqs[:, :prompt], ep_cache, 0), ref.forward(seqs[:, :prompt], ref_cache, 0))]
        for step in range(decode_steps):
            pos = prompt + step
            outs.append((ep.forward(seqs[:, pos:pos + 1], ep_cache, pos), ref.forward(seqs[:, pos:pos + 1], ref_cache, pos)))
    for got, want in outs:
        if got.numel():
            diff = (got.double() - want.double()).abs()
            errors.append(torch.where(torch.isfinite(diff), diff, torch.full_like(diff, float("nan"))).max())
            scale = torch.maximum(scale, want.double().abs().max().cpu())
    moe.close()
    err = torch.stack(errors).max().item() if errors else 0.0  # torch max propagates NaN
    return {"rank": rank, "sequences": len(mine), "max_err": err, "scale": scale.item()}
