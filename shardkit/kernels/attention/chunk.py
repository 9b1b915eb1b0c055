"""Forward attention of one query chunk against one KV chunk, returning (out, lse).

This is the building block of ring attention (pass-KV / pass-Q): every rank attends
its local queries to one KV chunk at a time and merges the partial results with
``shardkit.kernels.attention.merge``. The kernel therefore returns, next to the
normalised output, the log-sum-exp (natural log) of every query row's scores, which
is what a merge needs.

Causal masking is decided by *global* token positions, not by row indices, so that a
chunk can sit anywhere in the sequence (and can be made of two non-contiguous pieces,
as in the load-balanced layout of ``shardkit.collectives.attention.sharding``). Query row ``i``
may see key ``j`` iff ``kv_pos[j] <= q_pos[i]``.

Positions are given either as an ``int`` (the global position of row 0; the chunk is
then contiguous) or as an integer tensor of shape ``[Lq]`` / ``[Lk]``. A ``kv_pos``
tensor must be non-decreasing (sorted ascending) -- true for contiguous chunks and for
load-balanced shards -- because the kernel binary-searches it to skip KV tiles that no
query row of a tile can see. ``q_pos`` may be in any order.

Layout: ``[batch, heads, seq, head_dim]`` with any strides; grouped-query attention
(``Hq`` a multiple of ``Hkv``; q head ``h`` reads kv head ``h // (Hq // Hkv)``).

Rows that see no key at all get ``lse = -inf`` and ``out = 0`` (never NaN), so that
merging them with other partials is exact.

NaN reaches exactly the rows that attend to it, as ``shardkit.reference.attention`` defines: a
NaN in a row's query or in a key it sees makes the row's ``out`` and ``lse`` NaN (a row that saw
NaN is told apart from one that saw nothing by ``l == 0``, not ``l > 0``); a NaN value makes
column ``d`` of the rows that see its key NaN. NaN in keys and values that the causal mask hides
changes nothing. This is torch SDPA's behaviour for NaN that a row attends to; for hidden NaN torch
depends on the backend (its math kernel adds the mask, -inf + NaN = NaN, so a hidden NaN key
poisons every row; its flash kernels drop hidden keys but let a hidden NaN value reach the rows
of the same tile through 0 * NaN), and none of that is copied here.

Structure (Triton-tutorial style): the kernel, then the launcher ``attention_chunk``;
the float64 reference lives in ``shardkit.reference.attention``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

__all__ = ["attention_chunk", "check_qkv", "check_positions", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

_LOG2E = 1.4426950408889634  # log2(e): scores are kept in base 2 so the kernel can use exp2
_LN2 = 0.6931471805599453  # ln(2): converts the base-2 log-sum-exp back to natural log


@triton.jit
def _count_visible(x, kv_pos_ptr, kv_start, Lk, HAS_KV_POS: tl.constexpr):
    """Number of keys whose position is <= x (keys are sorted ascending by position).

    Without a position tensor the keys sit at kv_start + arange(Lk), so the count is
    arithmetic; with one it is a binary search over the sorted kv_pos (about log2(Lk)
    scalar loads per program, negligible next to one KV tile).
    """
    if HAS_KV_POS:
        # tl.full, not Lk * 0: Triton turns an int argument equal to 1 into a
        # constexpr, and a while-loop carry must keep one type.
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0, tl.int32) + Lk
        while lo < hi:
            mid = (lo + hi) // 2
            p = tl.load(kv_pos_ptr + mid)
            go_right = p <= x
            lo = tl.where(go_right, mid + 1, lo)
            hi = tl.where(go_right, hi, mid)
        return lo
    else:
        n = x - kv_start + 1
        n = tl.minimum(tl.maximum(n, 0), Lk)
        return n.to(tl.int32)


@triton.jit
def _attn_tile(
    acc, l_i, m_i, q, q_pos, start_n,
    k_base, v_base, kv_pos_ptr, kv_start,
    stride_kn, stride_kd, stride_vn, stride_vd,
    Lk, qk_scale, offs_n, offs_d,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_POS: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with the KV tile starting at start_n.

    MASKED=False is the fast path: the tile lies inside [0, Lk) and every key is
    visible to every row, so loads and scores need no mask. MASKED=True handles the
    tail tile and the tiles on the causal diagonal.
    """
    cols = start_n + offs_n
    k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd  # [D, BLOCK_N]
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BLOCK_N, D]
    if MASKED:
        in_range = cols < Lk
        k = tl.load(k_ptrs, mask=in_range[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if DOT_FP32:
        # fp32 inputs, or bf16 in the interpreter (where bf16 tl.dot is wrong):
        # IEEE fp32 dot, never TF32.
        s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
    if MASKED:
        visible = in_range[None, :]
        if CAUSAL:
            if HAS_KV_POS:
                k_pos = tl.load(kv_pos_ptr + cols, mask=in_range, other=0)
            else:
                k_pos = kv_start + cols
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))  # a hidden NaN key's score goes too
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead
    # keeps exp2(-inf - (-inf)) = NaN out of alpha and p (both become 0).
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    p = tl.math.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED and CAUSAL:
        # In the dot, p = 0 times a NaN value would reach the rows the mask hides its key from.
        # Zero NaN values and set NaN where a row sees one: keys are sorted by position, so a row
        # sees a prefix of the tile's keys, and column d of row i is hit iff the row sees more
        # keys than the first NaN of column d. (Diagonal and tail tiles only.)
        v_nan = v != v
        v = tl.where(v_nan, tl.zeros_like(v), v)
        first_nan = tl.min(tl.where(v_nan, offs_n[:, None], BLOCK_N), 0)  # [D]
        n_seen = tl.sum(visible.to(tl.int32), 1)  # [BLOCK_M]
        acc = tl.where(n_seen[:, None] > first_nan[None, :], float("nan"), acc)
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, q, q_pos,
    k_base, v_base, kv_pos_ptr, kv_start,
    stride_kn, stride_kd, stride_vn, stride_vd,
    Lk, qk_scale, lo, hi,
    offs_n, offs_d,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_POS: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Apply ``_attn_tile`` to the KV tiles starting at lo, lo + BLOCK_N, ... < hi."""
    if INTERPRET:
        # The Triton 3.6 interpreter cannot run range() with runtime bounds under
        # numpy >= 2.4 (scalars are 1-element arrays and int() of them fails); a while
        # loop works there. On GPU keep the for loop: only it is software-pipelined.
        start_n = lo
        while start_n < hi:
            acc, l_i, m_i = _attn_tile(
                acc, l_i, m_i, q, q_pos, start_n, k_base, v_base, kv_pos_ptr, kv_start,
                stride_kn, stride_kd, stride_vn, stride_vd, Lk, qk_scale, offs_n, offs_d,
                MASKED, CAUSAL, HAS_KV_POS, DOT_FP32, BLOCK_N)
            start_n += BLOCK_N
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _attn_tile(
                acc, l_i, m_i, q, q_pos, start_n, k_base, v_base, kv_pos_ptr, kv_start,
                stride_kn, stride_kd, stride_vn, stride_vd, Lk, qk_scale, offs_n, offs_d,
                MASKED, CAUSAL, HAS_KV_POS, DOT_FP32, BLOCK_N)
    return acc, l_i, m_i


@triton.jit
def _attention_chunk_kernel(
    # Tensors. q: [B, Hq, Lq, D], k/v: [B, Hkv, Lk, D], out: [B, Hq, Lq, D] (q's dtype),
    # lse: [B, Hq, Lq] fp32, q_pos: [Lq] int, kv_pos: [Lk] int (sorted ascending).
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, q_pos_ptr, kv_pos_ptr,
    # Strides, in elements, of every tensor above (lse and out may be any layout too).
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    # Sizes: query heads, Hq // Hkv (GQA group size), query and key lengths.
    Hq, GROUP, Lq, Lk,
    # Global positions of row 0 when q_pos / kv_pos tensors are absent.
    q_start, kv_start,
    # softmax_scale * log2(e): scores are computed in base 2 so that exp2 can be used.
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_Q_POS: tl.constexpr, HAS_KV_POS: tl.constexpr,
    # DOT_FP32: do the dots in IEEE fp32 (fp32 inputs; bf16 in the interpreter).
    # INTERPRET: running under TRITON_INTERPRET=1 (selects interpreter-safe loops).
    DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr,
):
    # Grid: (cdiv(Lq, BLOCK_M), B * Hq). One program = BLOCK_M query rows of one head.
    pid_m = tl.program_id(0)
    if CAUSAL:
        # Later query tiles usually see more keys: start them first so that the short
        # early tiles fill the tail of the launch instead of the long ones.
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // Hq).to(tl.int64)  # int64: batch * stride may exceed 2**31
    off_h = (pid_bh % Hq).to(tl.int64)
    off_hkv = off_h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq

    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    k_base = k_ptr + off_b * stride_kb + off_hkv * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hkv * stride_vh

    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # KV range this tile must visit. Keys [0, n_all) are visible to every row of the
    # tile, keys [n_any, Lk) to none, the ones in between need the per-element mask.
    if CAUSAL:
        if HAS_Q_POS:
            q_pos = tl.load(q_pos_ptr + offs_m, mask=row_ok, other=0)
        else:
            q_pos = q_start + offs_m
        # Padding rows must not widen the range: min/max over real rows only.
        q_lo = tl.min(tl.where(row_ok, q_pos, tl.max(q_pos, 0)), 0)
        q_hi = tl.max(tl.where(row_ok, q_pos, tl.min(q_pos, 0)), 0)
        n_all = _count_visible(q_lo, kv_pos_ptr, kv_start, Lk, HAS_KV_POS)
        n_any = _count_visible(q_hi, kv_pos_ptr, kv_start, Lk, HAS_KV_POS)
    else:
        q_pos = offs_m  # unused
        n_all = Lk
        n_any = Lk
    full_end = (n_all // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, q_pos, k_base, v_base, kv_pos_ptr, kv_start,
        stride_kn, stride_kd, stride_vn, stride_vd, Lk, qk_scale, 0, full_end,
        offs_n, offs_d, False, CAUSAL, HAS_KV_POS, DOT_FP32, BLOCK_N, INTERPRET)
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, q_pos, k_base, v_base, kv_pos_ptr, kv_start,
        stride_kn, stride_kd, stride_vn, stride_vd, Lk, qk_scale, full_end, n_any,
        offs_n, offs_d, True, CAUSAL, HAS_KV_POS, DOT_FP32, BLOCK_N, INTERPRET)

    # Rows that saw no key: l_i == 0. They get out = 0 and lse = -inf instead of 0/0. A row
    # that saw NaN has l_i = NaN (not > 0, but not == 0 either): its out and lse stay NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)

    o_ptrs = (out_ptr + off_b * stride_ob + off_h * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    l_ptrs = lse_ptr + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm
    tl.store(l_ptrs, lse, mask=row_ok)


# ----------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------

def _interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (CPU execution)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_attention_chunk_kernel, InterpretedFunction)


def _default_config(head_dim: int, dtype: torch.dtype, interpret: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim and dtype.

    GPU fp16/bf16: 128 x 64 tiles, 8 warps (two warpgroups of wgmma on Hopper), 3 stages,
    as in the Triton flash-attention tutorial; checked with ptxas for sm_90: no register
    spills for d=64 and d=128 (4 warps spill at d=64), 128-129 KiB of shared memory at
    d=128. GPU fp32 (IEEE dots, no tensor cores, a checking path): small tiles that fit
    shared memory with few spills. Interpreter: tiny tiles, because programs run serially
    in numpy and tests must stay fast while crossing several tile boundaries.
    """
    if interpret:
        return 16, 16, 1, 1
    if dtype == torch.float32:
        return 32, 32, 4, 1
    return 128, 64, 8, 3


def check_positions(name: str, pos: Union[int, torch.Tensor, None], length: int,
                    device: torch.device, must_be_sorted: bool) -> Optional[torch.Tensor]:
    """Validate a position argument (None, an int start, or an int32/int64 tensor ``[length]`` on
    ``device``); returns the tensor, or None for None/int."""
    if pos is None or isinstance(pos, int):
        return None
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(pos).__name__}")
    if pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32 or int64 tensor, got {pos.dtype}")
    if pos.dim() != 1 or pos.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {list(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device} but q is on {device}")
    # Checking the order of a GPU tensor would synchronise the host; only do it on CPU.
    if must_be_sorted and pos.device.type == "cpu" and length > 1:
        if bool((pos[1:] < pos[:-1]).any()):
            raise ValueError(f"{name} must be non-decreasing (sorted ascending)")
    return pos.contiguous()


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: Tuple[str, str] = ("k", "v")) -> None:
    """Validate a (q, k, v) chunk triple: 4-D ``[B, H, L, D]``, one float dtype and device,
    matching batch and head dim, ``v`` shaped as ``k``, q heads a multiple of kv heads, and a
    head dim in ``SUPPORTED_HEAD_DIMS``. ``names``: how errors call k and v (e.g. a cache's).
    Raises TypeError/ValueError naming the argument."""
    k_name, v_name = names
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {list(t.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in ((k_name, k), (v_name, v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    B, Hq, _, D = q.shape
    Bk, Hkv, _, Dk = k.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q head_dim (last dim) must be one of {SUPPORTED_HEAD_DIMS}, got {D}")
    if Bk != B:
        raise ValueError(f"{k_name} batch {Bk} does not match q batch {B}")
    if Dk != D:
        raise ValueError(f"{k_name} head_dim {Dk} does not match q head_dim {D}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{v_name} shape {list(v.shape)} must equal {k_name} shape {list(k.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of {k_name}/{v_name} heads ({Hkv})")


def attention_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    q_pos: Union[int, torch.Tensor, None] = None,
    kv_pos: Union[int, torch.Tensor, None] = None,
    softmax_scale: Optional[float] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of a query chunk against a KV chunk: ``softmax(q k^T * scale) v``.

    Args:
        q: ``[B, Hq, Lq, D]`` fp16/bf16/fp32 (any strides).
        k, v: ``[B, Hkv, Lk, D]``, same dtype and device as ``q``; ``Hq % Hkv == 0``.
        causal: mask key ``j`` from query ``i`` unless ``kv_pos[j] <= q_pos[i]``.
        q_pos: global positions of the query rows: an ``int`` (position of row 0,
            rows contiguous; default 0) or an int32/int64 tensor ``[Lq]`` on q's device.
            Only used when ``causal``.
        kv_pos: same for the keys; a tensor ``[Lk]`` must be non-decreasing (checked on
            CPU only). Only used when ``causal``.
        softmax_scale: multiplies the scores; default ``1 / sqrt(D)``.
        block_m, block_n, num_warps, num_stages: tile overrides (defaults per head dim;
            tiny tiles in the interpreter).
        out, lse: optional preallocated outputs (``[B, Hq, Lq, D]`` in q's dtype and
            ``[B, Hq, Lq]`` fp32, any strides) -- e.g. slices of a ring-attention buffer.
            Every element is written.

    Returns:
        ``out``: ``[B, Hq, Lq, D]`` in q's dtype (contiguous unless given); rows with no
        visible key are 0.
        ``lse``: ``[B, Hq, Lq]`` fp32, natural-log log-sum-exp of the scaled scores;
        ``-inf`` for rows with no visible key. NaN propagates to the rows (and, for values,
        columns) that attend to it (module docstring).

    Supported head dims: 16, 32, 64, 128. fp32 inputs use IEEE fp32 dots (no TF32),
    which is slow on GPU but exact enough to serve as a check.
    """
    check_qkv(q, k, v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    for name, pos in (("q_pos", q_pos), ("kv_pos", kv_pos)):
        if isinstance(pos, bool) or not (pos is None or isinstance(pos, (int, torch.Tensor))):
            raise TypeError(f"{name} must be None, an int or an integer tensor, got {type(pos).__name__}")

    q_pos_t = check_positions("q_pos", q_pos, Lq, q.device, must_be_sorted=False) if causal else None
    kv_pos_t = check_positions("kv_pos", kv_pos, Lk, q.device, must_be_sorted=True) if causal else None
    q_start = q_pos if isinstance(q_pos, int) else 0
    kv_start = kv_pos if isinstance(kv_pos, int) else 0

    if out is None:
        out = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (B, Hq, Lq, D) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {q.dtype} of shape {[B, Hq, Lq, D]} on {q.device}, got "
                         f"{out.dtype} of shape {list(out.shape)} on {out.device}")
    if lse is None:
        lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    elif tuple(lse.shape) != (B, Hq, Lq) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be float32 of shape {[B, Hq, Lq]} on {q.device}, got "
                         f"{lse.dtype} of shape {list(lse.shape)} on {lse.device}")
    interpret = _interpreting()
    if not interpret and q.device.type != "cuda":
        raise ValueError(f"q is on {q.device}; without TRITON_INTERPRET=1 the kernel needs CUDA tensors")
    if out.numel() == 0:
        return out, lse

    bm, bn, nw, ns = _default_config(D, q.dtype, interpret)
    bm = block_m or bm
    bn = block_n or bn
    nw = num_warps or nw
    ns = num_stages or ns
    grid = (triton.cdiv(Lq, bm), B * Hq)
    # Unused pointer arguments still need a tensor; q is a harmless stand-in.
    _attention_chunk_kernel[grid](
        q, k, v, out, lse,
        q_pos_t if q_pos_t is not None else q,
        kv_pos_t if kv_pos_t is not None else q,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        Hq, Hq // Hkv, Lq, Lk,
        q_start, kv_start,
        softmax_scale * _LOG2E,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
        CAUSAL=bool(causal), HAS_Q_POS=q_pos_t is not None, HAS_KV_POS=kv_pos_t is not None,
        DOT_FP32=(q.dtype == torch.float32) or (interpret and q.dtype == torch.bfloat16),
        INTERPRET=interpret,
        num_warps=nw, num_stages=ns,
    )
    return out, lse
