"""torch.ops.shardkit.attention_chunk / merge_attention: the attention kernels as torch custom ops.

No autograd (inference ops). The fake implementations give torch.compile the output shapes and
dtypes without running a kernel; the real ones allocate only their outputs and make no host
synchronisation, so they can be captured in CUDA graphs.

Op schemas cannot take ``int | Tensor``, so the positions of ``attention_chunk`` are split into
an optional tensor (``q_pos`` / ``kv_pos``) and an int start (``q_start`` / ``kv_start``, used
when the tensor is absent), and ``merge_attention`` takes the partials stacked in one tensor.
"""
from typing import Optional, Tuple

import torch

from ..kernels.attention import chunk as _chunk
from ..kernels.attention import merge as _merge


@torch.library.custom_op("shardkit::attention_chunk", mutates_args=())
def attention_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    q_pos: Optional[torch.Tensor] = None,
    kv_pos: Optional[torch.Tensor] = None,
    q_start: int = 0,
    kv_start: int = 0,
    softmax_scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] fp32)`` of q against k/v ``[B, Hkv, Lk, D]``.

    Causal masking by global positions: ``q_pos`` / ``kv_pos`` (int tensors ``[Lq]`` / ``[Lk]``,
    ``kv_pos`` sorted) or, where absent, contiguous positions from ``q_start`` / ``kv_start``.
    See ``shardkit.kernels.attention.chunk``.
    """
    return _chunk.attention_chunk(
        q, k, v, causal=causal,
        q_pos=q_pos if q_pos is not None else q_start,
        kv_pos=kv_pos if kv_pos is not None else kv_start,
        softmax_scale=softmax_scale)


@attention_chunk.register_fake
def _(q, k, v, causal=False, q_pos=None, kv_pos=None, q_start=0, kv_start=0, softmax_scale=None):
    B, Hq, Lq, D = q.shape
    return q.new_empty((B, Hq, Lq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32)


@torch.library.custom_op("shardkit::merge_attention", mutates_args=())
def merge_attention(outs: torch.Tensor, lses: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """N-way merge of stacked partials ``outs [S, B, H, L, D]``, ``lses [S, B, H, L]`` fp32.

    Returns ``(out [B, H, L, D] in outs' dtype, lse [B, H, L] fp32)``; see
    ``shardkit.kernels.attention.merge``.
    """
    return _merge.merge_attention(outs, lses)


@merge_attention.register_fake
def _(outs, lses):
    _, B, H, L, D = outs.shape
    return outs.new_empty((B, H, L, D)), outs.new_empty((B, H, L), dtype=torch.float32)
