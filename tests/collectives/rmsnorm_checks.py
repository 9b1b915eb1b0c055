"""Functions that run on every rank of a ProcessWorld, shared by the CPU and GPU tests of the fused
all-reduce + residual add + RMSNorm.

Each rank draws every rank's x, the residual and the weight from seeded generators, so it can compute
the float64 reference by itself; results come back as small picklable summaries (digests, errors).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from shardkit import CollectiveError, Communicator
from shardkit.reference.all_reduce import all_reduce_residual_rmsnorm_reference, rank_inputs
from shardkit.kernels.all_reduce.rmsnorm import RMSNormConfig
from shardkit.testing import capture_graph

from ..tolerances import ROUNDING, tol
from .rank_checks import DTYPES, device, digest, error_messages

EPS = 1e-5


def fused_inputs(world: int, tokens: int, hidden: int, dtype: torch.dtype,
                 seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Every rank's x [tokens, hidden], the (replicated) residual [tokens, hidden] and weight [hidden]."""
    xs = [t.view(tokens, hidden) for t in rank_inputs(world, tokens * hidden, dtype, seed, device())]
    residual = rank_inputs(1, tokens * hidden, dtype, seed + 1, device())[0].view(tokens, hidden)
    weight = rank_inputs(1, hidden, dtype, seed + 2, device())[0]
    return xs, residual, weight


def check_fused(dtype_name: str, cases: list[tuple[int, int]], algos: list[str], buffer_bytes: int,
                seed: int) -> list[str]:
    """For each (tokens, hidden): every algo against the float64 reference, outputs poisoned with NaN
    first, inputs unmodified, algos equal within rounding; for the last case, in-place calls (out=x,
    residual_out=residual) bitwise equal to out-of-place ones. Returns the output digests (to compare
    across ranks)."""
    dtype = DTYPES[dtype_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(buffer_bytes=buffer_bytes)
    digests = []
    try:
        for i, (tokens, hidden) in enumerate(cases):
            xs, residual, weight = fused_inputs(world, tokens, hidden, dtype, seed * 1000 + 10 * i)
            ref_out, ref_res = all_reduce_residual_rmsnorm_reference(xs, residual, weight, EPS)
            x = xs[rank]
            before = [t.clone() for t in (x, residual, weight)]
            first = None
            for algo in algos:
                what = f"{algo} {dtype_name} tokens={tokens} hidden={hidden} world={world}"
                out, res_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
                got = comm.all_reduce_residual_rmsnorm(x, residual, weight, EPS, algo, out=out, residual_out=res_out)
                assert got[0] is out and got[1] is res_out
                for t, b, name in zip((x, residual, weight), before, ("x", "residual", "weight")):
                    assert torch.equal(t, b), f"{what}: {name} was modified"
                torch.testing.assert_close(res_out.double(), ref_res, **tol(ROUNDING, dtype),
                                           msg=lambda m: f"{what}: residual_out: {m}")
                torch.testing.assert_close(out.double(), ref_out, **tol(ROUNDING, dtype),
                                           msg=lambda m: f"{what}: out: {m}")
                if first is None:
                    first = (out, res_out)
                else:  # the algorithms agree up to one rounding of the outputs
                    torch.testing.assert_close(out, first[0], **tol(ROUNDING, dtype))
                    torch.testing.assert_close(res_out, first[1], **tol(ROUNDING, dtype))
                if i == len(cases) - 1:
                    x2, r2 = x.clone(), residual.clone()
                    comm.all_reduce_residual_rmsnorm(x2, r2, weight, EPS, algo, out=x2, residual_out=r2)
                    assert torch.equal(x2, out) and torch.equal(r2, res_out), f"{what}: in-place result differs"
                digests.append(digest(out) + digest(res_out))
    finally:
        comm.close()
    return digests


def check_auto_and_nccl(tokens: int, hidden: int, seed: int) -> float:
    """algo="auto" and algo="nccl" (all_reduce + add + F.rms_norm) against the float64 reference (fp32);
    returns the largest error of out."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator()
    worst = torch.zeros((), dtype=torch.float64)  # torch.maximum keeps a NaN, python's max() may not
    try:
        xs, residual, weight = fused_inputs(world, tokens, hidden, torch.float32, seed)
        ref_out, ref_res = all_reduce_residual_rmsnorm_reference(xs, residual, weight, EPS)
        for algo in ("auto", "nccl"):
            out, res_out = comm.all_reduce_residual_rmsnorm(xs[rank], residual, weight, EPS, algo)
            torch.testing.assert_close(res_out.double(), ref_res, **tol(ROUNDING, torch.float32))
            torch.testing.assert_close(out.double(), ref_out, **tol(ROUNDING, torch.float32))
            worst = torch.maximum(worst, (out.double() - ref_out).abs().max())
        return worst.item()
    finally:
        comm.close()


def bad_inputs() -> list[str]:
    """Every bad argument raises a clear local error; the communicator still works afterwards."""
    comm = Communicator(buffer_bytes=4096)
    gen = torch.Generator().manual_seed(0)  # equal inputs on every rank
    x, r, w = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.randn(8, generator=gen)
    f = comm.all_reduce_residual_rmsnorm
    cases = [
        lambda: f(x.to(torch.int32), r, w),
        lambda: f(torch.randn(8, 3).t(), r, w),
        lambda: f(x, r[:2], w),
        lambda: f(x, r.half(), w),
        lambda: f(x, r, torch.randn(9)),
        lambda: f(x, r, w.half()),
        lambda: f(x, r, w, eps=-1.0),
        lambda: f(x, r, w, algo="ring"),
        lambda: f(x, r, w, out=torch.empty(3, 9)),
        lambda: f(x, r, w, out=x, residual_out=x),
        lambda: f(torch.randn(1, 40000), torch.randn(1, 40000), torch.randn(40000)),
        lambda: f(torch.randn(1, 2000), torch.randn(1, 2000), torch.randn(2000), algo="flat"),
        lambda: f(torch.tensor(1.0), torch.tensor(1.0), torch.randn(1)),
    ]
    try:
        messages = error_messages(cases)
        out, res_out = f(x, r, w, algo="flat")
        torch.testing.assert_close(res_out, r + x * dist.get_world_size())
    finally:
        comm.close()
    return messages


def mismatched_tokens(algo: str) -> str:
    """Rank 1 passes one token more than the others: every rank must raise CollectiveError."""
    rank = dist.get_rank()
    comm = Communicator(timeout_s=20)
    try:
        tokens = 3 + (rank == 1)
        x, r, w = torch.randn(tokens, 16, device=device()), torch.randn(tokens, 16, device=device()), \
            torch.ones(16, device=device())
        try:
            comm.all_reduce_residual_rmsnorm(x, r, w, algo=algo)
            comm.check()
        except CollectiveError as e:
            return str(e)
        raise AssertionError(f"rank {rank}: mismatched fused call returned")
    finally:
        comm.close()


def programs_that_cannot_all_run() -> str:
    """The tree kernel's programs wait for the other chunks of their row. Launched with two
    programs in the interpreter (which runs programs one after another), program 0 waits for
    program 1 forever: the wait must give up and raise a CollectiveError that says why."""
    comm = Communicator(timeout_s=0.5)
    config = RMSNormConfig(programs=2, warps=1, block_c=32)  # rows of 3 chunks, split over 2 programs
    try:
        x, r, w = (torch.randn(4, 96, device=device()), torch.randn(4, 96, device=device()),
                   torch.ones(96, device=device()))
        try:
            comm.all_reduce_residual_rmsnorm(x, r, w, algo="tree", config=config)
            comm.check()
        except CollectiveError as e:
            return str(e)
        raise AssertionError("a tree call whose programs cannot all run returned")
    finally:
        comm.close()


def op_matches_method(tokens: int, hidden: int, seed: int) -> float:
    """torch.ops.shardkit.all_reduce_residual_rmsnorm, eager and under torch.compile, against the method."""
    import shardkit.ops  # noqa: F401  (registers the ops)

    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator()
    name = dist.group.WORLD.group_name
    try:
        xs, residual, weight = fused_inputs(world, tokens, hidden, torch.float32, seed)
        want = comm.all_reduce_residual_rmsnorm(xs[rank], residual, weight, EPS, "flat")
        got = torch.ops.shardkit.all_reduce_residual_rmsnorm(xs[rank], residual, weight, name, EPS, "flat")
        assert all(torch.equal(a, b) for a, b in zip(got, want)), "op differs from the method"

        @torch.compile(fullgraph=True, backend="aot_eager")
        def block(t: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out, res_out = torch.ops.shardkit.all_reduce_residual_rmsnorm(t, res, weight, name, EPS, "tree")
            return out * 2.0, res_out

        out, res_out = block(xs[rank], residual)
        return torch.maximum((out - 2.0 * want[0]).abs().max(), (res_out - want[1]).abs().max()).item()
    finally:
        comm.close()


def graph_replays(tokens: int, hidden: int, replays: int, seed: int) -> dict[str, float]:
    """Capture one-shot, two-shot and nccl fused calls in one CUDA graph (static buffers), replay it
    ``replays`` times with changing inputs; returns each algorithm's worst relative error (accumulated
    on the device, no per-replay sync)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator()
    try:
        pool = [fused_inputs(world, tokens, hidden, torch.bfloat16, seed + i) for i in range(4)]
        refs = [tuple(t.float() for t in all_reduce_residual_rmsnorm_reference(*case, EPS)) for case in pool]
        x, residual, weight = (t.clone() for t in (pool[0][0][rank], pool[0][1], pool[0][2]))
        algos = ("flat", "tree", "nccl")
        outs = {a: (torch.empty_like(x), torch.empty_like(x)) for a in algos}

        def calls() -> None:
            for a in algos:
                comm.all_reduce_residual_rmsnorm(x, residual, weight, EPS, a, out=outs[a][0], residual_out=outs[a][1])

        graph, _ = capture_graph(calls)
        worst = {a: torch.zeros((), device=device()) for a in algos}
        for i in range(replays):
            k = i % len(pool)
            xs, res, w = pool[k]
            x.copy_(xs[rank])
            residual.copy_(res)
            weight.copy_(w)
            for o in outs.values():
                o[0].fill_(float("nan"))
                o[1].fill_(float("nan"))
            graph.replay()
            for a, (out, res_out) in outs.items():
                for got, ref in ((out, refs[k][0]), (res_out, refs[k][1])):
                    err = ((got.float() - ref).abs() / (ref.abs() + 1.0)).max()
                    worst[a] = torch.maximum(worst[a], torch.nan_to_num(err, nan=1e9))
        comm.check()
        return {a: w.item() for a, w in worst.items()}
    finally:
        comm.close()
