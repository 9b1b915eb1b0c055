"""Ring attention over a context-parallel group: pass-KV, pass-Q, and the choice between them.

Context parallelism (CP) splits the sequence over the ``W`` ranks of a group; every rank holds
the queries, keys and values of its tokens (``[B, H, L_local, D]``), and the ranks exchange
tensors so that every query still attends to the keys of the whole sequence. Two exact
variants (Meta, "Context Parallelism for Scalable Million-Token Inference", arXiv 2411.01783):

* **pass-KV**: queries stay; the K/V shard (with its global positions) travels around the ring
  for ``W - 1`` steps. At step ``s`` rank ``r`` holds the KV of rank ``(r - s) mod W``, attends
  its queries to it (``attention_chunk``) and merges the partial result into its running
  ``(out, lse)`` (``merge_attention_``, in place, fp32 accumulator). The transfer for step
  ``s + 1`` is posted before the compute of step ``s`` and waited for after it: NCCL runs P2P
  on its own internal CUDA stream, which waits for the compute stream only at the moment the
  transfer is posted, so the transfer overlaps the compute (on gloo the transfer runs in
  gloo's threads). Double buffering keeps a receive from overwriting the KV being computed on.
* **pass-Q**: K/V stay; the queries (with positions) travel around the ring. Rank ``r``
  computes the partial ``(out, lse)`` of every visiting query block against its own KV and
  writes it into the segment of a send buffer destined for the queries' owner; one
  ``all_to_all_single`` returns all partials to their owners (out and lse packed in the same
  bytes, see ``attention_partials``), which merge them N-way (``merge_attention``).
  Pass-Q moves ``Hq`` query heads instead of ``2 * Hkv`` kv heads per token, plus the
  all-to-all; it wins when the queries are few next to the keys, i.e. when most of the
  context is already in a KV cache.
* **auto**: pass-KV unless the KV-cache miss rate ``T / (T + P)`` (``T`` new tokens, ``P``
  cached tokens, summed over the group) is below ``pass_q_threshold``. By default that is the
  crossover ``bench/ring_attention_bench.py --write-thresholds`` measured for this GPU and group
  size (``thresholds.json``; 35% on 2×H200 and 4×H200 at 128K tokens); where none was
  measured, Meta's cost model (Algorithms 1 and 5, ``ring_variant``) decides with the GPU's
  measured attention and transfer rates; without those, ``PASS_Q_MISS_RATE`` = 5%, Meta's
  figure for H100 hosts. Without a cache the miss rate is 1: the threshold rules pick pass-KV.

Partial prefill with a KV cache: pass ``k_cache``/``v_cache`` (this rank's shard of the ``P``
cached tokens, ``[B, Hkv, P_local, D]``) and ``cache_pos``; the new tokens' queries attend to
all cached keys and all new keys, causally by global position. The cache is never copied:
cache and new keys are attended as two chunks and merged.

Position contract (causal attention needs the global position of every token):

* pass **all** positions that apply -- ``q_pos`` and ``kv_pos`` (and ``cache_pos`` with a
  cache), each an ``int`` (position of the first token, the shard then being contiguous) or an
  integer tensor ``[L_local]``; ``kv_pos`` and ``cache_pos`` sorted ascending -- for any
  layout, uneven shards included; or
* pass **none**: the shards must then be the load-balanced layout of
  ``shardkit.collectives.attention.sharding`` (``shard(x, rank, W)``) of the concatenated new tokens
  (``q``, ``k`` and ``v`` shards of equal length), and, with a cache, of the cached tokens,
  which precede the new ones (new token ``t`` sits at position ``P + t``). The sequence
  length is the sum of the local lengths, so shards of ``seq_len`` not divisible by ``2 W``
  are fine. Shard lengths that are not that layout raise a ValueError naming
  ``q_pos``/``kv_pos``.

Without ``causal`` positions are ignored and shard lengths are free.

Every call starts with one small all-gather of each rank's shapes, dtypes, options and
position extremes (and one host synchronisation to read it). It lets every rank size the
buffers it receives, skip chunk pairs that a causal mask hides entirely (without computing
them), pick the same variant, and check the inputs *together*: a rank whose inputs are bad
raises its own error, the others raise an error naming it -- nobody waits forever for a peer
that gave up. A call is therefore not CUDA-graph capturable (prefill rarely is; see
``cp_decode_attention`` for the capturable decode path).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ...kernels.attention.chunk import attention_chunk
from ...kernels.attention.merge import merge_attention, merge_attention_
from ...kernels.attention.sdpa import sdpa_backends, sdpa_with_lse
from ... import thresholds
from .partials import segment_bytes, segment_views, stacked_views
from .plan import (PASS_Q_MISS_RATE, VARIANTS, LocalKernel, Plan, Positions, check_inputs, choose_variant,
                   gather_meta, make_plan, pair_block)
from .sharding import shard_positions
from .transport import ring_pass
from .variant import RingCosts

__all__ = ["ring_attention", "choose_variant", "PASS_Q_MISS_RATE", "VARIANTS"]


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _attend(q, k, v, q_pos, kv_pos, block: Tuple[int, int, str], causal: bool, scale: float,
            backend: str, out: torch.Tensor, lse: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """Partial attention of one chunk pair: ``(row0, out, lse)`` for the query rows ``row0:``.

    The Triton kernel writes all rows into ``out``/``lse`` (masking by position; row0 = 0);
    an SDPA backend returns new tensors for the block's rows.
    """
    row0, n_keys, mask = block
    if backend == "triton" or mask == "positions":
        attention_chunk(q, k, v, causal=causal, q_pos=q_pos, kv_pos=kv_pos, softmax_scale=scale,
                        out=out, lse=lse)
        return 0, out, lse
    o, l = sdpa_with_lse(q[:, :, row0:], k[:, :, :n_keys], v[:, :, :n_keys], causal=mask == "diagonal",
                         softmax_scale=scale, backend=backend)
    return row0, o, l


# ----------------------------------------------------------------------------------
# pass-KV
# ----------------------------------------------------------------------------------

def _pass_kv(q, parts, q_pos, plan: Plan, rank: int, group, causal: bool, scale: float,
             kernel: LocalKernel) -> torch.Tensor:
    """``parts``: this rank's KV chunks ``[(k, v, pos)]`` (cache first, then new tokens)."""
    W = plan.world
    B, Hq, Lq, D = q.shape
    Hkv = parts[0][0].shape[1]
    is_cache = [True, False][-len(parts):]

    def shapes(src: int) -> List[Tuple[int, ...]]:
        # The tensors that travel for rank src's KV: per part (cache, new) k, v and, if causal, positions.
        lens = [plan.cache_len[src], plan.kv_len[src]][-len(parts):]
        out = []
        for n in lens:
            out += [(B, Hkv, n, D), (B, Hkv, n, D)] + ([(n,)] if causal else [])
        return out

    per_part = 3 if causal else 2
    local = [t.contiguous() for (k, v, pos) in parts for t in ((k, v, pos) if causal else (k, v))]
    acc = torch.zeros((B, Hq, Lq, D), dtype=torch.float32, device=q.device)
    acc_lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float32, device=q.device)
    part_o = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    part_l = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)

    for src, current in ring_pass(local, shapes, W, rank, group):
        for i, cache in enumerate(is_cache):
            block = pair_block(plan, kernel, causal, rank, src, cache)
            if block is None:
                continue
            kc, vc = current[i * per_part], current[i * per_part + 1]
            row0, o, l = _attend(q, kc, vc, q_pos, current[i * per_part + 2] if causal else None, block,
                                 causal, scale, kernel.backend, part_o, part_l)
            merge_attention_(acc[:, :, row0:], acc_lse[:, :, row0:], o, l)
    return acc if q.dtype == torch.float32 else acc.to(q.dtype)


# ----------------------------------------------------------------------------------
# pass-Q
# ----------------------------------------------------------------------------------

def _pass_q(q, parts, q_pos, plan: Plan, rank: int, group, causal: bool, scale: float,
            kernel: LocalKernel) -> torch.Tensor:
    W = plan.world
    B, Hq, Lq, D = q.shape
    is_cache = [True, False][-len(parts):]

    def shapes(src: int) -> List[Tuple[int, ...]]:
        return [(B, Hq, plan.q_len[src], D)] + ([(plan.q_len[src],)] if causal else [])

    local = [q.contiguous()] + ([q_pos] if causal else [])

    # Send buffer: one segment per query owner, in rank order (the all-to-all's input splits).
    seg = [segment_bytes((B, Hq, plan.q_len[r], D), q.dtype) for r in range(W)]
    offsets = [sum(seg[:r]) for r in range(W)]
    send = torch.empty(sum(seg), dtype=torch.uint8, device=q.device)
    tmp_o = torch.empty(B * Hq * max(plan.q_len) * D, dtype=q.dtype, device=q.device)
    tmp_l = torch.empty(B * Hq * max(plan.q_len), dtype=torch.float32, device=q.device)

    for src, current in ring_pass(local, shapes, W, rank, group):
        q_src, q_src_pos = current[0], (current[1] if causal else None)
        out_s, lse_s = segment_views(send[offsets[src]:offsets[src] + seg[src]], (B, Hq, plan.q_len[src], D),
                                     q.dtype)
        written = False
        for (k, v, pos), cache in zip(parts, is_cache):
            block = pair_block(plan, kernel, causal, src, rank, cache)
            if block is None:
                continue
            if not written:  # the first partial goes straight into the segment
                row0, o, l = _attend(q_src, k, v, q_src_pos, pos, block, causal, scale, kernel.backend,
                                     out_s, lse_s)
                if o is not out_s:
                    out_s[:, :, :row0].zero_()
                    lse_s[:, :, :row0].fill_(float("-inf"))
                    out_s[:, :, row0:].copy_(o)
                    lse_s[:, :, row0:].copy_(l)
                written = True
            else:
                o_buf, l_buf = tmp_o[:out_s.numel()].view(out_s.shape), tmp_l[:lse_s.numel()].view(lse_s.shape)
                row0, o, l = _attend(q_src, k, v, q_src_pos, pos, block, causal, scale, kernel.backend,
                                     o_buf, l_buf)
                merge_attention_(out_s[:, :, row0:], lse_s[:, :, row0:], o, l)
        if not written:  # nothing of this rank is visible to those queries: weight 0 in the merge
            out_s.zero_()
            lse_s.fill_(float("-inf"))

    own = segment_bytes((B, Hq, Lq, D), q.dtype)
    recv = torch.empty(W * own, dtype=torch.uint8, device=q.device)
    dist.all_to_all_single(recv, send, output_split_sizes=[own] * W, input_split_sizes=seg, group=group)
    outs, lses = stacked_views(recv, W, (B, Hq, Lq, D), q.dtype)
    out, _ = merge_attention(outs, lses)
    return out


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------

def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    variant: str = "auto",
    causal: bool = True,
    q_pos: Positions = None,
    kv_pos: Positions = None,
    k_cache: Optional[torch.Tensor] = None,
    v_cache: Optional[torch.Tensor] = None,
    cache_pos: Positions = None,
    softmax_scale: Optional[float] = None,
    pass_q_threshold: Optional[float] = None,
    local_backend: str = "auto",
) -> torch.Tensor:
    """Exact attention of this rank's queries to the keys of every rank of ``group``.

    Call it on every rank of the group together (same options, same order).

    Args:
        q: ``[B, Hq, Lq, D]`` fp16/bf16/fp32, this rank's new tokens' queries; D in
            ``SUPPORTED_HEAD_DIMS`` (16, 32, 64, 128). CUDA tensors with NCCL, CPU tensors with
            gloo (``TRITON_INTERPRET=1``).
        k, v: ``[B, Hkv, Lk, D]``, the new tokens' keys/values, same dtype and device;
            ``Hq % Hkv == 0`` (grouped-query attention).
        group: the context-parallel process group (default: the world).
        variant: ``"pass_kv"``, ``"pass_q"`` or ``"auto"`` (``choose_variant`` on the group's
            token counts; pass-KV without a cache).
        causal: causal mask by global positions (key visible iff its position <= the query's).
        q_pos, kv_pos: global positions of this rank's queries / new keys: an ``int`` (first
            position of a contiguous shard) or an int32/int64 tensor ``[Lq]`` / ``[Lk]``;
            ``kv_pos`` sorted ascending. Give all positions or none (module docstring).
        k_cache, v_cache: ``[B, Hkv, Lc, D]``, this rank's shard of the cached keys/values
            (partial prefill); the new queries attend to all cached and all new keys.
        cache_pos: global positions ``[Lc]`` of the cached tokens (sorted ascending), or int.
        softmax_scale: multiplies the scores; default ``1 / sqrt(D)``.
        pass_q_threshold: KV-cache miss rate below which ``"auto"`` picks pass-Q. Default: the
            crossover measured for this GPU and group size, else Meta's cost model with this GPU's
            measured rates (``shardkit.collectives.attention.variant``), else ``PASS_Q_MISS_RATE`` (5%);
            see ``thresholds.ring_variant_rule``.
        local_backend: the kernel of each chunk pair: ``"triton"`` (shardkit's
            ``attention_chunk``), ``"flash"`` or ``"cudnn"`` (torch's SDPA kernels with the LSE,
            ``sdpa_with_lse``; on CPU "flash" is torch's CPU flash kernel), or ``"auto"``: the
            faster one measured for this GPU (``thresholds.chunk_backend``), the Triton kernel on
            CPU. The SDPA kernels know no positions: with explicit ``q_pos``/``kv_pos`` and
            ``causal`` the pairs that need a position mask use the Triton kernel.

    Returns:
        ``out`` ``[B, Hq, Lq, D]`` in q's dtype (new, contiguous). Inputs are not modified.
        Every rank gets the output of its own queries; query rows that see no key are 0.

    Raises:
        ValueError / TypeError naming the argument, on every rank, when any rank's inputs are
        bad or the ranks disagree (shapes, dtypes, options, shard layout).
    """
    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device_name = torch.cuda.get_device_name(q.device) if isinstance(q, torch.Tensor) and q.is_cuda else "cpu"
    costs = None
    if pass_q_threshold is None:
        pass_q_threshold, rates = thresholds.ring_variant_rule(device_name, world)
        costs = RingCosts(**rates) if rates is not None else None
    local, error = None, None
    try:
        local = check_inputs(q, k, v, k_cache, v_cache, q_pos, kv_pos, cache_pos, causal, variant,
                              softmax_scale, pass_q_threshold, local_backend)
    except (TypeError, ValueError) as e:
        error = e
    metas = gather_meta(group, error is not None, q, k, k_cache, local, causal, variant, pass_q_threshold, costs)
    if error is not None:
        raise error
    has_cache = k_cache is not None
    plan = make_plan(metas, causal, has_cache, pass_q_threshold, costs)

    q_p, kv_p, cache_p = local.q_pos, local.kv_pos, local.cache_pos
    if causal and not local.has_pos:  # the default load-balanced layout (checked by make_plan)
        T, P = sum(plan.q_len), sum(plan.cache_len)
        q_p = kv_p = P + shard_positions(T, rank, world, device=q.device, dtype=torch.int64)
        cache_p = shard_positions(P, rank, world, device=q.device, dtype=torch.int64) if has_cache else None
    parts = ([(k_cache, v_cache, cache_p)] if has_cache else []) + [(k, v, kv_p)]
    if local_backend == "auto":
        local_backend = thresholds.chunk_backend(device_name, sdpa_backends(q.device, q.dtype))
    kernel = LocalKernel(local_backend, layout_known=not (causal and local.has_pos))
    if kernel.backend != "triton":  # torch's kernels need a unit stride in the head dim (Triton's take any)
        q = _unit_last_stride(q)
        parts = [(_unit_last_stride(kp), _unit_last_stride(vp), pos) for kp, vp, pos in parts]
    fn = _pass_kv if plan.variant == "pass_kv" else _pass_q
    return fn(q, parts, q_p, plan, rank, group, causal, local.scale, kernel)
