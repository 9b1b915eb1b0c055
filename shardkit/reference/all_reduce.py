"""Plain-torch references, shared by the tests and the benchmarks."""
from __future__ import annotations

import torch


def rank_inputs(world_size: int, numel: int, dtype: torch.dtype, seed: int,
                device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Every rank's input for a collective test: standard normal, drawn on the CPU from ``seed`` so
    that each rank can rebuild all of them, then cast to ``dtype`` and moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=gen).to(dtype).to(device) for _ in range(world_size)]


def all_reduce_reference(inputs: list[torch.Tensor]) -> torch.Tensor:
    """float64 sum of the ranks' inputs (as they are, already rounded to their dtype)."""
    return torch.stack([x.double() for x in inputs]).sum(0)


def all_reduce_residual_rmsnorm_reference(inputs: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor,
                                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (out, residual_out) of the fused all-reduce + residual add + RMSNorm, from the ranks'
    inputs [..., hidden], the residual [..., hidden] and the weight [hidden], with no rounding at all:
    residual_out = residual + sum of inputs; out = residual_out / sqrt(mean(residual_out**2) + eps) * weight."""
    h = all_reduce_reference(inputs) + residual.double()
    out = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return out, h
