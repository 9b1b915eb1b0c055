"""RoPE on q and k and the KV-cache write, from the fused q/k/v projection, in one kernel.

The fused projection gives one row per token: [q heads | k heads | v heads], head_dim each. This
kernel rotates the q heads into ``q_out`` [B, T, nq, hd], rotates the k heads and stores them, and
the v heads unrotated, into the caches [B_max, nkv, S, hd] at the tokens' positions. Torch needs
about twelve kernels for the same (two rotate-half chains, two index_copy_); in a decode step each
of them costs a few microseconds of launch and tail for a few kilobytes of data.

RoPE (rotate-half convention, as Hugging Face Llama): out[d] = x[d] cos[p, d] + r[d] sin[p, d] with
r = (-x[hd/2:], x[:hd/2]); fp32 math, one rounding to the output dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import CachedLauncher, int_key, ptr_key


@triton.jit
def rope_qkv_cache_kernel(qkv_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, tokens_per_seq,
                          nq, nkv, cache_len, HD: tl.constexpr, HALF_P2: tl.constexpr, HB: tl.constexpr):
    """Grid (B * T * cdiv(nq + 2 nkv, HB),): program n * chunks + j handles heads j*HB .. j*HB+HB-1 of
    token n (sequence n // T, position pos[n % T])."""
    total = nq + 2 * nkv
    chunks = tl.cdiv(total, HB)
    pid = tl.program_id(0).to(tl.int64)
    n = pid // chunks
    heads = (pid % chunks) * HB + tl.arange(0, HB)
    half = tl.arange(0, HALF_P2)[None, :]  # the two halves as separate tiles: contiguous 16-byte loads
    b = n // tokens_per_seq
    pos = tl.load(pos_ptr + n % tokens_per_seq)
    in_half = half < HD // 2
    valid = (heads < total)[:, None] & in_half
    row = qkv_ptr + n * total * HD + heads[:, None] * HD
    x1 = tl.load(row + half, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(row + HD // 2 + half, mask=valid, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + pos * HD + half, mask=in_half, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + pos * HD + HD // 2 + half, mask=in_half, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + pos * HD + half, mask=in_half, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + pos * HD + HD // 2 + half, mask=in_half, other=0.0).to(tl.float32)
    out1 = x1 * cos1 - x2 * sin1  # rotate-half: r = (-x2, x1)
    out2 = x2 * cos2 + x1 * sin2
    is_q = valid & (heads < nq)[:, None]
    is_k = valid & ((heads >= nq) & (heads < nq + nkv))[:, None]
    is_v = valid & (heads >= nq + nkv)[:, None]
    q_row = q_ptr + (n * nq + heads[:, None]) * HD
    tl.store(q_row + half, out1.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(q_row + HD // 2 + half, out2.to(q_ptr.dtype.element_ty), mask=is_q)
    kv_head = tl.where(heads < nq + nkv, heads - nq, heads - nq - nkv)
    cache_row = ((b * nkv + kv_head[:, None]) * cache_len + pos) * HD
    tl.store(k_cache_ptr + cache_row + half, out1.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_cache_ptr + cache_row + HD // 2 + half, out2.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    tl.store(v_cache_ptr + cache_row + half, x1.to(v_cache_ptr.dtype.element_ty), mask=is_v)
    tl.store(v_cache_ptr + cache_row + HD // 2 + half, x2.to(v_cache_ptr.dtype.element_ty), mask=is_v)


_launch = CachedLauncher(rope_qkv_cache_kernel)


def launch_config(head_dim: int, heads: int) -> tuple[int, int]:
    """(heads per program, warps): 8 heads per program (a decode token of 40 heads spreads over 5 SMs),
    two half-row tiles of 8 x hd/2; 8 values per thread per tile (16-byte bf16 accesses): 2 warps at
    hd 128 (sm_90 PTX: v4 loads and stores)."""
    per_program = min(8, triton.next_power_of_2(heads))
    return per_program, max(1, min(8, per_program * triton.next_power_of_2(head_dim) // 512))


def rope_qkv_into_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, nq: int, q_out: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Rotate and scatter one fused q/k/v projection; returns q [B, T, nq, hd].

    qkv: [B, T, (nq + 2 nkv) * hd], contiguous. positions: [T] int64 on qkv's device (the same for
    every sequence: a batch decodes in step). cos, sin: [S, hd] RoPE tables (any float dtype).
    k_cache, v_cache: [B_max >= B, nkv, S, hd] contiguous, qkv's dtype; rows ``positions`` of the first
    B sequences are overwritten, nothing else. q_out: optional [B, T, nq, hd] buffer.
    """
    batch, length, width = qkv.shape
    _, nkv, cache_len, hd = k_cache.shape
    if hd % 2 or hd < 2:
        raise ValueError(f"rope_qkv_into_cache: head_dim must be even, got {hd}")
    if width != (nq + 2 * nkv) * hd or not qkv.is_contiguous():
        raise ValueError(f"rope_qkv_into_cache: qkv must be contiguous [B, T, (nq + 2 nkv) * hd] = "
                         f"[{batch}, {length}, {(nq + 2 * nkv) * hd}], got {tuple(qkv.shape)}")
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if (t.shape[0] < batch or t.shape[1:] != (nkv, cache_len, hd) or t.dtype != qkv.dtype
                or not t.is_contiguous() or t.device != qkv.device):
            raise ValueError(f"rope_qkv_into_cache: {name} must be contiguous [>= {batch}, {nkv}, S, {hd}] of "
                             f"qkv's dtype and device, got {tuple(t.shape)} {t.dtype}")
    if positions.shape != (length,) or positions.dtype != torch.long or positions.device != qkv.device:
        raise ValueError(f"rope_qkv_into_cache: positions must be int64 [{length}] on {qkv.device}")
    if cos.shape != (cache_len, hd) or sin.shape != cos.shape:
        raise ValueError(f"rope_qkv_into_cache: cos and sin must be [{cache_len}, {hd}]")
    if q_out is None:
        q_out = torch.empty(batch, length, nq, hd, dtype=qkv.dtype, device=qkv.device)
    heads_per_program, warps = launch_config(hd, nq + 2 * nkv)
    args = (qkv, q_out, k_cache, v_cache, cos.contiguous(), sin.contiguous(), positions, length, nq, nkv, cache_len)
    key = (*(ptr_key(t) for t in args[:7]), int_key(length), int_key(nq), int_key(nkv), int_key(cache_len))
    _launch(key, batch * length * triton.cdiv(nq + 2 * nkv, heads_per_program), args,
            {"HD": hd, "HALF_P2": triton.next_power_of_2(hd // 2), "HB": heads_per_program}, warps)
    return q_out
