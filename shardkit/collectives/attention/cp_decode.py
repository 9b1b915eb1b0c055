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

The query must have the same shape, dtype and options on every rank (it is replicated); shards
may have any length, zero included. An eager call checks that across ranks first, with the
metadata gather of ring attention (``plan.gather_rows``: one all-gather of a few int64 per rank
and one host synchronisation): a rank whose inputs are bad raises its own error and every other
rank an error naming it, and ranks that disagree (shapes, dtypes, heads, scale, causal or not) all
raise -- nobody hangs in, or aborts inside, the all-gather of the partials. Inside CUDA-graph
capture that check is left out (it reads device memory from the host): nothing else sizes a buffer
by data or synchronises, so the call can be captured; run it eagerly once before capturing (the
usual warm-up), which checks the same shapes.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from ...kernels.attention.chunk import attention_chunk, check_positions, check_qkv
from ...kernels.attention.merge import merge_attention
from .partials import segment_bytes, segment_views, stacked_views
from .plan import DTYPES, agree, all_gather_into, bits, check_softmax_scale, gather_rows, unsorted

__all__ = ["cp_decode_attention", "decode_cache_rank"]

_FIELDS = ("error", "device_cuda", "dtype", "batch", "q_heads", "q_len", "head_dim", "kv_heads", "causal",
           "scale_bits", "unsorted")  # unsorted: filled on the device
_AGREE = (("device_cuda", "the device type of q"), ("dtype", "the dtype of q and the cache"),
          ("batch", "the batch size of q"), ("q_heads", "the number of q heads"),
          ("q_len", "the number of query tokens (q.shape[2])"), ("head_dim", "the head dim"),
          ("kv_heads", "the number of k_cache_shard/v_cache_shard heads"),
          ("causal", "whether q_pos/kv_pos are given"), ("scale_bits", "softmax_scale"))


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
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    error, send, scale, kv_pos_t = None, None, 0.0, None
    try:  # every local check, and this rank's partial, before any communication
        if (q_pos is None) != (kv_pos is None):
            raise ValueError("q_pos and kv_pos must be given together (causal) or both left out")
        check_qkv(q, k_cache_shard, v_cache_shard, names=("k_cache_shard", "v_cache_shard"))
        scale = check_softmax_scale(softmax_scale, q.shape[3])
        if isinstance(kv_pos, torch.Tensor):  # sorted: checked across ranks below, on any device
            kv_pos_t = check_positions("kv_pos", kv_pos, k_cache_shard.shape[2], q.device, must_be_sorted=False)
        send = torch.empty(segment_bytes(tuple(q.shape), q.dtype), dtype=torch.uint8, device=q.device)
        out_r, lse_r = segment_views(send, tuple(q.shape), q.dtype)
        attention_chunk(q, k_cache_shard, v_cache_shard, causal=q_pos is not None, q_pos=q_pos, kv_pos=kv_pos,
                        softmax_scale=scale, out=out_r, lse=lse_r)
    except Exception as e:  # noqa: BLE001 -- whatever stops this rank must stop its peers too
        error = e
    if not (error is None and q.is_cuda and torch.cuda.is_current_stream_capturing()):
        host = {"error": int(error is not None)}
        flag = None
        if error is None:
            B, Hq, n, D = q.shape
            host.update(device_cuda=int(q.is_cuda), dtype=DTYPES.index(q.dtype), batch=B, q_heads=Hq, q_len=n,
                        head_dim=D, kv_heads=k_cache_shard.shape[1], causal=int(q_pos is not None),
                        scale_bits=bits(scale))
            flag = unsorted(kv_pos_t, q.device).to(torch.int64).reshape(1)
        metas = gather_rows(group, _FIELDS, host, flag)
        if error is not None:
            raise error
        agree("cp_decode_attention", metas, _AGREE)
        bad_order = [r for r, m in enumerate(metas) if m["unsorted"]]
        if bad_order:
            raise ValueError(f"cp_decode_attention: kv_pos must be sorted ascending; it is not on rank(s) {bad_order}")
    elif error is not None:
        raise error
    shape = tuple(q.shape)
    if send.numel() == 0:  # no query rows (on every rank: the shapes agree): nothing to gather
        return q.new_empty(shape)
    recv = torch.empty(world * send.numel(), dtype=torch.uint8, device=q.device)
    all_gather_into(recv, send, group=group)
    outs, lses = stacked_views(recv, world, shape, q.dtype)
    out, _ = merge_attention(outs, lses)
    return out
