"""The sync point of a tensor-parallel block, as one interchangeable piece.

A sync point takes this rank's partial sum ``x`` [..., hidden] (a row-parallel linear's output),
the replicated residual stream and the next RMSNorm's weight, and returns
``(RMSNorm(residual + sum_ranks x) * weight, residual + sum_ranks x)``, equal on every rank.
The model (``llama_tp.TPLlama``) and the latency benchmark call one of these:

* ``FusedSync``      shardkit's fused all-reduce + residual + RMSNorm (one kernel per sync point);
* ``UnfusedSync``    an all-reduce (NCCL through torch.distributed, or shardkit's) + torch add +
                     ``F.rms_norm``: what an engine without the fused op does;
* ``LocalSync``      no reduction: residual add + RMSNorm on this rank (kernels/spd/add_rmsnorm.py).
                     Exact for one rank; on several ranks it is the "compute only" timing baseline,
                     not a correct model.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..collectives.communicator import Communicator
from ..kernels.spd import add_rmsnorm

Pair = tuple[torch.Tensor, torch.Tensor]


class FusedSync:
    """``comm.all_reduce_residual_rmsnorm(x, residual, weight, eps, algo)``."""

    def __init__(self, comm: Communicator, algo: str = "auto") -> None:
        self.comm, self.algo = comm, algo

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> Pair:
        return self.comm.all_reduce_residual_rmsnorm(x, residual, weight, eps, self.algo)


class UnfusedSync:
    """All-reduce ``x`` in place (it is a fresh linear output), then torch add + ``F.rms_norm``.

    reduce="nccl": ``dist.all_reduce`` on ``group`` (gloo on CPU); reduce="shardkit":
    ``comm.all_reduce_(x, algo)``.
    """

    def __init__(self, reduce: str = "nccl", *, group: dist.ProcessGroup | None = None,
                 comm: Communicator | None = None, algo: str = "auto") -> None:
        if reduce not in ("nccl", "shardkit"):
            raise ValueError(f"UnfusedSync: reduce must be 'nccl' or 'shardkit', got {reduce!r}")
        if reduce == "shardkit" and comm is None:
            raise ValueError("UnfusedSync(reduce='shardkit') needs comm=")
        self.reduce, self.comm, self.algo = reduce, comm, algo
        self.group = comm.group if comm is not None else (group if group is not None else dist.group.WORLD)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> Pair:
        if self.reduce == "nccl":
            dist.all_reduce(x, group=self.group)
        else:
            self.comm.all_reduce_(x, algo=self.algo)
        residual = residual + x
        return F.rms_norm(residual, (residual.shape[-1],), weight, eps), residual


class LocalSync:
    """No reduction: ``add_rmsnorm(x, residual, weight)`` on this rank (one GPU, or compute-only timing)."""

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> Pair:
        return add_rmsnorm(x, residual, weight, eps, residual_out=torch.empty_like(residual))
