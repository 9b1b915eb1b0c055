"""Residual add + RMSNorm on one rank, no communication: ``h = residual + x``, ``out = RMSNorm(h) * w``.

Two users in a tensor-parallel Llama (shardkit/models/llama_tp.py):
* the Sync-Point Drop block feeds its FFN with ``RMSNorm(X + Y_i)``, ``Y_i`` being this rank's
  partial (un-reduced) attention output: x = Y_i, residual = X, ``h`` is not kept;
* a sync point with nothing to reduce (one GPU, or the "no all-reduce" timing baseline): x = the
  layer output, and ``h`` is the new residual stream (``residual_out``).
One kernel instead of torch's add + RMSNorm (two to four kernels, ``h`` written and read back).

Numerics follow the fused all-reduce + residual + RMSNorm (kernels/all_reduce/rmsnorm.py): the sum in
fp32, rounded once to the dtype (the residual stream's precision), normalised in fp32 with that
rounded value, one rounding of ``out``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..all_reduce.rmsnorm import check_rmsnorm_operands
from ..launch import CachedLauncher, int_key, ptr_key



@triton.jit
def add_rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, hidden, eps,
                       BLOCK_H: tl.constexpr, WRITE_RESIDUAL: tl.constexpr):
    """Grid (rows,): program r normalises row r of the contiguous [rows, hidden] tensors."""
    row = tl.program_id(0).to(tl.int64)  # rows * hidden may exceed 2**31
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    offs = row * hidden + cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = (x + res).to(dtype)
    if WRITE_RESIDUAL:
        tl.store(residual_out_ptr + offs, h, mask=mask)
    h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (h * rstd * weight).to(dtype), mask=mask)


_launch = CachedLauncher(add_rmsnorm_kernel)


def launch_config(hidden: int) -> tuple[int, int]:
    """(BLOCK_H, warps) for rows of ``hidden`` elements: the whole row in one tile, about 8 fp32 values
    per thread (a row of 8192 on 32 warps), so that the registers never spill."""
    block = triton.next_power_of_2(hidden)
    return block, max(1, min(32, block // 256))


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                out: torch.Tensor | None = None,
                residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(RMSNorm(residual + x) * weight, residual + x)`` for x, residual [..., hidden].

    x, residual: same shape, dtype (fp32/fp16/bf16) and device, contiguous; not modified.
    weight: [hidden], x's dtype. eps: >= 0.
    out: optional contiguous buffer of x's shape and dtype (may be x or residual).
    residual_out: optional buffer for ``residual + x`` (may be residual or x, not out); when None the
      sum is not stored and None is returned in its place.
    """
    what = "add_rmsnorm"
    for t, name in ((x, "x"), (residual, "residual"), (weight, "weight")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{what}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{what}: {name} must be contiguous")
        if t.device != x.device:
            raise ValueError(f"{what}: {name} must be on x's device {x.device}, got {t.device}")
    hidden = check_rmsnorm_operands(x, residual, weight, eps, what)
    for t, name in ((out, "out"), (residual_out, "residual_out")):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype or not t.is_contiguous()
                              or t.device != x.device):
            raise ValueError(f"{what}: {name} must be a contiguous tensor of x's shape {tuple(x.shape)}, dtype "
                             f"{x.dtype} and device {x.device}")
    if out is not None and residual_out is not None and out.data_ptr() == residual_out.data_ptr():
        raise ValueError(f"{what}: out and residual_out must be different buffers")
    out = torch.empty_like(x) if out is None else out
    rows = x.numel() // hidden if hidden else 0
    if rows == 0:
        return out, residual_out
    block, warps = launch_config(hidden)
    write_residual = residual_out is not None
    res_out = residual_out if write_residual else out  # never written when WRITE_RESIDUAL is False
    key = (*(ptr_key(t) for t in (x, residual, weight, out, res_out)), int_key(hidden))
    _launch(key, rows, (x, residual, weight, out, res_out, hidden, float(eps)),
            {"BLOCK_H": block, "WRITE_RESIDUAL": write_residual}, warps)
    return out, residual_out
