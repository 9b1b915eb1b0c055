"""SwiGLU of a fused gate/up projection: ``silu(gate) * up`` in one kernel (torch: two, with the
silu output written and read back).

gate_up [..., 2F] holds gate in its first F columns and up in the last F (the tensor-parallel
model's fused gate_up weight); fp32 math, one rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import CachedLauncher, int_key, ptr_key


@triton.jit
def swiglu_kernel(gate_up_ptr, out_ptr, ffn, BLOCK: tl.constexpr):
    """Grid (rows * cdiv(ffn, BLOCK),): program r * chunks + c handles columns c*BLOCK.. of row r."""
    chunks = tl.cdiv(ffn, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    row = pid // chunks
    cols = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < ffn
    gate = tl.load(gate_up_ptr + row * 2 * ffn + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * ffn + ffn + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * ffn + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


_launch = CachedLauncher(swiglu_kernel)


def launch_config(ffn: int) -> tuple[int, int]:
    """(BLOCK, warps): 2048 columns per program (8 bf16 values per thread on 4 warps), or the row."""
    block = min(2048, triton.next_power_of_2(ffn))
    return block, max(1, min(4, block // 256))


def swiglu(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate_up[..., :F]) * gate_up[..., F:]`` -> [..., F]; gate_up contiguous fp32/fp16/bf16."""
    if gate_up.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not gate_up.is_contiguous():
        raise ValueError(f"swiglu: gate_up must be a contiguous float32/float16/bfloat16 tensor, got {gate_up.dtype}")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: gate_up must be [..., 2F], got {tuple(gate_up.shape)}")
    ffn = gate_up.shape[-1] // 2
    shape = (*gate_up.shape[:-1], ffn)
    if out is None:
        out = torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != shape or out.dtype != gate_up.dtype or not out.is_contiguous():
        raise ValueError(f"swiglu: out must be contiguous {shape} of gate_up's dtype")
    rows = gate_up.numel() // (2 * ffn) if ffn else 0
    if rows:
        block, warps = launch_config(ffn)
        _launch((ptr_key(gate_up), ptr_key(out), int_key(ffn)), rows * triton.cdiv(ffn, block),
                (gate_up, out, ffn), {"BLOCK": block}, warps)
    return out
