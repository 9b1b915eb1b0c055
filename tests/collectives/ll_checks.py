"""Functions that run on every rank for the LL all-reduce's tests (csrc/dda/ll_all_reduce.cu): CUDA-graph
replays next to flat, the LL counter across its cleaning calls and its 2**32 wrap, an absent peer, and
(CPU) how the Communicator routes "ll" without the CUDA kernels."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from shardkit import CollectiveError, Communicator, ShardkitError
from shardkit.memory import protocol
from shardkit.reference.all_reduce import all_reduce_reference, rank_inputs
from shardkit.testing import capture_graph

from ..tolerances import ROUNDING, tol
from .rank_checks import DTYPES, device, digest


def graph_replays_next_to_flat(n: int, replays: int, seed: int) -> tuple[float, float]:
    """Capture flat and ll of one input in a CUDA graph, replay it ``replays`` times with changing inputs
    (NaN-poisoned outputs); returns (worst relative error of ll vs float64, largest |ll - flat|), both
    accumulated on the device (no per-replay sync; NaN counts as 1e9)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(kernels="cuda")
    try:
        pool = [rank_inputs(world, n, torch.bfloat16, seed + i, device=device()) for i in range(8)]
        refs = [all_reduce_reference(xs).float() for xs in pool]
        x = pool[0][rank].clone()
        flat, ll = torch.empty_like(x), torch.empty_like(x)
        graph, _ = capture_graph(lambda: (comm.all_reduce(x, algo="flat", out=flat),
                                          comm.all_reduce(x, algo="ll", out=ll)))
        worst = torch.zeros((), device=device())
        apart = torch.zeros((), device=device())
        for i in range(replays):
            k = i % len(pool)
            x.copy_(pool[k][rank])
            flat.fill_(float("nan"))
            ll.fill_(float("nan"))
            graph.replay()
            err = ((ll.float() - refs[k]).abs() / (refs[k].abs() + 1.0)).max()
            worst = torch.maximum(worst, torch.nan_to_num(err, nan=1e9))
            apart = torch.maximum(apart, torch.nan_to_num((ll.float() - flat.float()).abs().max(), nan=1e9))
        comm.check()
        return worst.item(), apart.item()
    finally:
        comm.close()


def across_counter_wrap(before: int, calls: int, seed: int) -> list[str]:
    """Set every rank's LL call counter to ``before`` (and fill the LL region with flags of calls long ago,
    as after 2**32 calls), then ``calls`` LL calls of changing sizes against float64 and flat; returns the
    digests. ``before`` near LL_CLEAN_PERIOD or 2**32 crosses the cleaning calls or the wrap."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(kernels="cuda")
    try:
        mem = comm.memory
        mem.buffer[protocol.ll_offset(mem.buffer_bytes):].fill_(0x5A)
        mem.buffer[protocol.LL_CALLS_OFF:protocol.LL_CALLS_OFF + 8].view(torch.int64).fill_(before)
        torch.cuda.synchronize()
        dist.barrier()
        digests = []
        for i in range(calls):
            n = (70_001, 9, 1000)[i % 3]  # a large call, then small ones over its stale lines
            xs = rank_inputs(world, n, torch.bfloat16, seed * 100 + i, device=device())
            out = torch.full_like(xs[rank], float("nan"))
            comm.all_reduce(xs[rank], algo="ll", out=out)
            torch.testing.assert_close(out.double(), all_reduce_reference(xs), **tol(ROUNDING, torch.bfloat16),
                                       msg=lambda m: f"ll call {i} after {before} LL calls (n={n}): {m}")
            assert torch.equal(out, comm.all_reduce(xs[rank], algo="flat")), f"ll call {i} differs from flat"
            digests.append(digest(out))
        comm.check()
        return digests
    finally:
        comm.close()


def absent_peer(absent: int, timeout_s: float) -> tuple[str, float]:
    """Rank ``absent`` never calls; the others' ll call must fail within about ``timeout_s``, naming it.
    Returns (message, seconds to give up)."""
    rank = dist.get_rank()
    comm = Communicator(timeout_s=timeout_s, kernels="cuda")
    t0 = time.perf_counter()
    try:
        if rank == absent:
            return "", 0.0
        x = torch.ones(100, device=device())
        try:
            out = comm.all_reduce(x, algo="ll")
            comm.check()
        except CollectiveError as e:
            return str(e), time.perf_counter() - t0
        raise AssertionError(f"rank {rank}: call without rank {absent} returned {out[:4]}")
    finally:
        dist.barrier()  # the absent rank must not tear down its memory while peers still push into it
        comm.close()


def routing_without_cuda_kernels(dtype_name: str, n: int, seed: int) -> str:
    """On the Triton kernels (CPU), algo="ll" raises naming what it needs, and auto rules that pick ll
    (measured on the CUDA kernels) run flat instead. Returns the ShardkitError's message."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[dtype_name]
    comm = Communicator(rules=[(None, "ll")])
    try:
        xs = rank_inputs(world, n, dtype, seed, device=device())
        out = torch.full_like(xs[rank], float("nan"))
        comm.all_reduce(xs[rank], out=out)
        torch.testing.assert_close(out.double(), all_reduce_reference(xs), **tol(ROUNDING, dtype))
        try:
            comm.all_reduce(xs[rank], algo="ll")
        except ShardkitError as e:
            return str(e)
        raise AssertionError("algo='ll' ran without the CUDA kernels")
    finally:
        comm.close()
