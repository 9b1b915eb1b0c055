"""Dynamic gating against static expert capacity (Huang et al., "Towards MoE Deployment", 2023).

Static capacity (GShard / Fairseq): every expert gets a buffer of ``C = ceil(factor * T * K / E)``
rows; slots are admitted in priority order (all top-1 choices in token order, then all top-2, ...,
as Fairseq's ``top2gating`` numbers its locations) and a slot past its expert's capacity is dropped
(contributes nothing). The expert computation is one batched GEMM over the padded [E, C, hidden]
buffer, whatever the routing: memory and time scale with the factor, and a factor below the busiest
expert's share drops tokens.

Dynamic gating: the exact counts (a sort by expert), no padding and no drops; the expert
computation is grouped over uneven segments (``swiglu_experts``).
"""
from __future__ import annotations

import math

import torch

from .mixtral import MixtralLayer, Routing, route


def capacity(tokens: int, topk: int, num_experts: int, factor: float) -> int:
    """Rows per expert of a static-capacity layer."""
    return max(1, math.ceil(factor * tokens * topk / num_experts))


def capacity_positions(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each slot's position in its expert's buffer under the k-major, token-order priority, [T, K]."""
    tokens, k = topk_idx.shape
    flat = topk_idx.t().reshape(-1)  # k-major
    onehot = torch.nn.functional.one_hot(flat, num_experts)
    pos = (onehot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
    return pos.view(k, tokens).t()


def dropped_fraction(topk_idx: torch.Tensor, num_experts: int, factor: float) -> float:
    """Share of the (token, expert) slots a static-capacity layer with this factor drops."""
    c = capacity(topk_idx.shape[0], topk_idx.shape[1], num_experts, factor)
    return (capacity_positions(topk_idx, num_experts) >= c).double().mean().item()


def activation_bytes(rows: int, hidden: int, ffn: int, itemsize: int) -> int:
    """Activation memory of an expert layer over ``rows`` rows: its input rows, the gate/up output
    [rows, 2F], the SwiGLU product [rows, F] and the output rows."""
    return rows * (2 * hidden + 3 * ffn) * itemsize


class CapacityMoE:
    """The MoE step with a static capacity per expert (drops past it), as a batched GEMM over the
    padded [E, C, hidden] buffer. ``dropped`` accumulates (dropped slots, all slots) per call."""

    def __init__(self, topk: int, factor: float) -> None:
        if not factor > 0:
            raise ValueError(f"CapacityMoE: factor must be positive, got {factor}")
        self.topk, self.factor = topk, factor
        self.dropped: list[tuple[int, int]] = []

    def __call__(self, layer_index: int, x: torch.Tensor, layer: MixtralLayer) -> tuple[torch.Tensor, Routing]:
        routing = route(x, layer.router, self.topk)
        return capacity_moe(x, routing, layer, self.factor, self.dropped), routing


def capacity_moe(x: torch.Tensor, routing: Routing, layer: MixtralLayer, factor: float,
                 dropped: list | None = None) -> torch.Tensor:
    """sum over kept slots of weight * expert(x) with static capacity ``factor`` (see the module).
    No host synchronisation (CUDA-graph capturable) unless ``dropped`` asks for the count."""
    tokens, hidden = x.shape
    e, k = layer.router.shape[0], routing.topk_idx.shape[1]
    c = capacity(tokens, k, e, factor)
    pos = capacity_positions(routing.topk_idx, e)
    keep = pos < c
    if dropped is not None:
        dropped.append((int((~keep).sum()), keep.numel()))
    slot = torch.where(keep, routing.topk_idx * c + pos, e * c)  # dropped slots -> a spare row past the buffer
    buf = x.new_zeros(e * c + 1, hidden)
    buf[slot.reshape(-1)] = x.repeat_interleave(k, dim=0)
    gate, up = torch.bmm(buf[:-1].view(e, c, hidden), layer.gate_up.transpose(1, 2)).chunk(2, dim=-1)
    y = torch.bmm(torch.nn.functional.silu(gate) * up, layer.down.transpose(1, 2)).view(e * c, hidden)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = torch.where(keep, routing.topk_weights.to(acc), 0.0)
    y = torch.cat([y, y.new_zeros(1, hidden)])[slot.reshape(-1)].view(tokens, k, hidden)
    return (y.to(acc) * weight[..., None]).sum(1).to(x.dtype)
