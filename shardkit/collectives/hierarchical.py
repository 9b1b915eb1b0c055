"""Hierarchical all-reduce across nodes: peer memory inside a node, NCCL (gloo on CPU) between nodes.

    mesh = init_device_mesh("cuda", (nodes, gpus_per_node), mesh_dim_names=("node", "local"))
    hier = HierarchicalCommunicator(mesh)          # every rank, together
    y = hier.all_reduce(x)                         # the sum over all nodes x local ranks

or ``HierarchicalCommunicator(intra_group=..., inter_group=...)`` with the process group of this
rank's node (its local ranks) and the group of the ranks with this rank's local index on every
node (its "rail": on 8-GPU InfiniBand nodes, GPU l of each node usually shares a switch with the
GPUs l of the other nodes).

Algorithms (``algo``):
  * ``"sharded"`` (large messages): reduce-scatter inside the node by copy-engine pulls, NCCL
    all-reduce of this rank's shard (1/L of the message) on its rail, all-gather inside the node by
    copy-engine pulls. It is ``collectives/copy_engine.py``'s all-reduce with the rail's all-reduce
    as its shard hook: each summed chunk of shard l lives in local rank l's workspace until the
    peers gather it, and NCCL reduces it there, in place, chunk by chunk (no extra copy, and the
    network transfer of chunk k overlaps the NVLink transfers of the other chunks). Each GPU sends
    1/L of the message over the network (L rails in parallel) and the node's NVLink carries a
    reduce-scatter and an all-gather: the bandwidth-optimal split (docs/HIERARCHICAL.md).
  * ``"full"`` (small messages, where latency rules): the intra-node Communicator's all-reduce
    (its own ``auto`` rule: flat/tree/...), then NCCL all-reduce of the whole message on every
    rail at once. Two steps instead of three; L times the network bytes, which do not matter there.
  * ``"auto"``: ``"full"`` up to ``full_max_bytes`` (default 1 MiB), ``"sharded"`` above; always
    ``"full"`` when the node's ranks have no peer memory (its Communicator then runs NCCL).

Numerics: sums in fp32 inside the node in local-rank order (rounded once to the dtype), then
NCCL's (or gloo's) summation of the node sums in the dtype; every rank gets bitwise the same
result (the sharded path computes each element once and copies it; the full path runs the same
reduction on every rail, which NCCL does identically for identical inputs). The order differs
from a flat all-reduce over all ranks, so the bits may differ from ``Communicator`` on the world.

Inside a node every rank must issue the same calls in the same order (as for ``Communicator``).
Emulated nodes for tests: a world of N x L processes on one host split into groups.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import copy_engine
from .communicator import Communicator
from ..errors import ShardkitError

ALGOS = ("auto", "sharded", "full")
DEFAULT_FULL_MAX_BYTES = 1 << 20


class HierarchicalCommunicator:
    """All-reduce over nodes x local ranks (see the module).

    Args:
        mesh: a 2-D DeviceMesh, dim 0 the nodes and dim 1 the local ranks of a node; or None with
            ``intra_group`` and ``inter_group``.
        intra_group: this rank's node (peer memory, shardkit's collectives).
        inter_group: this rank's rail (one rank per node; NCCL, or gloo on CPU).
        buffer_bytes, timeout_s: of the node's Communicator (see ``Communicator``); the sharded path
            goes in call-chunks of ``buffer_bytes``, so size it for the messages.
        full_max_bytes: the largest message for which ``auto`` takes the full path.
    """

    def __init__(self, mesh=None, *, intra_group: dist.ProcessGroup | None = None,
                 inter_group: dist.ProcessGroup | None = None, buffer_bytes: int | None = None,
                 timeout_s: float | None = None, full_max_bytes: int = DEFAULT_FULL_MAX_BYTES) -> None:
        if mesh is not None:
            if intra_group is not None or inter_group is not None:
                raise ValueError("HierarchicalCommunicator: pass a mesh or intra_group/inter_group, not both")
            if mesh.ndim != 2:
                raise ValueError(f"HierarchicalCommunicator: mesh must be 2-D (nodes, local ranks), got {mesh.ndim}-D")
            inter_group, intra_group = mesh.get_group(0), mesh.get_group(1)
        elif intra_group is None or inter_group is None:
            raise ValueError("HierarchicalCommunicator: needs a 2-D DeviceMesh or both intra_group and inter_group")
        if full_max_bytes < 0:
            raise ValueError(f"HierarchicalCommunicator: full_max_bytes must be >= 0, got {full_max_bytes}")
        kwargs = {} if timeout_s is None else {"timeout_s": timeout_s}
        self.intra = Communicator(intra_group, buffer_bytes=buffer_bytes, **kwargs)
        self.inter_group = inter_group
        self.nodes = dist.get_world_size(inter_group)
        self.local_size = self.intra.world_size
        self.device = self.intra.device
        self.full_max_bytes = int(full_max_bytes)

    def all_reduce(self, x: torch.Tensor, algo: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of ``x`` over every rank of every node, in a new tensor or in ``out``.

        x: contiguous fp32/fp16/bf16 tensor on this rank's device, the same shape and dtype on every
           rank; not modified unless ``out`` is ``x``.
        algo: "auto" | "sharded" | "full" (see the module).
        out: optional contiguous tensor of x's shape and dtype (may be ``x``).
        """
        if algo not in ALGOS:
            raise ValueError(f"all_reduce: algo must be one of {ALGOS}, got {algo!r}")
        self.intra._check_open("all_reduce")
        self.intra._validate(x, "x")
        if out is None:
            out = torch.empty_like(x)
        elif out is not x:
            self.intra._validate(out, "out")
            if out.shape != x.shape or out.dtype != x.dtype:
                raise ValueError(f"all_reduce: out must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                                 f"got {tuple(out.shape)} and {out.dtype}")
        if x.numel() == 0:
            return out
        if algo == "auto":
            small = x.numel() * x.element_size() <= self.full_max_bytes
            algo = "full" if small or self.intra.memory is None else "sharded"
        if algo == "full":
            self.intra.all_reduce(x, out=out)
            dist.all_reduce(out, group=self.inter_group)
            return out
        if self.intra.memory is None:
            raise ShardkitError(f"all_reduce(algo='sharded') needs peer memory inside the node, which this group "
                                f"lacks: {self.intra.fallback_reason}")
        self.intra._raise_if_failed()
        copy_engine.all_reduce(self.intra.memory, x, out, timeout_iters=self.intra._timeout_iters,
                               shard_hook=self._across_nodes)
        if self.intra.backend == "cpu":
            self.intra._raise_if_failed()
        return out

    def all_reduce_(self, x: torch.Tensor, algo: str = "auto") -> torch.Tensor:
        """In-place ``all_reduce``; returns ``x``."""
        return self.all_reduce(x, algo, out=x)

    def _across_nodes(self, shard: torch.Tensor) -> None:
        dist.all_reduce(shard, group=self.inter_group)

    def check(self) -> None:
        """Raise CollectiveError if an intra-node collective failed (see ``Communicator.check``)."""
        self.intra.check()

    def close(self) -> None:
        """Release the node's peer memory (idempotent)."""
        self.intra.close()
