"""Ring attention's transport: tensors passed around the ring over torch.distributed P2P, double
buffered so that the next step's transfer overlaps this step's compute."""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Sequence, Tuple

import torch
import torch.distributed as dist


def post_ring(send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], nxt: int, prv: int,
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


def ring_pass(local: List[torch.Tensor], shapes: Callable[[int], List[Tuple[int, ...]]], world: int, rank: int,
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
            reqs = post_ring(current, incoming, nxt, prv, group)
        yield src, current
        for r in reqs:
            r.wait()
        if incoming is not None:
            current = incoming
