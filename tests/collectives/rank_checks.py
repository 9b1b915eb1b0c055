"""Functions that run on every rank of a ProcessWorld, shared by the CPU and GPU all-reduce tests.

Each rank draws every rank's input from a seeded generator, so it can compute the float64
reference sum by itself; results come back as small picklable summaries (errors, digests).
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from shardkit import CollectiveError, Communicator, ShardkitError
from shardkit.reference.all_reduce import all_reduce_reference, rank_inputs
from shardkit.testing import capture_graph

from ..tolerances import ROUNDING, tol

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def error_messages(cases: list) -> list[str]:
    """Run each bad-input case; each must raise TypeError, ValueError or ShardkitError. The messages."""
    messages = []
    for i, case in enumerate(cases):
        try:
            case()
        except (TypeError, ValueError, ShardkitError) as e:
            messages.append(str(e))
        else:
            raise AssertionError(f"bad input accepted (case {i})")
    return messages


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def digest(t: torch.Tensor) -> str:
    raw = t.detach().contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int16)
    return hashlib.sha1(raw.cpu().numpy().tobytes()).hexdigest()


def check_all_reduce(algo: str, dtype_name: str, sizes: list[int], buffer_bytes: int, seed: int,
                     kernels: str = "auto") -> list[str]:
    """Out-of-place, out=, and in-place all-reduce against the float64 sum; returns output digests."""
    dtype = DTYPES[dtype_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(buffer_bytes=buffer_bytes, kernels=kernels)
    digests = []
    try:
        for i, n in enumerate(sizes):
            xs = rank_inputs(world, n, dtype, seed=seed * 1000 + i, device=device())
            ref = all_reduce_reference(xs)
            x = xs[rank]
            x_before = x.clone()
            out = torch.full_like(x, float("nan"))  # poison: every element must be written
            got = comm.all_reduce(x, algo=algo, out=out)
            assert got is out
            assert torch.equal(x, x_before), "all_reduce modified its input"
            torch.testing.assert_close(out.double(), ref, **tol(ROUNDING, dtype),
                                       msg=lambda m: f"{algo} {dtype_name} n={n} world={world}: {m}")
            fresh = comm.all_reduce(x, algo=algo)
            assert torch.equal(fresh, out), "two identical calls gave different results"
            inplace = x.clone()
            assert comm.all_reduce_(inplace, algo=algo) is inplace
            assert torch.equal(inplace, out), "in-place result differs from out-of-place"
            digests.append(digest(out))
    finally:
        comm.close()
    return digests


def check_many_calls(n_calls: int, seed: int, buffer_bytes: int, kernels: str = "auto") -> int:
    """``n_calls`` calls in a row on one communicator, new data and varying size/algo each time."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(buffer_bytes=buffer_bytes, kernels=kernels)
    gen = torch.Generator().manual_seed(seed)
    try:
        for i in range(n_calls):
            n = int(torch.randint(1, 3000, (1,), generator=gen))
            algo = ("flat", "tree")[i % 2]
            dtype = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
            xs = rank_inputs(world, n, dtype, seed=seed * 100_000 + i, device=device())
            out = comm.all_reduce(xs[rank], algo=algo)
            torch.testing.assert_close(out.double(), all_reduce_reference(xs), **tol(ROUNDING, dtype),
                                       msg=lambda m: f"call {i} ({algo}, {dtype}, n={n}): {m}")
    finally:
        comm.close()
    return n_calls


def check_zero_copy(algo: str, n: int, seed: int, kernels: str = "auto") -> str:
    """Inputs written into the staging buffer are reduced without a copy and are left untouched."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(kernels=kernels)
    try:
        xs = rank_inputs(world, n, torch.float32, seed=seed, device=device())
        ref = all_reduce_reference(xs)
        buf = comm.staging_buffer((n,), torch.float32)
        buf.copy_(xs[rank])
        out = torch.full_like(buf, float("nan"))
        comm.all_reduce(buf, algo=algo, out=out)
        torch.testing.assert_close(out.double(), ref, **tol(ROUNDING, torch.float32))
        assert torch.equal(buf, xs[rank]), "zero-copy all_reduce modified its input"
        comm.all_reduce_(buf, algo=algo)
        assert torch.equal(buf, out), "in-place zero-copy result differs"
        return digest(out)
    finally:
        comm.close()


def mismatched_call(kind: str, algo: str, kernels: str = "auto") -> str:
    """Ranks disagree about the call (``kind``: 'numel', 'dtype' or 'kernels'); every rank must raise."""
    rank = dist.get_rank()
    if kind == "kernels":
        kernels = "cuda" if rank == 1 else "triton"
    comm = Communicator(timeout_s=20, kernels=kernels)
    try:
        n = 1000 + (rank if kind == "numel" else 0)
        dtype = torch.float16 if (kind == "dtype" and rank == 1) else torch.float32
        x = torch.randn(n, device=device()).to(dtype)
        try:
            out = comm.all_reduce(x, algo=algo)
            comm.check()
        except CollectiveError as e:
            text = str(e)
            try:
                comm.all_reduce(x, algo=algo)
            except CollectiveError:
                return text
            raise AssertionError("a broken communicator accepted another call")
        raise AssertionError(f"rank {rank}: mismatched call returned {out[:4]}")
    finally:
        comm.close()


def absent_peer(absent: int, timeout_s: float, kernels: str = "auto") -> str:
    """Rank ``absent`` never calls; the others must fail within the timeout, naming it."""
    rank = dist.get_rank()
    comm = Communicator(timeout_s=timeout_s, kernels=kernels)
    try:
        if rank == absent:
            return ""
        x = torch.ones(100, device=device())
        try:
            out = comm.all_reduce(x, algo="flat")
            comm.check()
        except CollectiveError as e:
            return str(e)
        raise AssertionError(f"rank {rank}: call without rank {absent} returned {out[:4]}")
    finally:
        dist.barrier()  # the absent rank must not tear down its memory while peers still write flags
        comm.close()


def graph_replays(n: int, replays: int, seed: int, kernels: str = "auto") -> float:
    """Capture flat + tree in one CUDA graph, replay it ``replays`` times with changing inputs;
    returns the worst relative error seen (accumulated on the device, no per-replay sync)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(kernels=kernels)
    try:
        pool = [rank_inputs(world, n, torch.bfloat16, seed + i, device=device()) for i in range(8)]
        refs = [all_reduce_reference(xs).float() for xs in pool]
        x = pool[0][rank].clone()
        flat, tree = torch.empty_like(x), torch.empty_like(x)
        graph, _ = capture_graph(lambda: (comm.all_reduce(x, algo="flat", out=flat),
                                          comm.all_reduce(x, algo="tree", out=tree)))
        worst = torch.zeros((), device=device())
        for i in range(replays):
            k = i % len(pool)
            x.copy_(pool[k][rank])
            flat.fill_(float("nan"))
            tree.fill_(float("nan"))
            graph.replay()
            for got in (flat, tree):
                err = ((got.float() - refs[k]).abs() / (refs[k].abs() + 1.0)).max()
                worst = torch.maximum(worst, torch.nan_to_num(err, nan=1e9))
        comm.check()
        return worst.item()
    finally:
        comm.close()


def timed_absent_peer(absent: int, timeout_s: float, kernels: str = "auto") -> tuple[str, float]:
    """absent_peer, plus the seconds the waiting ranks took to give up (GPU poll-rate check)."""
    import time
    t0 = time.perf_counter()
    text = absent_peer(absent, timeout_s, kernels)
    return text, time.perf_counter() - t0
