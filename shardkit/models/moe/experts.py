"""Grouped SwiGLU expert FFNs over rows sorted by expert (the "expert-major" order of a dispatch).

Rows of group g are ``rows[offsets[g]:offsets[g + 1]]``; a group may be padded (zero rows) past its
tokens, and rows past ``offsets[G]`` are ignored. gate_up [G, 2F, hidden] (gate rows, then up rows),
down [G, hidden, F], as ``MixtralLayer``.

Backends:
- "loop": one GEMM pair per non-empty group (the offsets are read on the host: a device sync).
- "grouped_mm": ``torch._grouped_mm`` (one launch for all groups, offsets stay on the device, CUDA
  graph capturable; bf16 on Hopper, fp32 on the CPU). Rows past offsets[G] come back undefined.
"""
from __future__ import annotations

import torch

BACKENDS = ("loop", "grouped_mm")


def has_grouped_mm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch._grouped_mm runs here for this dtype (probed once per (dtype, device type))."""
    key = (dtype, device.type)
    if key not in _PROBED:
        try:
            a = torch.zeros(16, 16, dtype=dtype, device=device)
            torch._grouped_mm(a, torch.zeros(2, 16, 16, dtype=dtype, device=device),
                              offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
            _PROBED[key] = True
        except (AttributeError, RuntimeError, NotImplementedError):
            _PROBED[key] = False
    return _PROBED[key]


_PROBED: dict = {}


def swiglu_experts(rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offsets: torch.Tensor,
                   backend: str = "loop") -> torch.Tensor:
    """rows [X, hidden] -> [X, hidden]: row i of group g becomes down_g(silu(gate_g(row)) * up_g(row)).
    offsets int [G + 1] (offsets[0] = 0, non-decreasing)."""
    if backend not in BACKENDS:
        raise ValueError(f"swiglu_experts: backend must be one of {BACKENDS}, got {backend!r}")
    groups = gate_up.shape[0]
    if offsets.numel() != groups + 1:
        raise ValueError(f"swiglu_experts: offsets must have {groups + 1} entries (groups + 1), got {offsets.numel()}")
    if backend == "grouped_mm":
        ends = offsets[1:].to(device=rows.device, dtype=torch.int32)
        h = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=ends)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm(torch.nn.functional.silu(gate) * up, down.transpose(1, 2), offs=ends)
    out = torch.zeros_like(rows)
    bounds = offsets.tolist()
    for g in range(groups):
        lo, hi = bounds[g], bounds[g + 1]
        if hi > lo:
            gate, up = (rows[lo:hi] @ gate_up[g].t()).chunk(2, dim=-1)
            out[lo:hi] = (torch.nn.functional.silu(gate) * up) @ down[g].t()
    return out


def offsets_of(counts: torch.Tensor) -> torch.Tensor:
    """[G] counts -> [G + 1] offsets (int64, on counts' device)."""
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
