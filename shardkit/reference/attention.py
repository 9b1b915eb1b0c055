"""Plain-torch float64 references for the attention kernels (used by tests and benchmarks).

Nothing here is fast: every function materialises the full score matrix in float64.
They follow the same conventions as the kernels:

* layout ``[batch, heads, seq, head_dim]``; grouped-query attention by repeating kv heads;
* causal masking by global positions: query ``i`` sees key ``j`` iff ``kv_pos[j] <= q_pos[i]``;
  positions are an ``int`` (position of row 0, contiguous rows) or an integer tensor;
* log-sum-exp in natural log; rows that see no key get ``out = 0`` and ``lse = -inf``;
* NaN reaches exactly what attends to it: ``lse`` (and every column of ``out``) of a row is NaN when its
  query or a key it sees holds NaN; column ``d`` of ``out`` is NaN when a value it sees holds NaN in
  column ``d``. NaN in keys/values hidden by the causal mask changes nothing. A merge weighs a partial
  with ``lse = -inf`` by exactly 0 (its ``out`` is ignored) and propagates every other NaN.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["positions", "reference_attention", "reference_merge"]


def positions(pos: Union[int, torch.Tensor, None], length: int, device=None) -> torch.Tensor:
    """Global positions as an int64 tensor ``[length]``: ``pos`` if a tensor, else ``pos + arange``."""
    if isinstance(pos, torch.Tensor):
        return pos.to(device=device, dtype=torch.int64)
    return torch.arange(length, device=device, dtype=torch.int64) + (pos or 0)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    q_pos: Union[int, torch.Tensor, None] = None,
    kv_pos: Union[int, torch.Tensor, None] = None,
    softmax_scale: Optional[float] = None,
    dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention with log-sum-exp, computed in ``dtype`` (float64 by default).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0``.
        causal, q_pos, kv_pos, softmax_scale: as in ``attention_chunk``.
        dtype: compute and output dtype (float32 lets a GPU benchmark check big slices).

    Returns:
        ``out`` ``[B, Hq, Lq, D]`` and ``lse`` ``[B, Hq, Lq]``, both in ``dtype``.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    if Hq != Hkv:
        kd = kd.repeat_interleave(Hq // Hkv, dim=1)
        vd = vd.repeat_interleave(Hq // Hkv, dim=1)
    # An fp32 reference on GPU must not silently use TF32 (10-bit mantissa) matmuls.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        s = torch.matmul(qd, kd.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
        seen = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
        if causal:
            qp = positions(q_pos, Lq, q.device)
            kp = positions(kv_pos, Lk, q.device)
            seen = kp[None, :] <= qp[:, None]
            s = s.masked_fill(~seen, float("-inf"))  # NaN scores of hidden keys go too
        lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no visible key, NaN if a seen score is
        shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # NaN rows stay NaN
        p = torch.exp(s - shift[..., None])
        # 0 * NaN would carry a NaN value to the rows the mask hides its key from: multiply clean
        # values and put NaN back where a seen value holds it (a count of seen NaN per column).
        v_nan = torch.isnan(vd)
        out = torch.matmul(p, vd.masked_fill(v_nan, 0.0))  # rows with no key: exp(-inf) = 0 -> 0
        out = out.masked_fill(torch.matmul(seen.to(dtype), v_nan.to(dtype)) > 0, float("nan"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out, lse


def reference_merge(
    outs: Union[Sequence[torch.Tensor], torch.Tensor],
    lses: Union[Sequence[torch.Tensor], torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention results in float64.

    Args:
        outs: ``S`` tensors ``[B, H, L, D]`` (or one stacked ``[S, B, H, L, D]``).
        lses: ``S`` tensors ``[B, H, L]`` (or stacked ``[S, B, H, L]``), natural log.

    Returns:
        ``out = sum_s out_s * exp(lse_s - lse)`` and ``lse = logsumexp_s(lse_s)`` in float64;
        rows where every ``lse_s`` is ``-inf`` give ``out = 0``, ``lse = -inf``; a NaN ``lse_s``
        makes the row NaN, a NaN in ``out_s`` (``lse_s > -inf``) its element.
    """
    o = torch.stack([t.double() for t in outs]) if not isinstance(outs, torch.Tensor) else outs.double()
    l = torch.stack([t.double() for t in lses]) if not isinstance(lses, torch.Tensor) else lses.double()
    lse = torch.logsumexp(l, dim=0)  # NaN if any lse_s is NaN
    shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(l - shift[None])  # [S, B, H, L]
    # A partial with lse = -inf (no key seen) contributes nothing, whatever its out holds; any other
    # partial contributes w * out, NaN included (also when w underflows to 0).
    contrib = torch.where(torch.isneginf(l)[..., None], torch.zeros_like(o), w[..., None] * o)
    return contrib.sum(0), lse
