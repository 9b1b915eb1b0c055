"""Functions run on every rank of a ProcessWorld for the copy-engine all-reduce tests (CPU and GPU).

Every rank rebuilds all ranks' inputs from a seed (``rank_inputs``), so it checks its result
against the float64 sum by itself; results come back as digests, compared across ranks by the test.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from shardkit import CollectiveError, Communicator
from shardkit.collectives import copy_engine
from shardkit.reference.all_reduce import all_reduce_reference, rank_inputs

from ..tolerances import ROUNDING, tol
from .rank_checks import DTYPES, device, digest, error_messages


def _check(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values (an element was not written?)"
    torch.testing.assert_close(got.double(), ref, **tol(ROUNDING, got.dtype), msg=lambda m: f"{what}: {m}")


def check_copy_all_reduce(dtype_name: str, sizes: list[int], buffer_bytes: int, chunk_bytes: int | None,
                          seed: int, compare_tree: bool, sync: str = "barriers", gather: str = "ce",
                          copy_streams: int = 1) -> list[str]:
    """Each size in every mode (out-of-place, in place, zero-copy out-of-place and in place when the
    message fits the staging area), with ``chunk_bytes`` pipeline chunks (None: the launch policy's)
    and the ``sync``/``gather``/``copy_streams`` schedule, against the float64 sum; all modes bitwise equal, and equal
    to the tree kernel's bits when ``compare_tree``. Returns one digest per size."""
    dtype = DTYPES[dtype_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(buffer_bytes=buffer_bytes)
    config = None
    if chunk_bytes is not None or (sync, gather, copy_streams) != ("barriers", "ce", 1):
        es = torch.empty((), dtype=dtype).element_size()
        policy = copy_engine.copy_config(1 << 20, world, buffer_bytes, es, dist.get_backend() != "nccl")
        config = copy_engine.CopyConfig(chunk_bytes or policy.chunk_bytes, sync, gather, copy_streams)

    def run(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if config is None:
            return comm.all_reduce(x, algo="copy", out=out)
        return copy_engine.all_reduce(comm.memory, x, out, timeout_iters=comm._timeout_iters, config=config)

    digests = []
    try:
        for i, n in enumerate(sizes):
            xs = rank_inputs(world, n, dtype, seed=seed * 1000 + i, device=device())
            ref = all_reduce_reference(xs)
            x = xs[rank]
            what = f"copy {dtype_name} n={n} world={world} chunk={chunk_bytes} {sync}/{gather}/{copy_streams}"

            out = torch.full_like(x, float("nan"))  # poison: every element must be written
            assert run(x, out) is out
            assert torch.equal(x, xs[rank]), f"{what}: the input was modified"
            _check(out, ref, what + " out-of-place")

            inplace = x.clone()
            run(inplace, inplace)
            assert torch.equal(inplace, out), f"{what}: in place differs from out-of-place"

            if n * x.element_size() <= comm.memory.buffer_bytes:
                staged = comm.staging_buffer(x.shape, dtype)
                staged.copy_(x)
                out_zc = torch.full_like(x, float("nan"))
                run(staged, out_zc)
                assert torch.equal(staged, x), f"{what}: zero-copy input was modified"
                assert torch.equal(out_zc, out), f"{what}: zero-copy differs from out-of-place"
                staged.fill_(float("nan"))
                staged.copy_(x)
                run(staged, staged)  # the push path
                assert torch.equal(staged, out), f"{what}: zero-copy in place differs from out-of-place"

            if compare_tree:
                tree = comm.all_reduce(x, algo="tree")
                assert torch.equal(tree, out), f"{what}: bits differ from the tree kernel's"
            digests.append(digest(out))
        comm.check()
    finally:
        comm.close()
    return digests


def check_shard_hook(n: int, seed: int, sync: str = "barriers", gather: str = "ce") -> list[str]:
    """A shard hook (x2, in place) on both all-gather paths of the ``sync``/``gather`` schedule: the
    result is twice the sum; the hook sees each chunk of this rank's shard once per call."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(buffer_bytes=16384)
    digests = []
    try:
        xs = rank_inputs(world, n, torch.float32, seed=seed, device=device())
        ref = all_reduce_reference(xs) * 2
        calls = []

        def double(shard: torch.Tensor) -> None:
            calls.append(shard.numel())
            shard.mul_(2)

        kw = dict(timeout_iters=comm._timeout_iters, config=copy_engine.CopyConfig(1024, sync, gather),
              shard_hook=double)
        out = torch.full_like(xs[rank], float("nan"))
        copy_engine.all_reduce(comm.memory, xs[rank], out, **kw)
        _check(out, ref, "hook, pull all-gather")
        staged = comm.staging_buffer((n,), torch.float32)
        staged.copy_(xs[rank])
        copy_engine.all_reduce(comm.memory, staged, staged, **kw)
        assert torch.equal(staged, out), "hook, push all-gather differs from the pull all-gather"
        shard = copy_engine.shard_elements(n, world)
        lo, hi = min(rank * shard, n), min((rank + 1) * shard, n)
        chunks = [min(256, hi - c) for c in range(lo, hi, 256)]  # 1024-byte fp32 chunks of our shard
        assert calls == chunks * 2, calls
        digests.append(digest(out))
        comm.check()
    finally:
        comm.close()
    return digests


def check_mixed_calls(seed: int) -> int:
    """copy, flat, tree, auto-picked copy, zero-copy copy calls interleaved on one communicator (they
    share the workspace and the call epoch); each against float64. Returns the number of calls."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(buffer_bytes=8192, rules=[(1024, "flat"), (None, "copy")])
    algos = ["copy", "flat", "copy", "tree", "auto", "copy", "auto"]
    sizes = [3000, 200, 1500, 900, 100, 5, 2500]
    try:
        for i, (algo, n) in enumerate(zip(algos, sizes)):
            xs = rank_inputs(world, n, torch.float32, seed=seed * 100 + i, device=device())
            x = xs[rank]
            if i == 5:  # zero-copy in place
                x = comm.staging_buffer((n,), torch.float32)
                x.copy_(xs[rank])
                got = comm.all_reduce_(x, algo=algo)
            else:
                got = comm.all_reduce(x, algo=algo)
            _check(got, all_reduce_reference(xs), f"call {i} ({algo}, n={n})")
        comm.check()
    finally:
        comm.close()
    return len(algos)


def mismatched_copy_call(schedules: tuple[tuple[str, str], ...] = (("barriers", "ce"),)) -> str:
    """Rank 0 calls with another element count (or, with two ``schedules``, rank 0 uses the first
    (sync, gather) schedule and the others the second): every rank raises CollectiveError (no hang)."""
    rank = dist.get_rank()
    comm = Communicator(buffer_bytes=8192)
    try:
        sync, gather = schedules[min(rank, len(schedules) - 1)]
        n = 1000 + (7 if rank == 0 and len(schedules) == 1 else 0)
        x = torch.ones(n, device=device())
        try:
            copy_engine.all_reduce(comm.memory, x, torch.empty_like(x), timeout_iters=comm._timeout_iters,
                                   config=copy_engine.CopyConfig(1024, sync, gather))
            comm.check()
        except CollectiveError as e:
            return str(e)
        raise AssertionError("a mismatched call did not raise")
    finally:
        comm.close()


def copy_bad_inputs() -> list[str]:
    """Bad arguments raise TypeError/ValueError naming them, on every rank, before any transfer; and
    PeerMemory.peer_view refuses ranks, misaligned offsets and ranges outside the workspace."""
    comm = Communicator(buffer_bytes=8192)
    mem, dev = comm.memory, device()
    x = torch.ones(100, device=dev)
    try:
        return error_messages([
            lambda: copy_engine.all_reduce(mem, x.int(), x.int(), timeout_iters=10),
            lambda: copy_engine.all_reduce(mem, x, torch.ones(99, device=dev), timeout_iters=10),
            lambda: copy_engine.all_reduce(mem, torch.ones(10, 10, device=dev).t(), torch.ones(10, 10, device=dev),
                                           timeout_iters=10),
            lambda: copy_engine.all_reduce(mem, x, x, timeout_iters=10, config=copy_engine.CopyConfig(0)),
            lambda: copy_engine.all_reduce(mem, x, x, timeout_iters=10, config=(4096,)),
            lambda: copy_engine.all_reduce(mem, x, x, timeout_iters=10, config=copy_engine.CopyConfig(4096, "flag")),
            lambda: copy_engine.all_reduce(mem, x, x, timeout_iters=10, config=copy_engine.CopyConfig(4096, "barriers",
                                                                                                     "sm")),
            lambda: copy_engine.all_reduce(mem, x, x, timeout_iters=10,
                                           config=copy_engine.CopyConfig(4096, "flags", "sm"),
                                           shard_hook=lambda chunk: None),
            lambda: copy_engine.all_reduce(mem, x, x, timeout_iters=10,
                                           config=copy_engine.CopyConfig(4096, "flags", "ce", 0)),
            lambda: copy_engine.all_reduce(mem, x, x, timeout_iters=10,
                                           config=copy_engine.CopyConfig(4096, "barriers", "ce", 2)),
            lambda: comm.all_reduce(x.half(), algo="copy", out=x),
            lambda: mem.peer_view(dist.get_world_size(), 0, 1, torch.float32),
            lambda: mem.peer_view(0, 2, 1, torch.float32),
            lambda: mem.peer_view(0, mem.nbytes - 4, 2, torch.float32),
            lambda: copy_engine.all_reduce(mem, x, x, timeout_iters=10, config=copy_engine.CopyConfig(4096, "oneshot"),
                                           shard_hook=lambda chunk: None),
            lambda: copy_engine.all_reduce(mem, x, x, timeout_iters=10,
                                           config=copy_engine.CopyConfig(4096, "oneshot", "sm")),
        ])
    finally:
        comm.close()


def copy_graph_replays(n: int, replays: int, seed: int, sync: str = "barriers", gather: str = "ce",
                       copy_streams: int = 1, buffer_bytes: int | None = None) -> float:
    """CUDA graph of an out-of-place and a zero-copy in-place copy all-reduce (the ``sync``/``gather``
    schedule), replayed on fresh inputs; returns the worst relative error (inputs change between
    replays, so a graph that froze any per-call state would be caught). A ``buffer_bytes`` below the
    message (oneshot: its ring of slots) takes an ordinary tensor in place instead of the staged one."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(buffer_bytes=buffer_bytes or 4 * n * 2)
    config = copy_engine.CopyConfig(max(256, n * 2 // world // 3), sync, gather, copy_streams)  # a few chunks
    x = torch.empty(n, dtype=torch.bfloat16, device=device())
    out = torch.empty_like(x)
    staged = (comm.staging_buffer((n,), torch.bfloat16) if n * 2 <= comm.memory.buffer_bytes
              else torch.empty_like(x))
    kw = dict(timeout_iters=comm._timeout_iters, config=config)
    worst = 0.0
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (compiles the barrier kernel) outside the capture
            copy_engine.all_reduce(comm.memory, x.normal_(), out, **kw)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            copy_engine.all_reduce(comm.memory, x, out, **kw)
            copy_engine.all_reduce(comm.memory, staged, staged, **kw)
        for i in range(replays):
            xs = rank_inputs(world, n, torch.bfloat16, seed=seed * 100_000 + i, device=device())
            ys = rank_inputs(world, n, torch.bfloat16, seed=seed * 100_000 + i + 50_000, device=device())
            x.copy_(xs[rank])
            staged.copy_(ys[rank])
            graph.replay()
            for got, inputs in ((out, xs), (staged, ys)):
                ref = all_reduce_reference(inputs)
                err = ((got.double() - ref).norm() / ref.norm()).item()
                worst = max(worst, err if err == err else float("inf"))
        comm.check()
    finally:
        comm.close()
    return worst


def auto_copy_on_default_workspace(n: int, seed: int) -> str:
    """``auto`` under rules that pick copy, on the default workspace (smaller than the message: on 2 GPUs
    the flags schedule in chunks of two slots of T), out of place, in place and in a CUDA graph replayed on fresh inputs,
    against float64; the out-of-place and in-place bits equal. Returns a digest."""
    from shardkit.testing import capture_graph

    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(rules=[(1 << 20, "flat"), (None, "copy")])
    try:
        assert n * 2 > 2 * comm.memory.buffer_bytes, "the message must overflow T (two epoch buffers)"
        xs = rank_inputs(world, n, torch.bfloat16, seed=seed, device=device())
        ref = all_reduce_reference(xs)
        out = torch.full_like(xs[rank], float("nan"))
        comm.all_reduce(xs[rank], out=out)
        _check(out, ref, "auto -> copy, out of place")
        inplace = xs[rank].clone()
        comm.all_reduce_(inplace)
        assert torch.equal(inplace, out), "auto -> copy: in place differs from out of place"
        x, y = torch.empty_like(out), torch.empty_like(out)
        graph, _ = capture_graph(lambda: comm.all_reduce(x, out=y), 1)
        xs = rank_inputs(world, n, torch.bfloat16, seed=seed + 1, device=device())
        x.copy_(xs[rank])
        graph.replay()
        _check(y, all_reduce_reference(xs), "auto -> copy, graph replay")
        comm.check()
        return digest(out)
    finally:
        comm.close()


def check_oneshot_interleaved(seed: int) -> int:
    """oneshot calls (one barrier each: no end barrier) back to back and between flat, tree, the barrier
    and flags schedules and each other on one communicator, out of place, in place and through the ring;
    each against float64. Returns the number of calls."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(buffer_bytes=8192)
    oneshot = copy_engine.CopyConfig(1024, "oneshot")
    calls = [("oneshot", 3000), ("oneshot", 900), ("flat", 200), ("oneshot", 9000), ("tree", 900),
             ("oneshot", 100), (copy_engine.CopyConfig(1024), 1500), ("oneshot", 2500),
             (copy_engine.CopyConfig(1024, "flags"), 1500), ("oneshot", 7)]
    try:
        for i, (algo, n) in enumerate(calls):
            xs = rank_inputs(world, n, torch.float32, seed=seed * 100 + i, device=device())
            x = xs[rank].clone()
            out = x if i % 3 == 1 else torch.full_like(x, float("nan"))  # every third call in place
            if algo in ("flat", "tree"):
                comm.all_reduce(x, algo=algo, out=out)
            else:
                config = oneshot if algo == "oneshot" else algo
                copy_engine.all_reduce(comm.memory, x, out, timeout_iters=comm._timeout_iters, config=config)
            _check(out, all_reduce_reference(xs), f"call {i} ({algo}, n={n})")
        comm.check()
    finally:
        comm.close()
    return len(calls)
