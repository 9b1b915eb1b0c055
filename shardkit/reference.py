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
