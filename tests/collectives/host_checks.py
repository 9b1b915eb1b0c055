"""Functions run on every rank of a ProcessWorld for the C++ host path tests (test_host_path.py on the
CPU, test_host_path_gpu.py on GPUs): the C++ path against the Python path on the same kernels (bitwise
equal), against the float64 sum, in CUDA graphs, and on its error paths."""
from __future__ import annotations

import torch
import torch.distributed as dist

from shardkit import CollectiveError, Communicator
from shardkit.reference.all_reduce import all_reduce_reference, rank_inputs
from shardkit.testing import capture_graph

from ..tolerances import ROUNDING, tol
from .rank_checks import DTYPES, device, digest, error_messages


def host_path_errors() -> list[str]:
    """The Communicator's host_path argument: an unknown value, and 'cpp' where it cannot run."""
    return error_messages([lambda: Communicator(host_path="c++"), lambda: Communicator(host_path="cpp")])


TIMEOUT_S = 10.0  # a kernel that never meets its peers fails the test in seconds, not a minute


def _pair(buffer_bytes: int) -> tuple[Communicator, Communicator]:
    cpp = Communicator(buffer_bytes=buffer_bytes, kernels="cuda", host_path="cpp", timeout_s=TIMEOUT_S)
    assert cpp._host is not None, "the C++ host path is not in use"
    return cpp, Communicator(buffer_bytes=buffer_bytes, kernels="cuda", host_path="python", timeout_s=TIMEOUT_S)


def cpp_matches_python(algo: str, dtype_name: str, sizes: list[int], buffer_bytes: int, seed: int) -> list[str]:
    """Every way to call all_reduce with ``algo`` on both host paths: out-of-place (into a poisoned
    out and into a new tensor), in place, out as another view of x, unaligned x (the element path),
    chunked sizes; the results must be bitwise equal, close to the float64 sum, and x must be left as
    it was."""
    dtype = DTYPES[dtype_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    cpp, python = _pair(buffer_bytes)
    digests = []
    try:
        for i, n in enumerate(sizes):
            xs = rank_inputs(world, n + 1, dtype, seed=seed * 1000 + i, device=device())
            for shift in (0, 1):  # shift 1: x starts one element into its memory (the unaligned path)
                want = all_reduce_reference([t[shift:shift + n] for t in xs])
                x = xs[rank].clone()[shift:shift + n]
                x_before = x.clone()
                outs = {}
                for name, comm in (("cpp", cpp), ("python", python)):
                    out = torch.full_like(x, float("nan"))  # poison: every element must be written
                    assert comm.all_reduce(x, algo=algo, out=out) is out
                    fresh = comm.all_reduce(x, algo=algo)
                    inplace = x.clone()
                    assert comm.all_reduce_(inplace, algo=algo) is inplace
                    view = x.clone()
                    assert comm.all_reduce(view, algo=algo, out=view[:]).data_ptr() == view.data_ptr()
                    assert torch.equal(x, x_before), f"{name}: all_reduce modified its input"
                    for other in (fresh, inplace, view):
                        assert torch.equal(other, out), f"{name} {algo} n={n}: results differ between calls"
                    outs[name] = out
                assert torch.equal(outs["cpp"], outs["python"]), f"{algo} n={n}: C++ and Python paths differ"
                torch.testing.assert_close(outs["cpp"].double(), want, **tol(ROUNDING, dtype),
                                           msg=lambda m: f"{algo} {dtype_name} n={n} shift={shift}: {m}")
                digests.append(digest(outs["cpp"]))
        cpp.check()
        python.check()
    finally:
        cpp.close()
        python.close()
    return digests


def mixed_paths(algo: str, sizes: list[int], seed: int) -> list[str]:
    """Rank 0 on the C++ path, the others on the Python path: the calls (fingerprints included) are
    the same, so they meet at every barrier and get the float64 sum."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(buffer_bytes=1 << 20, kernels="cuda", host_path="cpp" if rank == 0 else "python",
                        timeout_s=TIMEOUT_S)
    digests = []
    try:
        for i, n in enumerate(sizes):
            xs = rank_inputs(world, n, torch.bfloat16, seed=seed * 1000 + i, device=device())
            out = comm.all_reduce(xs[rank], algo=algo)
            torch.testing.assert_close(out.double(), all_reduce_reference(xs), **tol(ROUNDING, torch.bfloat16))
            digests.append(digest(out))
        comm.check()
    finally:
        comm.close()
    return digests


def cpp_zero_copy(algo: str, n: int, seed: int) -> str:
    """Inputs in the staging buffer go through the C++ path without a copy, as on the Python path."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cpp, python = _pair(32 << 20)
    try:
        xs = rank_inputs(world, n, torch.float32, seed=seed, device=device())
        results = []
        for comm in (cpp, python):
            buf = comm.staging_buffer((n,), torch.float32)
            buf.copy_(xs[rank])
            out = torch.full_like(buf, float("nan"))
            comm.all_reduce(buf, algo=algo, out=out)
            assert torch.equal(buf, xs[rank]), "zero-copy all_reduce modified its input"
            comm.all_reduce_(buf, algo=algo)
            assert torch.equal(buf, out), "in-place zero-copy result differs"
            results.append(out)
        assert torch.equal(results[0], results[1]), "C++ and Python paths differ"
        torch.testing.assert_close(results[0].double(), all_reduce_reference(xs), **tol(ROUNDING, torch.float32))
        return digest(results[0])
    finally:
        cpp.close()
        python.close()


def cpp_graph_replays(n: int, replays: int, seed: int) -> float:
    """flat, tree and auto (into a new tensor: allocated in the graph's pool) on the C++ path, captured
    in one CUDA graph and replayed with changing inputs; the worst relative error seen."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(kernels="cuda", host_path="cpp")
    try:
        pool = [rank_inputs(world, n, torch.bfloat16, seed + i, device=device()) for i in range(4)]
        refs = [all_reduce_reference(xs).float() for xs in pool]
        x = pool[0][rank].clone()
        flat, tree = torch.empty_like(x), torch.empty_like(x)

        def calls() -> torch.Tensor:
            comm.all_reduce(x, algo="flat", out=flat)
            comm.all_reduce(x, algo="tree", out=tree)
            return comm.all_reduce(x)

        graph, auto = capture_graph(calls)
        worst = torch.zeros((), device=device())
        for i in range(replays):
            k = i % len(pool)
            x.copy_(pool[k][rank])
            for t in (flat, tree, auto):
                t.fill_(float("nan"))
            graph.replay()
            for got in (flat, tree, auto):
                err = ((got.float() - refs[k]).abs() / (refs[k].abs() + 1.0)).max()
                worst = torch.maximum(worst, torch.nan_to_num(err, nan=1e9))
        comm.check()
        return worst.item()
    finally:
        comm.close()


def cpp_mismatch(kind: str) -> str:
    """Ranks disagree (element count or dtype) on the C++ path: every rank raises CollectiveError, and
    the broken communicator refuses the next call."""
    rank = dist.get_rank()
    comm = Communicator(timeout_s=20, kernels="cuda", host_path="cpp")
    try:
        n = 1000 + (rank if kind == "numel" else 0)
        dtype = torch.float16 if (kind == "dtype" and rank == 1) else torch.float32
        x = torch.randn(n, device=device()).to(dtype)
        try:
            comm.all_reduce(x, algo="flat")
            comm.check()
        except CollectiveError as e:
            try:
                comm.all_reduce(x, algo="flat")
            except CollectiveError:
                return str(e)
            raise AssertionError("a broken communicator accepted another call")
        raise AssertionError(f"rank {rank}: mismatched call succeeded")
    finally:
        comm.close()


def cpp_absent_peer(absent: int, timeout_s: float) -> str:
    """Rank ``absent`` never calls; the others (C++ path) fail within the timeout, naming it."""
    rank = dist.get_rank()
    comm = Communicator(timeout_s=timeout_s, kernels="cuda", host_path="cpp")
    try:
        if rank == absent:
            return ""
        try:
            comm.all_reduce(torch.ones(100, device=device()), algo="tree")
            comm.check()
        except CollectiveError as e:
            return str(e)
        raise AssertionError(f"rank {rank}: call without rank {absent} succeeded")
    finally:
        dist.barrier()  # the absent rank must not tear down its memory while peers still write flags
        comm.close()
