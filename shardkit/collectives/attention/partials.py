"""Partial attention results ``(out, lse)`` packed in one byte buffer, so one collective moves both.

Pass-Q ring attention returns every partial result to the rank that owns its queries with an
all-to-all, and CP decode all-gathers the partial results of every rank. Each partial is an
output ``[B, H, L, D]`` (the queries' dtype) plus its log-sum-exp ``[B, H, L]`` (fp32): two
dtypes. Sending them as two collectives would pay the collective latency twice, so a partial
lives in one *segment* of a ``uint8`` buffer::

    segment = [ out: B*H*L*D elements of dtype | lse: B*H*L float32 ]

and typed views of the segment are handed to the kernels (``attention_chunk(out=, lse=)``
writes straight into it; ``merge_attention`` reads the stacked views without a copy).
Alignment: the head dims supported by the kernels are multiples of 16, so ``out`` fills a
multiple of 4 bytes and the fp32 ``lse`` that follows it is 4-byte aligned; segments are
multiples of 4 bytes, so every segment of a buffer is aligned too.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["segment_bytes", "segment_views", "stacked_views"]

Shape4 = Tuple[int, int, int, int]


def _sizes(shape: Shape4, dtype: torch.dtype) -> Tuple[int, int]:
    B, H, L, D = shape
    out_bytes = B * H * L * D * dtype.itemsize
    if out_bytes % 4:
        raise ValueError(f"a partial of shape {list(shape)} in {dtype} fills {out_bytes} bytes, "
                         "not a multiple of 4: the fp32 lse after it would be misaligned")
    return out_bytes, B * H * L * 4


def segment_bytes(shape: Shape4, dtype: torch.dtype) -> int:
    """Bytes of one segment holding ``out`` ``shape`` in ``dtype`` plus its fp32 ``lse``."""
    out_bytes, lse_bytes = _sizes(shape, dtype)
    return out_bytes + lse_bytes


def segment_views(seg: torch.Tensor, shape: Shape4, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Typed views ``(out [B, H, L, D] dtype, lse [B, H, L] fp32)`` of a ``uint8`` segment.

    ``seg`` is a contiguous 1-D ``uint8`` tensor of ``segment_bytes(shape, dtype)`` bytes whose
    storage offset is a multiple of 4 (any segment of a buffer built from these segments).
    """
    out_bytes, lse_bytes = _sizes(shape, dtype)
    B, H, L, D = shape
    out = seg[:out_bytes].view(dtype).view(B, H, L, D)
    lse = seg[out_bytes:out_bytes + lse_bytes].view(torch.float32).view(B, H, L)
    return out, lse


def stacked_views(buf: torch.Tensor, count: int, shape: Shape4,
                  dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Views ``(outs [S, B, H, L, D], lses [S, B, H, L])`` of ``count`` equal segments in ``buf``.

    The views are strided (segment stride), which ``merge_attention`` accepts without a copy.
    """
    out_bytes, lse_bytes = _sizes(shape, dtype)
    B, H, L, D = shape
    if out_bytes == 0:  # no rows: a zero-stride byte view cannot be retyped, and nothing is read
        return (buf.new_empty((count, B, H, L, D), dtype=dtype),
                buf.new_empty((count, B, H, L), dtype=torch.float32))
    rows = buf.view(count, out_bytes + lse_bytes)
    outs = rows[:, :out_bytes].view(dtype).view(count, B, H, L, D)
    lses = rows[:, out_bytes:].view(torch.float32).view(count, B, H, L)
    return outs, lses
