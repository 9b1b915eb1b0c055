"""Load-balanced causal sharding of a sequence over ``world`` ranks (pure torch).

With causal attention, token ``t`` attends to ``t + 1`` keys, so cutting the sequence
into ``world`` contiguous pieces gives the last rank far more work than the first.
The standard fix (zig-zag / "striped by pairs" layout of ring attention): cut the
sequence into ``2 * world`` chunks and give rank ``i`` chunks ``i`` and
``2 * world - 1 - i``; every rank then holds one early and one late chunk and does
about the same causal work.

Lengths not divisible by ``2 * world``: chunk ``c`` has ``seq_len // (2 * world)``
tokens plus one if ``c < seq_len % (2 * world)`` -- chunk sizes differ by at most one,
earlier chunks are the larger ones. Chunk boundaries depend only on ``(seq_len,
world)``, so ``unshard`` recovers them from the total length and inverts ``shard``
exactly. Local tokens are in increasing global position (first chunk, then second),
so ``shard_positions`` is sorted ascending, as ``attention_chunk``'s ``kv_pos`` requires.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["chunk_bounds", "shard_ranges", "shard", "unshard", "shard_positions"]


def _check_world(rank: Optional[int], world: int) -> None:
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world):
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")


def chunk_bounds(seq_len: int, world: int) -> List[Tuple[int, int]]:
    """``[start, end)`` of the ``2 * world`` chunks of a sequence of ``seq_len`` tokens."""
    _check_world(None, world)
    if not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    n = 2 * world
    base, rem = divmod(seq_len, n)
    bounds, start = [], 0
    for c in range(n):
        end = start + base + (1 if c < rem else 0)
        bounds.append((start, end))
        start = end
    return bounds


def shard_ranges(seq_len: int, rank: int, world: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """The two global ``[start, end)`` ranges held by ``rank``: chunks ``rank`` and ``2*world-1-rank``."""
    _check_world(rank, world)
    bounds = chunk_bounds(seq_len, world)
    return bounds[rank], bounds[2 * world - 1 - rank]


def shard(x: torch.Tensor, rank: int, world: int, dim: int = -2) -> torch.Tensor:
    """The part of ``x`` that ``rank`` holds along ``dim`` (a new tensor; ``x`` is not modified).

    Args:
        x: any tensor; ``x.shape[dim]`` is the sequence length.
        rank, world: ``0 <= rank < world``.
        dim: sequence dimension (default -2, the ``seq`` of ``[B, H, seq, D]``).

    Returns:
        ``cat(chunk[rank], chunk[2*world-1-rank])`` along ``dim``; its length is
        ``len(shard_positions(x.shape[dim], rank, world))``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for x with {x.dim()} dims")
    (a0, a1), (b0, b1) = shard_ranges(x.shape[dim], rank, world)
    return torch.cat([x.narrow(dim, a0, a1 - a0), x.narrow(dim, b0, b1 - b0)], dim=dim)


def unshard(locals_: Sequence[torch.Tensor], world: int, dim: int = -2) -> torch.Tensor:
    """Inverse of ``shard``: reassemble the full sequence from every rank's local part.

    Args:
        locals_: ``world`` tensors, entry ``i`` being ``shard(x, i, world, dim)``; same
            dtype, device and sizes except along ``dim``.
        world: number of ranks; must equal ``len(locals_)``.
        dim: sequence dimension.

    Returns:
        The full tensor (new), with ``shape[dim] = sum of the local lengths``.
    """
    _check_world(None, world)
    locals_ = list(locals_)
    if len(locals_) != world:
        raise ValueError(f"locals_ must hold one tensor per rank ({world}), got {len(locals_)}")
    ref = locals_[0]
    if not isinstance(ref, torch.Tensor):
        raise TypeError("locals_ must hold torch.Tensors")
    if not -ref.dim() <= dim < ref.dim():
        raise ValueError(f"dim {dim} is out of range for tensors with {ref.dim()} dims")
    d = dim % ref.dim()
    for i, t in enumerate(locals_):
        if not isinstance(t, torch.Tensor) or t.dim() != ref.dim():
            raise ValueError(f"locals_[{i}] must be a tensor with {ref.dim()} dims")
        if t.dtype != ref.dtype or t.device != ref.device:
            raise ValueError(f"locals_[{i}] is {t.dtype} on {t.device}, expected {ref.dtype} on {ref.device}")
        if t.shape[:d] + t.shape[d + 1:] != ref.shape[:d] + ref.shape[d + 1:]:
            raise ValueError(f"locals_[{i}] has shape {list(t.shape)}; only dim {dim} may differ from "
                             f"locals_[0] {list(ref.shape)}")
    seq_len = sum(t.shape[d] for t in locals_)
    bounds = chunk_bounds(seq_len, world)
    pieces: List[Optional[torch.Tensor]] = [None] * (2 * world)
    for r, t in enumerate(locals_):
        (a0, a1), (b0, b1) = bounds[r], bounds[2 * world - 1 - r]
        if t.shape[d] != (a1 - a0) + (b1 - b0):
            raise ValueError(f"locals_[{r}] has length {t.shape[d]} along dim {dim}, but rank {r} of "
                             f"a {seq_len}-token sequence holds {(a1 - a0) + (b1 - b0)}")
        pieces[r] = t.narrow(d, 0, a1 - a0)
        pieces[2 * world - 1 - r] = t.narrow(d, a1 - a0, b1 - b0)
    return torch.cat(pieces, dim=d)


def shard_positions(seq_len: int, rank: int, world: int, *, device=None,
                    dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Global positions ``[local_len]`` of the tokens ``rank`` holds (sorted ascending).

    Pass them as ``q_pos`` / ``kv_pos`` to ``attention_chunk`` for causal masking.
    ``dtype`` is int32 (default) or int64.
    """
    if dtype not in (torch.int32, torch.int64):
        raise ValueError(f"dtype must be torch.int32 or torch.int64, got {dtype}")
    (a0, a1), (b0, b1) = shard_ranges(seq_len, rank, world)
    return torch.cat([torch.arange(a0, a1, dtype=dtype, device=device),
                      torch.arange(b0, b1, dtype=dtype, device=device)])
