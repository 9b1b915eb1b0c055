"""Merge partial attention results (out_s, lse_s) computed over disjoint KV sets.

If ``out_s = softmax(S_s) V_s`` and ``lse_s = logsumexp(S_s)`` (natural log, per query
row) for KV sets ``s = 1..S``, the attention over their union is

    M   = max_s lse_s
    w_s = exp(lse_s - M)
    out = sum_s w_s * out_s / sum_s w_s
    lse = M + log(sum_s w_s)

Subtracting the row maximum keeps every exponent <= 0 (no overflow). Rows whose
``lse_s`` are all ``-inf`` (no key visible in any partial) give ``out = 0`` and
``lse = -inf``; a partial with ``lse_s = -inf`` ("saw no key") contributes nothing even if its
``out`` holds garbage (NaN/inf), so partials of fully masked chunks need no clean-up.

NaN propagates ("saw NaN" is not "saw nothing"): a NaN ``lse_s`` makes the merged row's ``out``
and ``lse`` NaN, and a NaN element of an ``out_s`` whose ``lse_s > -inf`` makes that element
of the merged ``out`` NaN -- also when its weight underflows to 0. Rows are told apart by
``sum_s w_s == 0`` (all ``-inf``; NaN is not equal to 0) and partials by ``lse_s == -inf``,
never by ``> 0`` tests, which NaN fails.

Two entry points:
* ``merge_attention_(out, lse, out_other, lse_other)`` -- two-way, in place into
  ``(out, lse)``: the step of ring attention after each received KV chunk.
* ``merge_attention(outs, lses)`` -- N-way into new tensors.

Both compute in fp32 and round once to the output dtype. Every row of ``[B, H, L]`` is
independent, so the kernels flatten the rows and give each program ``BLOCK_R`` rows
times the whole head dim; batch/head/seq indices are recovered per row so that any
strides work (and tiny L, as in decoding, does not waste lanes).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

__all__ = ["merge_attention_", "merge_attention"]


@triton.jit
def _row_offsets(rows, H, L, stride_b, stride_h, stride_l):
    """Element offsets of flattened rows r = (b * H + h) * L + l in a [B, H, L, ...] tensor."""
    rows = rows.to(tl.int64)  # B * H * L * D can exceed 2**31
    l = rows % L
    bh = rows // L
    return (bh // H) * stride_b + (bh % H) * stride_h + l * stride_l


@triton.jit
def _merge2_kernel(
    # out/out_other: [B, H, L, D] (any float dtype, may differ); lse/lse_other: [B, H, L] fp32.
    # (out, lse) are read and then overwritten with the merged result.
    out_ptr, lse_ptr, oth_ptr, loth_ptr,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_lb, stride_lh, stride_ll,
    stride_pb, stride_ph, stride_pl, stride_pd,  # out_other
    stride_qb, stride_qh, stride_ql,  # lse_other
    H, L, R, D,  # heads, seq len, rows = B * H * L, head dim
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid: (cdiv(R, BLOCK_R),). One program = BLOCK_R rows x the whole head dim.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < D)[None, :]

    la_ptrs = lse_ptr + _row_offsets(rows, H, L, stride_lb, stride_lh, stride_ll)
    lb_ptrs = loth_ptr + _row_offsets(rows, H, L, stride_qb, stride_qh, stride_ql)
    oa_ptrs = (out_ptr + _row_offsets(rows, H, L, stride_ob, stride_oh, stride_ol)[:, None]
               + cols[None, :] * stride_od)
    ob_ptrs = (oth_ptr + _row_offsets(rows, H, L, stride_pb, stride_ph, stride_pl)[:, None]
               + cols[None, :] * stride_pd)

    la = tl.load(la_ptrs, mask=row_ok, other=float("-inf"))
    lb = tl.load(lb_ptrs, mask=row_ok, other=float("-inf"))
    m = tl.maximum(la, lb)  # NaN may or may not win (device-dependent): the weights carry it anyway
    m = tl.where(m == float("-inf"), 0.0, m)  # all -inf: weights exp(-inf) = 0, no NaN
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    total = wa + wb
    empty = total == 0.0  # every partial saw no key (a NaN total is not empty)
    inv = 1.0 / tl.where(empty, 1.0, total)

    oa = tl.load(oa_ptrs, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(ob_ptrs, mask=mask, other=0.0).to(tl.float32)
    # tl.where, not w * o: a partial that saw no key must not leak its NaN/inf.
    acc = tl.where((la != float("-inf"))[:, None], oa * (wa * inv)[:, None], 0.0)
    acc += tl.where((lb != float("-inf"))[:, None], ob * (wb * inv)[:, None], 0.0)

    tl.store(oa_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(la_ptrs, tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, total))), mask=row_ok)


@triton.jit
def _merge_n_kernel(
    # outs: [S, B, H, L, D]; lses: [S, B, H, L] fp32; out: [B, H, L, D]; lse: [B, H, L] fp32.
    outs_ptr, lses_ptr, out_ptr, lse_ptr,
    stride_ss, stride_sb, stride_sh, stride_sl, stride_sd,  # outs
    stride_ts, stride_tb, stride_th, stride_tl,  # lses
    stride_ob, stride_oh, stride_ol, stride_od,  # out
    stride_lb, stride_lh, stride_ll,  # lse
    H, L, R, D,  # heads, seq len, rows = B * H * L, head dim
    S: tl.constexpr,  # number of partials (unrolled: it is the world size, a handful)
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < D)[None, :]
    in_off = _row_offsets(rows, H, L, stride_sb, stride_sh, stride_sl)[:, None] + cols[None, :] * stride_sd
    lin_off = _row_offsets(rows, H, L, stride_tb, stride_th, stride_tl)

    # Pass 1: row maximum of the partial lse (tiny loads; pass 2 re-reads them from cache).
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in tl.static_range(S):
        m = tl.maximum(m, tl.load(lses_ptr + s * stride_ts + lin_off, mask=row_ok, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)

    # Pass 2: weighted sum of the outputs.
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(S):
        l = tl.load(lses_ptr + s * stride_ts + lin_off, mask=row_ok, other=float("-inf"))
        w = tl.exp(l - m)
        o = tl.load(outs_ptr + s * stride_ss + in_off, mask=mask, other=0.0).to(tl.float32)
        # Only a partial that saw no key is left out; NaN in l or o goes into the sum.
        acc += tl.where((l != float("-inf"))[:, None], o * w[:, None], 0.0)
        total += w

    empty = total == 0.0
    inv = 1.0 / tl.where(empty, 1.0, total)
    o_ptrs = (out_ptr + _row_offsets(rows, H, L, stride_ob, stride_oh, stride_ol)[:, None]
              + cols[None, :] * stride_od)
    tl.store(o_ptrs, (acc * inv[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    l_ptrs = lse_ptr + _row_offsets(rows, H, L, stride_lb, stride_lh, stride_ll)
    tl.store(l_ptrs, tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, total))), mask=row_ok)


# ----------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_merge2_kernel, InterpretedFunction)


def _blocks(D: int) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): ~4K elements per program on GPU (16 KiB of
    bf16 loads per partial in flight), a few hundred in the interpreter."""
    block_d = triton.next_power_of_2(D)
    per_program = 512 if _interpreting() else 4096
    return max(1, per_program // block_d), block_d, 4


def _check_pair(name_o: str, o: torch.Tensor, name_l: str, l: torch.Tensor) -> None:
    if not isinstance(o, torch.Tensor) or not isinstance(l, torch.Tensor):
        raise TypeError(f"{name_o} and {name_l} must be torch.Tensors")
    if o.dim() != 4:
        raise ValueError(f"{name_o} must be 4-D [batch, heads, seq, head_dim], got shape {list(o.shape)}")
    if o.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name_o} must be float16, bfloat16 or float32, got {o.dtype}")
    if l.dtype != torch.float32:
        raise ValueError(f"{name_l} must be float32, got {l.dtype}")
    if tuple(l.shape) != tuple(o.shape[:3]):
        raise ValueError(f"{name_l} must have shape {list(o.shape[:3])} (the first three dims of "
                         f"{name_o}), got {list(l.shape)}")
    if l.device != o.device:
        raise ValueError(f"{name_l} is on {l.device} but {name_o} is on {o.device}")


def _check_device(t: torch.Tensor, name: str) -> None:
    if not _interpreting() and t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}; without TRITON_INTERPRET=1 the kernel needs CUDA tensors")


def merge_attention_(
    out: torch.Tensor,
    lse: torch.Tensor,
    out_other: torch.Tensor,
    lse_other: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge ``(out_other, lse_other)`` into ``(out, lse)`` in place.

    Args:
        out: ``[B, H, L, D]`` fp16/bf16/fp32, any strides; overwritten with the merged output.
        lse: ``[B, H, L]`` fp32 (natural log); overwritten with the merged log-sum-exp.
        out_other: ``[B, H, L, D]``, any float dtype, same device; not modified.
        lse_other: ``[B, H, L]`` fp32; not modified.

    Returns:
        ``(out, lse)``, the same tensors, for chaining.
    """
    _check_pair("out", out, "lse", lse)
    _check_pair("out_other", out_other, "lse_other", lse_other)
    if tuple(out_other.shape) != tuple(out.shape):
        raise ValueError(f"out_other shape {list(out_other.shape)} must equal out shape {list(out.shape)}")
    if out_other.device != out.device:
        raise ValueError(f"out_other is on {out_other.device} but out is on {out.device}")
    _check_device(out, "out")
    B, H, L, D = out.shape
    R = B * H * L
    if R == 0 or D == 0:
        return out, lse
    block_r, block_d, nw = _blocks(D)
    _merge2_kernel[(triton.cdiv(R, block_r),)](
        out, lse, out_other, lse_other,
        *out.stride(), *lse.stride(), *out_other.stride(), *lse_other.stride(),
        H, L, R, D,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=nw,
    )
    return out, lse


def merge_attention(
    outs: Union[Sequence[torch.Tensor], torch.Tensor],
    lses: Union[Sequence[torch.Tensor], torch.Tensor],
    *,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """N-way merge of partial attention results into new tensors.

    Args:
        outs: ``S`` tensors ``[B, H, L, D]`` (fp16/bf16/fp32, one dtype), or one stacked
            tensor ``[S, B, H, L, D]`` (any strides; no copy). A list is stacked first
            (one copy): pass a stacked tensor on hot paths.
        lses: ``S`` fp32 tensors ``[B, H, L]`` or one stacked ``[S, B, H, L]``.
        out, lse: optional preallocated outputs (``[B, H, L, D]`` of any float dtype,
            ``[B, H, L]`` fp32; any strides). They must not overlap the inputs.

    Returns:
        ``out`` ``[B, H, L, D]`` in the dtype of ``outs`` (contiguous unless given) and
        ``lse`` ``[B, H, L]`` fp32. Inputs are not modified.
    """
    if isinstance(outs, torch.Tensor):
        if outs.dim() != 5:
            raise ValueError(f"outs as a tensor must be 5-D [S, batch, heads, seq, head_dim], got {list(outs.shape)}")
        stacked_o = outs
    else:
        outs = list(outs)
        if not outs:
            raise ValueError("outs must hold at least one partial result")
        for i, o in enumerate(outs):
            if not isinstance(o, torch.Tensor) or o.dim() != 4:
                raise ValueError(f"outs[{i}] must be a 4-D tensor [batch, heads, seq, head_dim]")
            if o.shape != outs[0].shape or o.dtype != outs[0].dtype or o.device != outs[0].device:
                raise ValueError(f"outs[{i}] has shape/dtype/device {list(o.shape)}/{o.dtype}/{o.device}, "
                                 f"expected {list(outs[0].shape)}/{outs[0].dtype}/{outs[0].device} like outs[0]")
        stacked_o = torch.stack(outs)
    if isinstance(lses, torch.Tensor):
        if lses.dim() != 4:
            raise ValueError(f"lses as a tensor must be 4-D [S, batch, heads, seq], got {list(lses.shape)}")
        stacked_l = lses
    else:
        lses = list(lses)
        for i, l in enumerate(lses):
            if not isinstance(l, torch.Tensor) or l.dim() != 3:
                raise ValueError(f"lses[{i}] must be a 3-D tensor [batch, heads, seq]")
            if l.dtype != torch.float32:
                raise ValueError(f"lses[{i}] must be float32, got {l.dtype}")
        if len(lses) != stacked_o.shape[0]:
            raise ValueError(f"lses has {len(lses)} entries but outs has {stacked_o.shape[0]}")
        if any(l.shape != lses[0].shape or l.device != lses[0].device for l in lses):
            raise ValueError("every lses[i] must have the same shape and device")
        stacked_l = torch.stack(lses)
    S = stacked_o.shape[0]
    if S == 0:
        raise ValueError("outs must hold at least one partial result")
    if stacked_l.shape[0] != S:
        raise ValueError(f"lses has {stacked_l.shape[0]} partials but outs has {S}")
    if stacked_o.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"outs must be float16, bfloat16 or float32, got {stacked_o.dtype}")
    if stacked_l.dtype != torch.float32:
        raise ValueError(f"lses must be float32, got {stacked_l.dtype}")
    if tuple(stacked_l.shape) != tuple(stacked_o.shape[:4]):
        raise ValueError(f"lses must have shape {list(stacked_o.shape[:4])} (outs without head_dim), "
                         f"got {list(stacked_l.shape)}")
    if stacked_l.device != stacked_o.device:
        raise ValueError(f"lses are on {stacked_l.device} but outs are on {stacked_o.device}")
    _check_device(stacked_o, "outs")

    _, B, H, L, D = stacked_o.shape
    if out is None:
        out = torch.empty((B, H, L, D), dtype=stacked_o.dtype, device=stacked_o.device)
    if lse is None:
        lse = torch.empty((B, H, L), dtype=torch.float32, device=stacked_o.device)
    _check_pair("out", out, "lse", lse)
    if tuple(out.shape) != (B, H, L, D) or out.device != stacked_o.device:
        raise ValueError(f"out must have shape {[B, H, L, D]} on {stacked_o.device}, got "
                         f"{list(out.shape)} on {out.device}")
    R = B * H * L
    if R == 0 or D == 0:
        return out, lse
    block_r, block_d, nw = _blocks(D)
    _merge_n_kernel[(triton.cdiv(R, block_r),)](
        stacked_o, stacked_l, out, lse,
        *stacked_o.stride(), *stacked_l.stride(), *out.stride(), *lse.stride(),
        H, L, R, D,
        S=S, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=nw,
    )
    return out, lse
