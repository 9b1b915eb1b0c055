"""Functions run on every rank of a ProcessWorld for the hierarchical all-reduce tests: emulated
nodes (a world of nodes x local ranks split into groups), each rank checking against the float64
sum of every rank's input."""
from __future__ import annotations

import torch
import torch.distributed as dist

from shardkit.collectives.hierarchical import HierarchicalCommunicator
from shardkit.reference.all_reduce import all_reduce_reference, rank_inputs

from ..tolerances import ROUNDING
from .rank_checks import DTYPES, device, digest, error_messages


def _groups(nodes: int, local: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(this rank's node, this rank's rail) from explicit new_group calls (every rank makes all)."""
    rank = dist.get_rank()
    intra = inter = None
    for n in range(nodes):
        g = dist.new_group([n * local + l for l in range(local)])
        intra = g if rank // local == n else intra
    for l in range(local):
        g = dist.new_group([n * local + l for n in range(nodes)])
        inter = g if rank % local == l else inter
    return intra, inter


def check_hierarchical(nodes: int, dtype_name: str, sizes: list[int], buffer_bytes: int, use_mesh: bool,
                       seed: int) -> list[str]:
    """Both algorithms, out of place (poisoned out) and in place, against the float64 sum over all
    ranks; both bitwise equal to each other per size. Returns one digest per size."""
    dtype = DTYPES[dtype_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    local = world // nodes
    if use_mesh:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device().type, (nodes, local), mesh_dim_names=("node", "local"))
        hier = HierarchicalCommunicator(mesh, buffer_bytes=buffer_bytes)
    else:
        intra, inter = _groups(nodes, local)
        hier = HierarchicalCommunicator(intra_group=intra, inter_group=inter, buffer_bytes=buffer_bytes)
    assert (hier.nodes, hier.local_size) == (nodes, local)
    digests = []
    try:
        for i, n in enumerate(sizes):
            xs = rank_inputs(world, n, dtype, seed=seed * 1000 + i, device=device())
            ref = all_reduce_reference(xs)
            x = xs[rank]
            # One rounding of the result, plus the rounding of each node's sum to the dtype (the
            # rail's all-reduce adds node sums in the dtype, as NCCL does): bounded by the node sums.
            node_sums = [all_reduce_reference(xs[m * local:(m + 1) * local]).abs() for m in range(nodes)]
            atol, rtol = ROUNDING[dtype]
            bound = atol + rtol * ref.abs() + torch.finfo(dtype).eps * sum(node_sums)
            results = []
            for algo in ("sharded", "full"):
                what = f"hierarchical {algo} {dtype_name} n={n} {nodes}x{local}"
                out = torch.full_like(x, float("nan"))
                assert hier.all_reduce(x, algo=algo, out=out) is out
                assert torch.equal(x, xs[rank]), f"{what}: the input was modified"
                err = (out.double() - ref).abs()
                assert bool((err <= bound).all()), f"{what}: error {err.max().item():.3g} beyond the bound"
                inplace = x.clone()
                assert hier.all_reduce_(inplace, algo=algo) is inplace
                assert torch.equal(inplace, out), f"{what}: in place differs from out of place"
                results.append(out)
            # Two node sums: NCCL/gloo add them in either order to the same bits. (Not for bf16 on CPU:
            # the full path's node sum comes from a Triton kernel, and the interpreter truncates
            # fp32 -> bf16 where torch and GPUs round to nearest even.)
            if nodes == 2 and not (device().type == "cpu" and dtype == torch.bfloat16):
                assert torch.equal(results[0], results[1]), f"n={n}: sharded and full differ"
            auto = hier.all_reduce(x)
            assert torch.equal(auto, results[0] if n * x.element_size() > hier.full_max_bytes else results[1])
            digests.append(digest(results[0]) + digest(results[1]))
        hier.check()
    finally:
        hier.close()
    return digests


def hierarchical_bad_inputs(nodes: int) -> list[str]:
    """Bad arguments raise ValueError/TypeError naming them."""
    world = dist.get_world_size()
    intra, inter = _groups(nodes, world // nodes)
    hier = HierarchicalCommunicator(intra_group=intra, inter_group=inter, buffer_bytes=8192)
    x = torch.ones(10, device=device())
    try:
        return error_messages([
            lambda: hier.all_reduce(x, algo="ring"),
            lambda: hier.all_reduce(x.int()),
            lambda: hier.all_reduce(x, out=torch.ones(9, device=device())),
            lambda: HierarchicalCommunicator(intra_group=intra),
            lambda: HierarchicalCommunicator(intra_group=intra, inter_group=inter, full_max_bytes=-1),
        ])
    finally:
        hier.close()
