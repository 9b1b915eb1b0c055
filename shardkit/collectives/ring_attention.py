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
  ``shardkit.collectives.sharding`` (``shard(x, rank, W)``) of the concatenated new tokens
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

import math
import struct
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ..kernels.attention_chunk import attention_chunk, check_positions, check_qkv
from ..kernels.attention_merge import merge_attention, merge_attention_
from ..kernels.attention_sdpa import LOCAL_BACKENDS, sdpa_backends, sdpa_with_lse
from .attention_partials import segment_bytes, segment_views, stacked_views
from . import thresholds
from .ring_variant import RingCosts, choose_variant_by_model
from .sharding import chunk_bounds, shard_positions

__all__ = ["ring_attention", "choose_variant", "PASS_Q_MISS_RATE", "VARIANTS"]

VARIANTS = ("pass_kv", "pass_q", "auto")
PASS_Q_MISS_RATE = 0.05
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NONE = 2 ** 62  # position extreme of an empty chunk: "after everything" / "before nothing"

Positions = Union[int, torch.Tensor, None]


def choose_variant(new_tokens: int, cached_tokens: int, *,
                   pass_q_threshold: float = PASS_Q_MISS_RATE) -> str:
    """Meta's pass-KV / pass-Q rule: ``"pass_q"`` if ``T / (T + P) < pass_q_threshold``.

    Args:
        new_tokens: ``T``, new tokens of the prefill over the whole group.
        cached_tokens: ``P``, tokens already in the KV cache over the whole group.
        pass_q_threshold: the KV-cache miss rate below which pass-Q is faster.

    Returns:
        ``"pass_q"`` or ``"pass_kv"``.
    """
    if new_tokens < 0 or cached_tokens < 0:
        raise ValueError(f"token counts must be >= 0, got new_tokens={new_tokens}, cached_tokens={cached_tokens}")
    total = new_tokens + cached_tokens
    miss_rate = new_tokens / total if total else 1.0
    return "pass_q" if miss_rate < pass_q_threshold else "pass_kv"


# ----------------------------------------------------------------------------------
# Local input checks
# ----------------------------------------------------------------------------------

def _positions(name: str, pos: Positions, length: int, device: torch.device) -> torch.Tensor:
    """``pos`` as an int64 tensor ``[length]`` (an int means ``pos + arange(length)``)."""
    if isinstance(pos, bool) or not isinstance(pos, (int, torch.Tensor)):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(pos).__name__}")
    if isinstance(pos, int):
        return torch.arange(pos, pos + length, dtype=torch.int64, device=device)
    # int64 on every rank: a receiver sizes its buffer before it sees the sender's tensor.
    return check_positions(name, pos, length, device, must_be_sorted=False).to(torch.int64).contiguous()


@dataclass
class _Local:
    """This rank's validated inputs: the new-token chunk and, with a cache, the cached chunk."""

    q_pos: Optional[torch.Tensor]          # [Lq] int64, None = default layout or not causal
    kv_pos: Optional[torch.Tensor]         # [Lk] int64
    cache_pos: Optional[torch.Tensor]      # [Lc] int64
    has_pos: bool


def _check_inputs(q, k, v, k_cache, v_cache, q_pos, kv_pos, cache_pos, causal, variant,
                  softmax_scale, pass_q_threshold, local_backend) -> _Local:
    check_qkv(q, k, v)
    if (k_cache is None) != (v_cache is None):
        raise ValueError("k_cache and v_cache must be given together")
    if k_cache is not None:
        check_qkv(q, k_cache, v_cache, names=("k_cache", "v_cache"))
        if k_cache.shape[1] != k.shape[1]:
            raise ValueError(f"k_cache has {k_cache.shape[1]} heads but k has {k.shape[1]}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if local_backend not in ("auto",) + LOCAL_BACKENDS:
        raise ValueError(f"local_backend must be 'auto' or one of {LOCAL_BACKENDS}, got {local_backend!r}")
    if local_backend not in ("auto", "triton") and local_backend not in sdpa_backends(q.device, q.dtype):
        raise ValueError(f"local_backend {local_backend!r} is not available for {q.dtype} on {q.device} "
                         f"with this torch (available: {('triton',) + sdpa_backends(q.device, q.dtype)})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be None or a finite float, got {softmax_scale!r}")
    if not (isinstance(pass_q_threshold, (int, float)) and 0.0 <= pass_q_threshold <= 1.0):
        raise ValueError(f"pass_q_threshold must be a miss rate in [0, 1], got {pass_q_threshold!r}")
    if cache_pos is not None and k_cache is None:
        raise ValueError("cache_pos was given without k_cache/v_cache")
    if not causal:  # positions only matter for the causal mask
        return _Local(None, None, None, False)
    names = ["q_pos", "kv_pos"] + (["cache_pos"] if k_cache is not None else [])
    given = {"q_pos": q_pos, "kv_pos": kv_pos, "cache_pos": cache_pos}
    missing = [n for n in names if given[n] is None]
    if len(missing) not in (0, len(names)):
        raise ValueError(f"pass all of {names} or none of them (none: the load-balanced layout); "
                         f"missing: {missing}")
    if missing:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"without q_pos/kv_pos, q and k must hold the same tokens, but q has "
                             f"{q.shape[2]} and k has {k.shape[2]}: pass q_pos and kv_pos")
        return _Local(None, None, None, False)
    return _Local(
        _positions("q_pos", q_pos, q.shape[2], q.device),
        _positions("kv_pos", kv_pos, k.shape[2], q.device),
        _positions("cache_pos", cache_pos, k_cache.shape[2], q.device) if k_cache is not None else None,
        True)


# ----------------------------------------------------------------------------------
# The metadata all-gather: every rank learns every rank's sizes, options and position extremes
# ----------------------------------------------------------------------------------

_FIELDS = ("error", "device_cuda", "dtype", "batch", "q_heads", "kv_heads", "head_dim", "causal",
           "variant", "scale_bits", "threshold_bits", "model_tflops_bits", "model_gbps_bits", "has_cache", "has_pos",
           "q_len", "kv_len", "cache_len",
           # Filled on the device from the position tensors (no host synchronisation before the gather).
           "q_pos_max", "kv_pos_min", "cache_pos_min", "unsorted")
_F = {name: i for i, name in enumerate(_FIELDS)}


# torch >= 2.13 renames all_gather_into_tensor to all_gather_single (the device image has 2.11).
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _meta_device(group) -> torch.device:
    # NCCL moves only CUDA tensors; gloo (and mixed "cpu:gloo,cuda:nccl" groups) takes CPU ones.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_meta(group, world: int, error: bool, q, k, k_cache, local: Optional[_Local], causal, variant,
                 scale, threshold, costs: Optional[RingCosts]) -> List[dict]:
    dev = _meta_device(group)
    row = [0] * len(_FIELDS)
    row[_F["error"]] = int(error)
    if not error:
        B, Hq, Lq, D = q.shape
        row[_F["device_cuda"]] = int(q.device.type == "cuda")
        row[_F["dtype"]] = _DTYPES.index(q.dtype)
        row[_F["batch"]], row[_F["q_heads"]], row[_F["kv_heads"]], row[_F["head_dim"]] = B, Hq, k.shape[1], D
        row[_F["causal"]] = int(causal)
        row[_F["variant"]] = VARIANTS.index(variant)
        row[_F["scale_bits"]] = _bits(scale)
        row[_F["threshold_bits"]] = _bits(threshold)
        if costs is not None:
            row[_F["model_tflops_bits"]] = _bits(costs.attention_tflops)
            row[_F["model_gbps_bits"]] = _bits(costs.p2p_gbps)
        row[_F["has_cache"]] = int(k_cache is not None)
        row[_F["has_pos"]] = int(local.has_pos)
        row[_F["q_len"]], row[_F["kv_len"]] = Lq, k.shape[2]
        row[_F["cache_len"]] = k_cache.shape[2] if k_cache is not None else 0
    meta = torch.tensor(row, dtype=torch.int64, device=dev)
    if not error and local.has_pos:
        def extreme(p: Optional[torch.Tensor], fn, empty: int) -> torch.Tensor:
            if p is None or p.numel() == 0:
                return torch.full((), empty, dtype=torch.int64, device=q.device)
            return fn(p)

        def unsorted(p: Optional[torch.Tensor]) -> torch.Tensor:
            if p is None or p.numel() < 2:
                return torch.zeros((), dtype=torch.bool, device=q.device)
            return (p[1:] < p[:-1]).any()

        dyn = torch.stack([extreme(local.q_pos, torch.max, -_NONE), extreme(local.kv_pos, torch.min, _NONE),
                           extreme(local.cache_pos, torch.min, _NONE),
                           (unsorted(local.kv_pos) | unsorted(local.cache_pos)).to(torch.int64)])
        meta[_F["q_pos_max"]:] = dyn.to(dev)
    gathered = torch.empty(world * len(_FIELDS), dtype=torch.int64, device=dev)
    _all_gather_into(gathered, meta, group=group)
    rows = gathered.view(world, len(_FIELDS)).tolist()  # the one host synchronisation of a call
    return [dict(zip(_FIELDS, r)) for r in rows]


def _agree(metas: List[dict], field: str, what: str) -> None:
    values = [m[field] for m in metas]
    if len(set(values)) > 1:
        raise ValueError(f"ring_attention: {what} must be the same on every rank; per rank: {values}")


@dataclass
class _Plan:
    """What every rank knows after the metadata gather (identical on every rank)."""

    world: int
    variant: str
    q_len: List[int]          # per rank
    kv_len: List[int]
    cache_len: List[int]
    q_pos_max: List[int]      # per rank; for the skip test of chunk pairs (causal only)
    kv_pos_min: List[int]
    cache_pos_min: List[int]


def _plan(metas: List[dict], causal: bool, has_cache: bool, threshold: float,
          costs: Optional[RingCosts] = None) -> _Plan:
    world = len(metas)
    bad = [r for r, m in enumerate(metas) if m["error"]]
    if bad:
        raise ValueError(f"ring_attention: rank(s) {bad} rejected their inputs (see the error raised there); "
                         "no rank started the ring")
    for field, what in (("device_cuda", "the device type of q"), ("dtype", "the dtype of q, k and v"),
                        ("batch", "the batch size"), ("q_heads", "the number of q heads"),
                        ("kv_heads", "the number of k/v heads"), ("head_dim", "the head dim"),
                        ("causal", "causal"), ("variant", "variant"), ("scale_bits", "softmax_scale"),
                        ("threshold_bits", "pass_q_threshold"),
                        ("model_tflops_bits", "the ring cost model (thresholds.json ring_model)"),
                        ("model_gbps_bits", "the ring cost model (thresholds.json ring_model)"),
                        ("has_cache", "whether k_cache/v_cache are given"),
                        ("has_pos", "whether q_pos/kv_pos(/cache_pos) are given")):
        _agree(metas, field, what)
    q_len = [m["q_len"] for m in metas]
    kv_len = [m["kv_len"] for m in metas]
    cache_len = [m["cache_len"] for m in metas]
    T, P = sum(q_len), sum(cache_len)
    if causal and metas[0]["has_pos"]:
        unsorted = [r for r, m in enumerate(metas) if m["unsorted"]]
        if unsorted:
            raise ValueError(f"ring_attention: kv_pos and cache_pos must be sorted ascending; "
                             f"they are not on rank(s) {unsorted}")
        q_max = [m["q_pos_max"] for m in metas]
        kv_min = [m["kv_pos_min"] for m in metas]
        cache_min = [m["cache_pos_min"] for m in metas]
    elif causal:
        new = [_lb_extent(T, r, world) for r in range(world)]
        cached = [_lb_extent(P, r, world) for r in range(world)]
        expect_new, expect_cache = [n for n, _, _ in new], [n for n, _, _ in cached]
        if q_len != expect_new or kv_len != expect_new:
            raise ValueError(
                f"ring_attention: without q_pos/kv_pos the shards must be the load-balanced layout "
                f"(shardkit.collectives.sharding.shard) of the {T} new tokens, i.e. {expect_new} tokens per "
                f"rank, but q has {q_len} and k has {kv_len}; pass q_pos and kv_pos (global token "
                f"positions) for any other layout")
        if has_cache and cache_len != expect_cache:
            raise ValueError(
                f"ring_attention: without cache_pos the cache shards must be the load-balanced layout of "
                f"the {P} cached tokens, i.e. {expect_cache} tokens per rank, but k_cache has {cache_len}; "
                f"pass q_pos, kv_pos and cache_pos for any other layout")
        q_max = [P + last if n else -_NONE for n, _, last in new]
        kv_min = [P + first if n else _NONE for n, first, _ in new]
        cache_min = [first if n else _NONE for n, first, _ in cached]
    else:
        q_max, kv_min, cache_min = [_NONE] * world, [-_NONE] * world, [-_NONE] * world  # nothing is skipped
    variant = VARIANTS[metas[0]["variant"]]
    if variant == "auto":  # T and P are the group's totals: every rank picks the same variant
        m = metas[0]
        variant = (choose_variant_by_model(T, P, world, m["q_heads"], m["kv_heads"], m["head_dim"],
                                           _DTYPES[m["dtype"]].itemsize, costs, causal)
                   if costs is not None else choose_variant(T, P, pass_q_threshold=threshold))
    return _Plan(world, variant, q_len, kv_len, cache_len, q_max, kv_min, cache_min)


def _lb_extent(seq_len: int, rank: int, world: int) -> Tuple[int, int, int]:
    """(length, first position, last position) of ``rank``'s load-balanced shard (0, -1, -1 if empty)."""
    bounds = chunk_bounds(seq_len, world)
    (a0, a1), (b0, b1) = bounds[rank], bounds[2 * world - 1 - rank]
    n = (a1 - a0) + (b1 - b0)
    first = a0 if a1 > a0 else b0
    last = b1 - 1 if b1 > b0 else a1 - 1
    return (n, first, last) if n else (0, -1, -1)


# ----------------------------------------------------------------------------------
# Ring transfers
# ----------------------------------------------------------------------------------

def _post_ring(send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], nxt: int, prv: int,
               group) -> list:
    """Send ``send`` to global rank ``nxt`` and receive ``recv`` from ``prv``, asynchronously.

    Empty tensors are left out on both sides (their sizes are known to both from the
    metadata gather), so zero-byte messages never reach the backend.
    """
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in send if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, prv, group) for t in recv if t.numel()]
    return dist.batch_isend_irecv(ops) if ops else []


def _views(bufs: List[torch.Tensor], shapes: List[Tuple[int, ...]]) -> List[torch.Tensor]:
    """Contiguous views of the leading elements of flat buffers, shaped as ``shapes``."""
    return [b[:math.prod(s)].view(s) for b, s in zip(bufs, shapes)]


def _ring_pass(local: List[torch.Tensor], shapes: Callable[[int], List[Tuple[int, ...]]], world: int, rank: int,
               group) -> Iterator[Tuple[int, List[torch.Tensor]]]:
    """Pass this rank's tensors around the ring: yields ``(src, tensors of rank src)`` for the
    ``world`` steps, starting with our own (``src = rank``).

    ``shapes(src)`` gives the shapes of rank ``src``'s tensors (known to every rank from the
    metadata gather). The transfer for the next step is posted before each yield and waited for
    after the caller's compute, so the two overlap; two sets of receive buffers, each slot as large
    as the largest rank's tensor, keep a receive from overwriting what is being computed on.
    """
    nxt, prv = dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)
    bufs = []
    if world > 1:
        max_numel = [max(math.prod(shapes(r)[i]) for r in range(world)) for i in range(len(local))]
        bufs = [[torch.empty(n, dtype=t.dtype, device=t.device) for n, t in zip(max_numel, local)]
                for _ in range(2)]
    current = local
    for step in range(world):
        src = (rank - step) % world
        reqs, incoming = [], None
        if step < world - 1:
            incoming = _views(bufs[(step + 1) % 2], shapes((src - 1) % world))
            reqs = _post_ring(current, incoming, nxt, prv, group)
        yield src, current
        for r in reqs:
            r.wait()
        if incoming is not None:
            current = incoming


# ----------------------------------------------------------------------------------
# One chunk pair: which rows see which keys, and the local kernel that computes it
# ----------------------------------------------------------------------------------

@dataclass
class _LocalKernel:
    """How this rank computes its chunk pairs."""

    backend: str               # "triton", or an SDPA backend of sdpa_with_lse
    layout_known: bool         # the load-balanced default layout: every pair is one block


def _pair_block(plan: _Plan, kernel: _LocalKernel, causal: bool, q_owner: int, kv_owner: int,
                is_cache: bool) -> Optional[Tuple[int, int, str]]:
    """What the queries of ``q_owner`` see of one KV chunk of ``kv_owner`` (its cache or its new tokens).

    Returns None when no query sees any key (the pair is skipped), else ``(row0, n_keys, mask)``:
    query rows ``row0:`` see keys ``:n_keys`` with ``mask`` "none" (all of them) or "diagonal"
    (the square causal block), and rows ``:row0`` see nothing; or mask "positions" (any other
    pattern: the Triton kernel masks by global position, rows and keys all passed).

    In the load-balanced layout (rank r holds chunks A_r = r and B_r = 2W-1-r of the new tokens,
    after all cached tokens) every pair is one block: the cache is seen by all new queries; a
    rank's own tokens form the causal diagonal; for an earlier rank s < r all queries see A_s and
    none sees B_s (B_s > B_r); for a later rank s > r only the rows of B_r see anything, and they
    see all of A_s and B_s (the ring-flash-attn "zigzag" observation).
    """
    lq = plan.q_len[q_owner]
    lk = (plan.cache_len if is_cache else plan.kv_len)[kv_owner]
    if lq == 0 or lk == 0:
        return None
    if not causal:
        return 0, lk, "none"
    lo = (plan.cache_pos_min if is_cache else plan.kv_pos_min)[kv_owner]
    if lo > plan.q_pos_max[q_owner]:
        return None  # every key after every query
    if not kernel.layout_known:
        return 0, lk, "positions"
    if is_cache:
        return 0, lk, "none"
    if q_owner == kv_owner:
        return 0, lk, "diagonal"
    bounds = chunk_bounds(sum(plan.q_len), plan.world)
    if kv_owner < q_owner:
        n = bounds[kv_owner][1] - bounds[kv_owner][0]
        return (0, n, "none") if n else None
    row0 = bounds[q_owner][1] - bounds[q_owner][0]
    return (row0, lk, "none") if row0 < lq else None


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

def _pass_kv(q, parts, q_pos, plan: _Plan, rank: int, group, causal: bool, scale: float,
             kernel: _LocalKernel) -> torch.Tensor:
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

    for src, current in _ring_pass(local, shapes, W, rank, group):
        for i, cache in enumerate(is_cache):
            block = _pair_block(plan, kernel, causal, rank, src, cache)
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

def _pass_q(q, parts, q_pos, plan: _Plan, rank: int, group, causal: bool, scale: float,
            kernel: _LocalKernel) -> torch.Tensor:
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

    for src, current in _ring_pass(local, shapes, W, rank, group):
        q_src, q_src_pos = current[0], (current[1] if causal else None)
        out_s, lse_s = segment_views(send[offsets[src]:offsets[src] + seg[src]], (B, Hq, plan.q_len[src], D),
                                     q.dtype)
        written = False
        for (k, v, pos), cache in zip(parts, is_cache):
            block = _pair_block(plan, kernel, causal, src, rank, cache)
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
            measured rates (``shardkit.collectives.ring_variant``), else ``PASS_Q_MISS_RATE`` (5%);
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
        pass_q_threshold, costs = thresholds.ring_variant_rule(device_name, world)
    local, error = None, None
    try:
        local = _check_inputs(q, k, v, k_cache, v_cache, q_pos, kv_pos, cache_pos, causal, variant,
                              softmax_scale, pass_q_threshold, local_backend)
    except (TypeError, ValueError) as e:
        error = e
    scale = (1.0 / math.sqrt(q.shape[3])) if error is None and softmax_scale is None else (softmax_scale or 0.0)
    metas = _gather_meta(group, world, error is not None, q, k, k_cache, local, causal, variant, scale,
                         pass_q_threshold, costs)
    if error is not None:
        raise error
    has_cache = k_cache is not None
    plan = _plan(metas, causal, has_cache, pass_q_threshold, costs)

    q_p, kv_p, cache_p = local.q_pos, local.kv_pos, local.cache_pos
    if causal and not local.has_pos:  # the default load-balanced layout (checked by _plan)
        T, P = sum(plan.q_len), sum(plan.cache_len)
        q_p = kv_p = P + shard_positions(T, rank, world, device=q.device, dtype=torch.int64)
        cache_p = shard_positions(P, rank, world, device=q.device, dtype=torch.int64) if has_cache else None
    parts = ([(k_cache, v_cache, cache_p)] if has_cache else []) + [(k, v, kv_p)]
    if local_backend == "auto":
        local_backend = thresholds.chunk_backend(device_name, sdpa_backends(q.device, q.dtype))
    kernel = _LocalKernel(local_backend, layout_known=not (causal and local.has_pos))
    fn = _pass_kv if plan.variant == "pass_kv" else _pass_q
    return fn(q, parts, q_p, plan, rank, group, causal, float(scale), kernel)
