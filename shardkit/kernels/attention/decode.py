"""Decode attention (one new query token per sequence) against a KV cache, split along the keys.

A decode step attends ``n_q`` query heads of one token to ``kv_len`` cached keys per sequence. A
flash-attention kernel gives one program per (sequence, head, query block); with one query row,
B = 1 and a few KV heads (4 per rank in a 70B model at TP=2) that is a handful of programs for
a few MB of cache, and the GPU sits idle (a 50 µs cuDNN call for ~3 µs of HBM traffic on H200).
Flash-decoding (Dao et al., "Flash-Decoding for long-context inference", 2023) splits the keys
instead; this file does that for grouped-query attention:

1. ``decode_split_kernel``, grid ``B * n_kv * splits``: a program loads the ``group = n_q / n_kv``
   query rows that read its KV head (one K/V read serves the whole group; the rows are padded to
   16 for ``tl.dot``) and runs an online softmax over its split's keys, then writes a normalised
   partial output and its log-sum-exp (fp32).
2. ``decode_combine_kernel``, grid ``B * n_q``: merges the splits of one query row in split order
   (``out = sum_s exp(lse_s - M) out_s / sum_s exp(lse_s - M)``, as ``merge.py``), so the result
   does not depend on scheduling (deterministic). With one split the first kernel writes the output
   and the second is not launched.

Visible keys: ``0 .. kv_len - 1``, and with ``q_pos`` (the query token's position per sequence, a
device tensor) only those ``<= q_pos[b]``: per-sequence lengths that can change between replays of a
CUDA graph, where ``kv_len`` (a Python int: it sizes the grid) is the cache's capacity. Keys beyond a
sequence's length are never loaded. A row that sees no key gets 0.

The split count is a pure cached function of the shape and the SM count (``decode_config``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from ..launch import CachedLauncher, int_key, ptr_key

__all__ = ["DecodeConfig", "decode_attention", "decode_config"]

_LOG2E = 1.4426950408889634  # scores in base 2: the kernel uses exp2
MAX_SPLITS = 128  # the combine reads at most this many partials per row


@triton.jit
def _tile(acc, l_i, m_i, q, k_base, v_base, start, end, stride_kn, stride_vn, qk_scale, offs_n, offs_d, d_ok,
          MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online-softmax update with keys start .. start + BLOCK_N - 1 (MASKED: only those < end)."""
    cols = start + offs_n
    k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]  # [HD_P2, BLOCK_N]: K^T
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]  # [BLOCK_N, HD_P2]
    if MASKED:
        in_range = cols < end
        k = tl.load(k_ptrs, mask=d_ok[:, None] & in_range[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=in_range[:, None] & d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    if DOT_FP32:  # fp32 inputs, or bf16 in the interpreter (where bf16 tl.dot is wrong): IEEE fp32, no TF32
        s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale
    if MASKED:
        s = tl.where(in_range[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: exp2(-inf - 0) = 0, not NaN
    alpha = tl.math.exp2(m_i - m_sub)
    p = tl.math.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["kv_len", "keys_per_split"])
def decode_split_kernel(q_ptr, k_ptr, v_ptr, q_pos_ptr, part_out_ptr, part_lse_ptr, out_ptr,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                        stride_pos, stride_ob, stride_oh, n_kv, splits, kv_len, keys_per_split, qk_scale,
                        GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, HD_P2: tl.constexpr,
                        BLOCK_N: tl.constexpr, HAS_POS: tl.constexpr, SINGLE: tl.constexpr,
                        DOT_FP32: tl.constexpr):
    """Grid (B * n_kv * splits,): program (b * n_kv + j) * splits + s attends query heads
    j*GROUP .. j*GROUP+GROUP-1 of sequence b to keys s*keys_per_split .. (s+1)*keys_per_split - 1.

    q [B, n_q, hd], k/v [B, n_kv, S, hd] (unit last strides). SINGLE (one split): writes
    out [B, n_q, hd] in q's dtype; otherwise part_out [B, n_q, splits, hd] and part_lse [B, n_q, splits]
    (fp32, contiguous), the partial output normalised by its own softmax sum and its natural-log LSE.
    """
    pid = tl.program_id(0)
    split = pid % splits
    bj = pid // splits
    b = (bj // n_kv).to(tl.int64)  # int64: b * stride may exceed 2**31 in a large cache
    j = (bj % n_kv).to(tl.int64)
    n = kv_len
    if HAS_POS:  # keys 0..q_pos[b] only
        n = tl.minimum(n, tl.load(q_pos_ptr + b * stride_pos).to(tl.int32) + 1)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n)
    full_hi = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N  # tiles before it need no key mask

    offs_g = tl.arange(0, GROUP_P2)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HD_P2)
    if HD_P2 == HEAD_DIM:
        d_ok = tl.full([HD_P2], 1, tl.int1)  # a constant mask: the loads stay unmasked vectors
    else:
        d_ok = offs_d < HEAD_DIM
    g_ok = offs_g < GROUP
    heads = j * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + j * stride_kh
    v_base = v_ptr + b * stride_vb + j * stride_vh

    m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([GROUP_P2, HD_P2], dtype=tl.float32)
    for start in range(lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_base, v_base, start, hi, stride_kn, stride_vn, qk_scale,
                              offs_n, offs_d, d_ok, False, DOT_FP32)
    for start in range(full_hi, hi, BLOCK_N):  # at most one: the split's last, partial tile
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_base, v_base, start, hi, stride_kn, stride_vn, qk_scale,
                              offs_n, offs_d, d_ok, True, DOT_FP32)

    empty = l_i == 0.0  # no visible key in this split (NaN, from NaN inputs, is not empty: it propagates)
    l_safe = tl.where(empty, 1.0, l_i)
    part = acc / l_safe[:, None]
    mask = g_ok[:, None] & d_ok[None, :]
    if SINGLE:
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, part.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        row = (b * n_kv * GROUP + heads) * splits + split  # [GROUP_P2] rows of part_lse
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], part, mask=mask)
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(part_lse_ptr + row, lse, mask=g_ok)


@triton.jit
def decode_combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, n_q, splits, stride_ob, stride_oh,
                          HEAD_DIM: tl.constexpr, HD_P2: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (B * n_q,): program b * n_q + h merges the ``splits`` partials of query head h of sequence b
    in split order (two passes: the maximum LSE, then the weighted sum), fp32, one rounding to out's dtype.
    A partial with lse = -inf (saw no key) is weighed 0 whatever its out holds; a row of such partials is 0."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HD_P2)
    d_ok = offs_d < HEAD_DIM
    lse_row = part_lse_ptr + row * splits
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        m = tl.maximum(m, tl.load(lse_row + s0 + offs_s, mask=s0 + offs_s < splits, other=float("-inf")))
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_S, HD_P2], dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s_ok = s0 + offs_s < splits
        lse = tl.load(lse_row + s0 + offs_s, mask=s_ok, other=float("-inf"))
        w = tl.exp2((lse - m_all) * 1.4426950408889634)
        part = tl.load(part_out_ptr + (row * splits + s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.where((lse != float("-inf"))[:, None], part * w[:, None], 0.0)
        total += w
    total_all = tl.sum(total, 0)
    out = tl.sum(acc, 0) / tl.where(total_all == 0.0, 1.0, total_all)
    b = row // n_q
    h = row % n_q
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


_split_launch = CachedLauncher(decode_split_kernel)
_combine_launch = CachedLauncher(decode_combine_kernel)


def _interpreting() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(decode_split_kernel, InterpretedFunction)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """splits: key ranges per (sequence, KV head); block_n: keys per tile; warps: of the split kernel
    (Triton's default pipeline depth, 3 stages on sm_90)."""
    splits: int
    block_n: int
    warps: int = 4


@functools.lru_cache(maxsize=4096)
def decode_config(batch: int, n_kv: int, kv_len: int, head_dim: int, elem_size: int, sm_count: int,
                  interpret: bool = False) -> DecodeConfig:
    """The launch policy: K and V tiles of 16 KiB (64 keys at head dim 128 in bf16, three stages in flight:
    70 KiB of shared memory, 96 registers on sm_90; fp32, a checking path, 4K elements), and enough
    splits that the B * n_kv * splits programs make about one wave at two resident programs per SM, but
    at least two tiles per split (a program's fixed cost, loading q and writing a partial, stays small
    next to its keys). Interpreter: 16-key tiles, a pretend 4 SMs."""
    hd_p2 = max(16, triton.next_power_of_2(head_dim))
    block_n = 16 if interpret else max(16, min(128, 16384 // (hd_p2 * elem_size)))
    tiles = max(1, triton.cdiv(kv_len, block_n))
    target = 2 * (4 if interpret else sm_count)
    splits = max(1, min(target // (batch * n_kv), triton.cdiv(tiles, 2), MAX_SPLITS))
    splits = triton.cdiv(tiles, triton.cdiv(tiles, splits))  # the same tiles per split, none empty
    return DecodeConfig(splits=splits, block_n=block_n, warps=4)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int, *,
                     q_pos: torch.Tensor | None = None, softmax_scale: float | None = None,
                     config: DecodeConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per sequence to its cached keys: ``softmax(q K^T * scale) V``.

    Args:
        q: [B, n_q, hd] fp16/bf16/fp32, unit last stride; query head h reads KV head h // (n_q / n_kv).
        k_cache, v_cache: [B, n_kv, S, hd] (a batch slice of a larger cache is fine), q's dtype and
            device, unit last stride; n_q a multiple of n_kv.
        kv_len: keys 0 .. kv_len - 1 are visible (0 <= kv_len <= S); a Python int, fixed when captured
            in a CUDA graph (it sizes the grid).
        q_pos: optional int32/int64 device tensor [B] or [1] (one for every sequence): the query token's
            position; then key j is visible only if also j <= q_pos[b]. Read on the device, so a CUDA
            graph replays with new positions.
        softmax_scale: default 1 / sqrt(hd).
        config: launch override (default ``decode_config``).
        out: optional [B, n_q, hd] output of q's dtype (any strides with a unit last stride).

    Returns:
        out [B, n_q, hd] in q's dtype; a row that sees no key is 0. Inputs are not modified.
    """
    _check(q, k_cache, v_cache, kv_len, q_pos, out)
    batch, n_q, hd = q.shape
    n_kv = k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    interpret = _interpreting()
    if config is None:
        config = decode_config(batch, n_kv, kv_len, hd, q.element_size(), _sm_count(q.device), interpret)
    elif config.splits < 1 or config.splits > MAX_SPLITS or config.block_n < 16 or config.block_n & (config.block_n - 1):
        raise ValueError(f"decode_attention: config needs 1 <= splits <= {MAX_SPLITS} and a power-of-two block_n "
                         f">= 16, got {config}")
    group = n_q // n_kv
    splits = config.splits
    keys_per_split = triton.cdiv(triton.cdiv(max(kv_len, 1), splits), config.block_n) * config.block_n
    scale = (1.0 / math.sqrt(hd) if softmax_scale is None else float(softmax_scale)) * _LOG2E
    single = splits == 1
    if single:  # unused pointers still need a tensor: out stands in
        part_out = part_lse = out
    else:
        part_out = torch.empty(batch, n_q, splits, hd, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, n_q, splits, dtype=torch.float32, device=q.device)
    pos = q if q_pos is None else q_pos
    args = (q, k_cache, v_cache, pos, part_out, part_lse, out, q.stride(0), q.stride(1), *k_cache.stride()[:3],
            *v_cache.stride()[:3], 0 if q_pos is None or q_pos.shape[0] == 1 else q_pos.stride(0),
            out.stride(0), out.stride(1), n_kv, splits, kv_len, keys_per_split, scale)
    hd_p2 = max(16, triton.next_power_of_2(hd))
    key = (*(ptr_key(t) for t in args[:7]), *(int_key(v) for v in args[7:20]))
    dot_fp32 = q.dtype == torch.float32 or (interpret and q.dtype == torch.bfloat16)
    constexprs = {"GROUP": group, "GROUP_P2": max(16, triton.next_power_of_2(group)), "HEAD_DIM": hd,
                  "HD_P2": hd_p2, "BLOCK_N": config.block_n, "HAS_POS": q_pos is not None, "SINGLE": single,
                  "DOT_FP32": dot_fp32}
    _split_launch(key, batch * n_kv * splits, args, constexprs, config.warps)
    if not single:
        c_args = (part_out, part_lse, out, n_q, splits, out.stride(0), out.stride(1))
        _combine_launch((*(ptr_key(t) for t in c_args[:3]), *(int_key(v) for v in c_args[3:])), batch * n_q, c_args,
                        {"HEAD_DIM": hd, "HD_P2": hd_p2, "BLOCK_S": min(32, triton.next_power_of_2(splits))}, 4)
    return out


def _check(q, k_cache, v_cache, kv_len, q_pos, out) -> None:
    """Raise ValueError naming the argument unless the shapes, dtypes, devices and strides fit."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k_cache, v_cache)):
        raise TypeError("decode_attention: q, k_cache and v_cache must be torch.Tensors")
    if q.dim() != 3 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"decode_attention: q must be a float16/bfloat16/float32 [B, n_q, hd] tensor, got "
                         f"{q.dtype} {tuple(q.shape)}")
    batch, n_q, hd = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[3] != hd or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"decode_attention: {name} must be [{batch}, n_kv, S, {hd}] of q's dtype {q.dtype} on "
                             f"{q.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: v_cache {tuple(v_cache.shape)} must have k_cache's shape "
                         f"{tuple(k_cache.shape)}")
    n_kv = k_cache.shape[1]
    if n_kv == 0 or n_q % n_kv:
        raise ValueError(f"decode_attention: q heads ({n_q}) must be a multiple of the cache's KV heads ({n_kv})")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache)):
        raise ValueError("decode_attention: q, k_cache and v_cache need a unit stride in the head dim (last dim)")
    if isinstance(kv_len, bool) or not isinstance(kv_len, int) or not 0 <= kv_len <= k_cache.shape[2]:
        raise ValueError(f"decode_attention: kv_len must be an int in 0..{k_cache.shape[2]} (the cache length), "
                         f"got {kv_len!r}")
    if q_pos is not None and (not isinstance(q_pos, torch.Tensor) or q_pos.dtype not in (torch.int32, torch.int64)
                              or q_pos.dim() != 1 or q_pos.shape[0] not in (1, batch) or q_pos.device != q.device):
        raise ValueError(f"decode_attention: q_pos must be an int32/int64 tensor [{batch}] or [1] on {q.device}, got "
                         + (f"{q_pos.dtype} {tuple(q_pos.shape)} on {q_pos.device}" if isinstance(q_pos, torch.Tensor)
                            else type(q_pos).__name__))
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"decode_attention: out must be {tuple(q.shape)} {q.dtype} on {q.device} with a unit last "
                         f"stride, got {out.dtype} {tuple(out.shape)}")
    if not _interpreting() and q.device.type != "cuda":
        raise ValueError(f"decode_attention: q is on {q.device}; without TRITON_INTERPRET=1 the kernel needs CUDA "
                         "tensors")
