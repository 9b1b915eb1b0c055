"""Plain-torch references for expert-parallel MoE dispatch and combine: a float64 loop over tokens and
their top-k slots, independent of every kernel and of the dedup."""
from __future__ import annotations

from typing import Callable

import torch

ROUTINGS = ("random", "uniform", "one_rank", "dropped", "duplicates")


def moe_inputs(tokens: int, hidden: int, num_experts: int, topk: int, dtype: torch.dtype, seed: int,
               routing: str = "random", expert_rank: list[int] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [T, hidden], topk_idx [T, topk] int64, topk_weights [T, topk] fp32) on the CPU, from ``seed``.

    routing: "uniform" (topk distinct experts per token, uniformly), "random" (as uniform, with about
    a quarter of the slots -1), "one_rank" (every expert on the rank ``expert_rank`` lists first for
    expert 0), "dropped" (every slot -1), "duplicates" (each token repeats one expert in two slots).
    """
    if routing not in ROUTINGS:
        raise ValueError(f"moe_inputs: routing must be one of {ROUTINGS}, got {routing!r}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weights = torch.rand(tokens, topk, generator=gen) + 0.1
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:topk] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, topk, dtype=torch.long)
    if routing == "random":
        idx[torch.rand(tokens, topk, generator=gen) < 0.25] = -1
    elif routing == "one_rank":
        target = [e for e in range(num_experts) if expert_rank[e] == expert_rank[0]]
        idx = torch.tensor(target)[torch.randint(len(target), (tokens, topk), generator=gen)]
    elif routing == "dropped":
        idx[:] = -1
    elif routing == "duplicates" and topk > 1:
        idx[:, 1] = idx[:, 0]
    return x, idx.long(), weights


def affine_experts(num_experts: int, hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert (scale [E], bias [E, hidden]) of the test experts ``y = x * scale[e] + bias[e]``: each
    expert maps a row differently, so a row sent to the wrong expert shows."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_experts, generator=gen) + 0.5, torch.randn(num_experts, hidden, generator=gen) * 0.1


def moe_reference(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  expert: Callable[[int, torch.Tensor], torch.Tensor],
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``out[t] = residual[t] + sum over k with topk_idx[t, k] >= 0 of topk_weights[t, k] *
    expert(topk_idx[t, k], x[t])``, token by token (``expert(e, row)`` takes and returns float64 rows)."""
    out = torch.zeros(x.shape, dtype=torch.float64) if residual is None else residual.double().clone()
    for t in range(x.shape[0]):
        for k in range(topk_idx.shape[1]):
            e = int(topk_idx[t, k])
            if e >= 0:
                out[t] += float(topk_weights[t, k]) * expert(e, x[t].double())
    return out


def e4m3_roundtrip(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """x [N, hidden] as fp8 dispatch delivers it, in x's dtype: each group of ``group`` channels divided by
    (its absolute max / 448) in fp32, rounded to e4m3 (nearest, ties to even), multiplied back."""
    n, hidden = x.shape
    groups = -(-hidden // group)
    rows = torch.zeros(n, groups * group)
    rows[:, :hidden] = x.float()
    rows = rows.view(n, groups, group)
    scale = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
    q = (rows / scale).to(torch.float8_e4m3fn).float()
    return (q * scale).view(n, groups * group)[:, :hidden].to(x.dtype)


def received_tokens(topk_idxs: list[torch.Tensor], expert_rank: list[int], rank: int) -> list[tuple[int, int]]:
    """(source, token) of every row ``rank`` receives, in its rank-major order: sources in order, each
    source's tokens in order, a token once however many of its experts live on ``rank``."""
    return [(s, t) for s, idx in enumerate(topk_idxs) for t in range(idx.shape[0])
            if any(int(e) >= 0 and expert_rank[int(e)] == rank for e in idx[t])]
