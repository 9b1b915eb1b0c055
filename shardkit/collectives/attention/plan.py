"""Ring attention's plan: local input checks, the metadata all-gather that lets every rank check
the inputs together and size what it receives, the variant choice, and which rows of a chunk pair
see which keys (``pair_block``). Everything here is identical on every rank after the gather.

The metadata gather itself (``gather_rows``: one small all-gather of an int64 row per rank; ``agree``:
the same ValueError on every rank when a rank rejected its inputs or the ranks differ) also serves
CP decode: a collective whose ranks disagree must fail on every rank, never hang or abort."""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ...kernels.attention.chunk import check_positions, check_qkv
from ...kernels.attention.sdpa import LOCAL_BACKENDS, sdpa_backends
from .sharding import chunk_bounds
from .variant import RingCosts, choose_variant_by_model

VARIANTS = ("pass_kv", "pass_q", "auto")
PASS_Q_MISS_RATE = 0.05
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
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


def check_softmax_scale(softmax_scale, head_dim: int) -> float:
    """The scale of the scores: ``softmax_scale`` (None or a finite number) or ``1 / sqrt(head_dim)``."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be None or a finite float, got {softmax_scale!r}")
    return float(softmax_scale)


@dataclass
class LocalInputs:
    """This rank's validated inputs: the new-token chunk and, with a cache, the cached chunk."""

    q_pos: Optional[torch.Tensor]          # [Lq] int64, None = default layout or not causal
    kv_pos: Optional[torch.Tensor]         # [Lk] int64
    cache_pos: Optional[torch.Tensor]      # [Lc] int64
    has_pos: bool
    scale: float                           # softmax_scale, or its default


def check_inputs(q, k, v, k_cache, v_cache, q_pos, kv_pos, cache_pos, causal, variant,
                  softmax_scale, pass_q_threshold, local_backend) -> LocalInputs:
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
    scale = check_softmax_scale(softmax_scale, q.shape[3])
    if not (isinstance(pass_q_threshold, (int, float)) and 0.0 <= pass_q_threshold <= 1.0):
        raise ValueError(f"pass_q_threshold must be a miss rate in [0, 1], got {pass_q_threshold!r}")
    if cache_pos is not None and k_cache is None:
        raise ValueError("cache_pos was given without k_cache/v_cache")
    if not causal:  # positions only matter for the causal mask
        return LocalInputs(None, None, None, False, scale)
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
        return LocalInputs(None, None, None, False, scale)
    return LocalInputs(
        _positions("q_pos", q_pos, q.shape[2], q.device),
        _positions("kv_pos", kv_pos, k.shape[2], q.device),
        _positions("cache_pos", cache_pos, k_cache.shape[2], q.device) if k_cache is not None else None,
        True, scale)


# ----------------------------------------------------------------------------------
# The metadata all-gather: every rank learns every rank's sizes, options and position extremes
# ----------------------------------------------------------------------------------

# torch >= 2.13 renames all_gather_into_tensor to all_gather_single (the device image has 2.11).
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def bits(x: float) -> int:
    """The bits of a float64 as an int64 (floats travel in the int64 metadata row exactly)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _meta_device(group) -> torch.device:
    # NCCL moves only CUDA tensors; gloo (and mixed "cpu:gloo,cuda:nccl" groups) takes CPU ones.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(group, fields: Sequence[str], host: Dict[str, int],
                device_values: Optional[torch.Tensor] = None) -> List[Dict[str, int]]:
    """Every rank's metadata, as one dict per rank: one all-gather of an int64 row per rank and one host
    synchronisation to read it. Call it on every rank of ``group`` together, also on a rank whose
    inputs are bad (it sends ``error = 1``), so that nobody waits for a peer that gave up.

    ``host``: the values known on the host (fields left out are 0). ``device_values``: int64 values
    computed on the device (e.g. from position tensors: nothing is read back before the gather),
    filling the last ``len(device_values)`` fields.
    """
    dev = _meta_device(group)
    row = torch.tensor([int(host.get(f, 0)) for f in fields], dtype=torch.int64, device=dev)
    if device_values is not None:
        row[len(fields) - device_values.numel():] = device_values.to(dev)
    world = dist.get_world_size(group)
    gathered = torch.empty(world * len(fields), dtype=torch.int64, device=dev)
    all_gather_into(gathered, row, group=group)
    return [dict(zip(fields, r)) for r in gathered.view(world, len(fields)).tolist()]


def agree(op: str, metas: List[Dict[str, int]], checks: Sequence[Tuple[str, str]]) -> None:
    """Raise the same ValueError on every rank when a rank rejected its inputs (its ``error`` field; that
    rank raises its own error instead) or the ranks' values of a field differ. ``checks``: ``(field,
    what the message calls it)``."""
    bad = [r for r, m in enumerate(metas) if m["error"]]
    if bad:
        raise ValueError(f"{op}: rank(s) {bad} rejected their inputs (see the error raised there); "
                         "no rank went on")
    for field, what in checks:
        values = [m[field] for m in metas]
        if len(set(values)) > 1:
            raise ValueError(f"{op}: {what} must be the same on every rank; per rank: {values}")


_FIELDS = ("error", "device_cuda", "dtype", "batch", "q_heads", "kv_heads", "head_dim", "causal",
           "variant", "scale_bits", "threshold_bits", "model_tflops_bits", "model_gbps_bits", "has_cache", "has_pos",
           "q_len", "kv_len", "cache_len",
           # Filled on the device from the position tensors (no host synchronisation before the gather).
           "q_pos_max", "kv_pos_min", "cache_pos_min", "unsorted")
_AGREE = (("device_cuda", "the device type of q"), ("dtype", "the dtype of q, k and v"),
          ("batch", "the batch size"), ("q_heads", "the number of q heads"),
          ("kv_heads", "the number of k/v heads"), ("head_dim", "the head dim"),
          ("causal", "causal"), ("variant", "variant"), ("scale_bits", "softmax_scale"),
          ("threshold_bits", "pass_q_threshold"),
          ("model_tflops_bits", "the ring cost model (thresholds.json ring_model)"),
          ("model_gbps_bits", "the ring cost model (thresholds.json ring_model)"),
          ("has_cache", "whether k_cache/v_cache are given"),
          ("has_pos", "whether q_pos/kv_pos(/cache_pos) are given"))


def unsorted(p: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A flag on the device (no host synchronisation): ``p`` (1-D positions, or None) is not sorted ascending."""
    if p is None or p.numel() < 2:
        return torch.zeros((), dtype=torch.bool, device=device)
    return (p[1:] < p[:-1]).any()


def gather_meta(group, error: bool, q, k, k_cache, local: Optional[LocalInputs], causal, variant,
                threshold, costs: Optional[RingCosts]) -> List[dict]:
    host = {"error": int(error)}
    dyn = None
    if not error:
        B, Hq, Lq, D = q.shape
        host.update(device_cuda=int(q.device.type == "cuda"), dtype=DTYPES.index(q.dtype), batch=B, q_heads=Hq,
                    kv_heads=k.shape[1], head_dim=D, causal=int(causal), variant=VARIANTS.index(variant),
                    scale_bits=bits(local.scale), threshold_bits=bits(threshold),
                    has_cache=int(k_cache is not None), has_pos=int(local.has_pos), q_len=Lq, kv_len=k.shape[2],
                    cache_len=k_cache.shape[2] if k_cache is not None else 0)
        if costs is not None:
            host.update(model_tflops_bits=bits(costs.attention_tflops), model_gbps_bits=bits(costs.p2p_gbps))
        if local.has_pos:
            def extreme(p: Optional[torch.Tensor], fn, empty: int) -> torch.Tensor:
                if p is None or p.numel() == 0:
                    return torch.full((), empty, dtype=torch.int64, device=q.device)
                return fn(p)

            dyn = torch.stack([extreme(local.q_pos, torch.max, -_NONE), extreme(local.kv_pos, torch.min, _NONE),
                               extreme(local.cache_pos, torch.min, _NONE),
                               (unsorted(local.kv_pos, q.device) | unsorted(local.cache_pos, q.device)).to(torch.int64)])
    return gather_rows(group, _FIELDS, host, dyn)


@dataclass
class Plan:
    """What every rank knows after the metadata gather (identical on every rank)."""

    world: int
    variant: str
    q_len: List[int]          # per rank
    kv_len: List[int]
    cache_len: List[int]
    q_pos_max: List[int]      # per rank; for the skip test of chunk pairs (causal only)
    kv_pos_min: List[int]
    cache_pos_min: List[int]


def make_plan(metas: List[dict], causal: bool, has_cache: bool, threshold: float,
          costs: Optional[RingCosts] = None) -> Plan:
    world = len(metas)
    agree("ring_attention", metas, _AGREE)
    q_len = [m["q_len"] for m in metas]
    kv_len = [m["kv_len"] for m in metas]
    cache_len = [m["cache_len"] for m in metas]
    T, P = sum(q_len), sum(cache_len)
    if causal and metas[0]["has_pos"]:
        bad_order = [r for r, m in enumerate(metas) if m["unsorted"]]
        if bad_order:
            raise ValueError(f"ring_attention: kv_pos and cache_pos must be sorted ascending; "
                             f"they are not on rank(s) {bad_order}")
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
                f"(shardkit.collectives.attention.sharding.shard) of the {T} new tokens, i.e. {expect_new} tokens per "
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
                                           DTYPES[m["dtype"]].itemsize, costs, causal)
                   if costs is not None else choose_variant(T, P, pass_q_threshold=threshold))
    return Plan(world, variant, q_len, kv_len, cache_len, q_max, kv_min, cache_min)


def _lb_extent(seq_len: int, rank: int, world: int) -> Tuple[int, int, int]:
    """(length, first position, last position) of ``rank``'s load-balanced shard (0, -1, -1 if empty)."""
    bounds = chunk_bounds(seq_len, world)
    (a0, a1), (b0, b1) = bounds[rank], bounds[2 * world - 1 - rank]
    n = (a1 - a0) + (b1 - b0)
    first = a0 if a1 > a0 else b0
    last = b1 - 1 if b1 > b0 else a1 - 1
    return (n, first, last) if n else (0, -1, -1)


# ----------------------------------------------------------------------------------
# One chunk pair: which rows see which keys, and the local kernel that computes it
# ----------------------------------------------------------------------------------

@dataclass
class LocalKernel:
    """How this rank computes its chunk pairs."""

    backend: str               # "triton", or an SDPA backend of sdpa_with_lse
    layout_known: bool         # the load-balanced default layout: every pair is one block


def pair_block(plan: Plan, kernel: LocalKernel, causal: bool, q_owner: int, kv_owner: int,
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
