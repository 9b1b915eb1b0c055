"""Context-parallel decode: the KV cache sharded over the group, the decode query replicated.

During decode every rank holds the same query ``[B, Hq, n, D]`` (``n`` = 1, or a few tokens
for speculative decoding) and a shard of the KV cache. Each rank attends the query to its
shard (``attention_chunk``: partial ``out`` and ``lse``), the partials are all-gathered (out
and lse packed in one byte buffer, one collective; see ``attention_partials``) and merged
exactly (``merge_attention``, in rank order, so every rank gets bitwise the same output).

Placement: the prefill leaves the prompt's KV in the load-balanced layout of
``shardkit.collectives.attention.sharding``; every token generated afterwards is appended to the cache
of rank ``decode_cache_rank(position, world)`` (round-robin), so the shards stay balanced
within one token.

Nothing here reads device memory from the host or sizes a buffer by data: a call can be
captured in a CUDA graph. The query must have the same shape, dtype and options on every
rank (it is replicated); shards may have any length, zero included.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from ...kernels.attention.chunk import attention_chunk, check_qkv
from ...kernels.attention.merge import merge_attention
from .partials import segment_bytes, segment_views, stacked_views

__all__ = ["cp_decode_attention", "decode_cache_rank"]

# torch >= 2.13 renames all_gather_into_tensor to all_gather_single (the device image has 2.11).
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def decode_cache_rank(token_index: int, world: int) -> int:
    """The rank whose KV-cache shard stores the token at global position ``token_index``.

    Round-robin (``token_index mod world``): consecutive generated tokens land on consecutive
    ranks, so every shard grows by one token every ``world`` steps.
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if isinstance(token_index, bool) or not isinstance(token_index, int) or token_index < 0:
        raise ValueError(f"token_index must be a non-negative int, got {token_index!r}")
    return token_index % world


def cp_decode_attention(
    q: torch.Tensor,
    k_cache_shard: torch.Tensor,
    v_cache_shard: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    q_pos: Union[int, torch.Tensor, None] = None,
    kv_pos: Union[int, torch.Tensor, None] = None,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of a replicated decode query to a KV cache sharded over ``group``.

    Args:
        q: ``[B, Hq, n, D]`` fp16/bf16/fp32, the same on every rank (``n`` small: 1 for plain
            decode, a few for speculative decoding).
        k_cache_shard, v_cache_shard: ``[B, Hkv, L_r, D]``, this rank's cached keys/values
            (the new tokens' KV already appended on their ranks); ``Hq % Hkv == 0``.
        group: the context-parallel process group (default: the world).
        q_pos, kv_pos: global positions of the query rows and of this rank's cached tokens
            (``int`` or int tensor ``[n]`` / ``[L_r]``, ``kv_pos`` sorted ascending). Give both
            for a causal mask (needed when ``n > 1``: the draft tokens must not see each
            other's future); give neither and every query sees every cached key.
        softmax_scale: multiplies the scores; default ``1 / sqrt(D)``.

    Returns:
        ``out`` ``[B, Hq, n, D]`` in q's dtype, bitwise the same on every rank. Inputs are not
        modified.
    """
    if (q_pos is None) != (kv_pos is None):
        raise ValueError("q_pos and kv_pos must be given together (causal) or both left out")
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    # Local checks only: a cross-rank check would cost a host synchronisation per token. A rank
    # whose inputs are rejected raises here; its peers then wait in the all-gather until the
    # group's timeout.
    check_qkv(q, k_cache_shard, v_cache_shard, names=("k_cache_shard", "v_cache_shard"))
    shape = tuple(q.shape)
    seg = segment_bytes(shape, q.dtype)
    send = torch.empty(seg, dtype=torch.uint8, device=q.device)
    out_r, lse_r = segment_views(send, shape, q.dtype)
    # attention_chunk checks the positions before any communication.
    attention_chunk(q, k_cache_shard, v_cache_shard, causal=q_pos is not None, q_pos=q_pos, kv_pos=kv_pos,
                    softmax_scale=softmax_scale, out=out_r, lse=lse_r)
    recv = torch.empty(world * seg, dtype=torch.uint8, device=q.device)
    _all_gather_into(recv, send, group=group)
    outs, lses = stacked_views(recv, world, shape, q.dtype)
    out, _ = merge_attention(outs, lses)
    return out
