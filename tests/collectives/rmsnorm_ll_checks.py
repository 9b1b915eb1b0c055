"""Functions run on every rank for the LL fused all-reduce + residual + RMSNorm's tests
(csrc/dda/ll_rmsnorm.cu; test_all_reduce_rmsnorm_ll_gpu.py on GPUs, test_all_reduce_rmsnorm_ll.py on the CPU):
float64 reference, the Triton fused kernels, both host paths, in place, CUDA-graph replays, auto, error paths."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from shardkit import CollectiveError, Communicator, ShardkitError
from shardkit.reference.all_reduce import all_reduce_residual_rmsnorm_reference
from shardkit.testing import capture_graph

from ..tolerances import ROUNDING, tol
from .rank_checks import DTYPES, device, digest
from .rmsnorm_checks import EPS, fused_inputs

TIMEOUT_S = 10.0  # a kernel that never meets its peers fails the test in seconds


def _comms(buffer_bytes: int) -> dict[str, Communicator]:
    cpp = Communicator(buffer_bytes=buffer_bytes, kernels="cuda", host_path="cpp", timeout_s=TIMEOUT_S)
    assert cpp._host is not None, "the C++ host path is not in use"
    return {"cpp": cpp, "python": Communicator(buffer_bytes=buffer_bytes, kernels="cuda", host_path="python",
                                               timeout_s=TIMEOUT_S)}


def matches_reference_and_triton(dtype_name: str, cases: list[tuple[int, int]], seed: int) -> tuple[list[str], float]:
    """For each (tokens, hidden): algo="ll" on both host paths (bitwise equal) against the float64 reference,
    outputs poisoned first, inputs unmodified; residual_out bitwise the Triton flat kernel's, out within one
    rounding of it; in place (out=x, residual_out=residual, and out=residual, residual_out=x) bitwise the
    out-of-place result. Returns (digests to compare across ranks, fraction of out elements bitwise equal to
    the Triton flat kernel's)."""
    dtype = DTYPES[dtype_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    comms = _comms(1 << 20)
    digests, equal, total = [], 0, 0
    try:
        for i, (tokens, hidden) in enumerate(cases):
            xs, residual, weight = fused_inputs(world, tokens, hidden, dtype, seed * 1000 + 10 * i)
            ref_out, ref_res = all_reduce_residual_rmsnorm_reference(xs, residual, weight, EPS)
            x = xs[rank]
            before = [t.clone() for t in (x, residual, weight)]
            what = f"ll {dtype_name} tokens={tokens} hidden={hidden} world={world}"
            got = {}
            for name, comm in comms.items():
                out, res_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
                result = comm.all_reduce_residual_rmsnorm(x, residual, weight, EPS, "ll", out=out, residual_out=res_out)
                assert result[0] is out and result[1] is res_out, f"{what} {name}: outputs are not the ones passed"
                fresh = comm.all_reduce_residual_rmsnorm(x, residual, weight, EPS, "ll")
                assert torch.equal(fresh[0], out) and torch.equal(fresh[1], res_out), \
                    f"{what} {name}: new tensors differ"
                for t, b, arg in zip((x, residual, weight), before, ("x", "residual", "weight")):
                    assert torch.equal(t, b), f"{what} {name}: {arg} was modified"
                got[name] = (out, res_out)
            out, res_out = got["cpp"]
            assert torch.equal(out, got["python"][0]) and torch.equal(res_out, got["python"][1]), \
                f"{what}: C++ and Python host paths differ"
            torch.testing.assert_close(res_out.double(), ref_res, **tol(ROUNDING, dtype),
                                       msg=lambda m: f"{what}: residual_out: {m}")
            torch.testing.assert_close(out.double(), ref_out, **tol(ROUNDING, dtype), msg=lambda m: f"{what}: out: {m}")
            flat_out, flat_res = comms["cpp"].all_reduce_residual_rmsnorm(x, residual, weight, EPS, "flat")
            assert torch.equal(res_out, flat_res), f"{what}: residual_out differs bitwise from the Triton flat kernel"
            torch.testing.assert_close(out, flat_out, **tol(ROUNDING, dtype), msg=lambda m: f"{what}: out vs flat: {m}")
            equal += int((out == flat_out).sum().item())
            total += out.numel()
            for name, comm in comms.items():
                x2, r2 = x.clone(), residual.clone()
                comm.all_reduce_residual_rmsnorm(x2, r2, weight, EPS, "ll", out=x2, residual_out=r2)
                assert torch.equal(x2, out) and torch.equal(r2, res_out), \
                    f"{what} {name}: in place (x, residual) differs"
                x2, r2 = x.clone(), residual.clone()
                comm.all_reduce_residual_rmsnorm(x2, r2, weight, EPS, "ll", out=r2, residual_out=x2)
                assert torch.equal(r2, out) and torch.equal(x2, res_out), \
                    f"{what} {name}: in place (residual, x) differs"
            digests.append(digest(out) + digest(res_out))
        for comm in comms.values():
            comm.check()
    finally:
        for comm in comms.values():
            comm.close()
    return digests, equal / max(total, 1)


def graph_replays(tokens: int, hidden: int, replays: int, seed: int) -> tuple[float, float]:
    """Capture ll (C++ host path), an LL all-reduce and the Triton flat fused kernel in one CUDA graph, replay
    it ``replays`` times with changing inputs and NaN-poisoned outputs; returns (worst relative error of ll vs
    float64, largest |residual_out(ll) - residual_out(flat)|), accumulated on the device (NaN counts 1e9)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(kernels="cuda", host_path="cpp", timeout_s=TIMEOUT_S)
    try:
        pool = [fused_inputs(world, tokens, hidden, torch.bfloat16, seed + i) for i in range(4)]
        refs = [tuple(t.float() for t in all_reduce_residual_rmsnorm_reference(*case, EPS)) for case in pool]
        x, residual, weight = (t.clone() for t in (pool[0][0][rank], pool[0][1], pool[0][2]))
        outs = {a: (torch.empty_like(x), torch.empty_like(x)) for a in ("ll", "flat")}
        summed = torch.empty_like(x)

        def calls() -> None:
            for a, (o, ro) in outs.items():
                comm.all_reduce_residual_rmsnorm(x, residual, weight, EPS, a, out=o, residual_out=ro)
            comm.all_reduce(x, algo="ll", out=summed)  # LL calls of both kinds share the counter and slots

        graph, _ = capture_graph(calls)
        worst = torch.zeros((), device=device())
        apart = torch.zeros((), device=device())
        for i in range(replays):
            k = i % len(pool)
            xs, res, w = pool[k]
            x.copy_(xs[rank])
            residual.copy_(res)
            weight.copy_(w)
            for o, ro in outs.values():
                o.fill_(float("nan"))
                ro.fill_(float("nan"))
            graph.replay()
            out, res_out = outs["ll"]
            for got, ref in ((out, refs[k][0]), (res_out, refs[k][1])):
                err = ((got.float() - ref).abs() / (ref.abs() + 1.0)).max()
                worst = torch.maximum(worst, torch.nan_to_num(err, nan=1e9))
            gap = (res_out.float() - outs["flat"][1].float()).abs().max()
            apart = torch.maximum(apart, torch.nan_to_num(gap, nan=1e9))
        comm.check()
        return worst.item(), apart.item()
    finally:
        comm.close()


def auto_picks_ll(tokens: int, hidden: int, seed: int) -> str:
    """With measured LL rules (thresholds.rmsnorm_ll_max_bytes patched: 1 MiB in eager mode, less than x in
    graphs), eager algo="auto" runs the LL kernel (bitwise ll's result, chunked calls too) and flat/tree beyond
    the rule; under CUDA-graph capture the C++ host path sees the capture and takes the graph rule (flat or tree:
    bitwise that kernel's eager result). Returns the digest of the eager auto result."""
    from shardkit import thresholds

    rank, world = dist.get_rank(), dist.get_world_size()
    nbytes = tokens * hidden * 2
    measured = thresholds.rmsnorm_ll_max_bytes
    thresholds.rmsnorm_ll_max_bytes = lambda *args, mode="graph", **kwargs: nbytes // 2 if mode == "graph" else 1 << 20
    try:
        comm = Communicator(kernels="cuda", host_path="cpp", timeout_s=TIMEOUT_S)
    finally:
        thresholds.rmsnorm_ll_max_bytes = measured
    try:
        xs, residual, weight = fused_inputs(world, tokens, hidden, torch.bfloat16, seed)
        x = xs[rank]
        assert comm._rmsnorm_auto(x) == "ll", comm._rmsnorm_auto(x)
        assert comm._rmsnorm_auto(x, capturing=True) in ("flat", "tree"), comm._rmsnorm_auto(x, capturing=True)
        assert not comm._host.capturing()
        auto = comm.all_reduce_residual_rmsnorm(x, residual, weight, EPS, "auto")
        ll = comm.all_reduce_residual_rmsnorm(x, residual, weight, EPS, "ll")
        assert torch.equal(auto[0], ll[0]) and torch.equal(auto[1], ll[1]), "auto differs from ll"
        chunked = torch.cat([x] * 3)  # 3 LL launches at 16 rows x 8192 per launch
        assert comm._rmsnorm_auto(chunked) == "ll", comm._rmsnorm_auto(chunked)
        big = torch.empty(2048, hidden, dtype=torch.bfloat16, device=device())  # 2048 x hidden x 2 > 1 MiB
        assert comm._rmsnorm_auto(big) in ("flat", "tree"), comm._rmsnorm_auto(big)
        graph_algo = comm._rmsnorm_auto(x, capturing=True)
        want = comm.all_reduce_residual_rmsnorm(x, residual, weight, EPS, graph_algo)  # compiled outside the capture
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        seen = []

        def call() -> None:
            seen.append(comm._host.capturing())
            comm.all_reduce_residual_rmsnorm(x, residual, weight, EPS, "auto", out=out, residual_out=res_out)

        graph, _ = capture_graph(call)
        assert seen[-1], "the C++ host path did not see the capture"
        out.fill_(float("nan"))
        res_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want[0]) and torch.equal(res_out, want[1]), f"auto in a graph differs from {graph_algo}"
        comm.check()
        return digest(auto[0]) + digest(auto[1])
    finally:
        comm.close()


def mismatched_rows() -> str:
    """Rank 1 passes one row more: every rank raises CollectiveError (ll's slot header carries the call)."""
    rank = dist.get_rank()
    comm = Communicator(kernels="cuda", timeout_s=TIMEOUT_S)
    try:
        tokens = 3 + (rank == 1)
        x, r = (torch.randn(tokens, 1000, device=device()) for _ in range(2))
        try:
            comm.all_reduce_residual_rmsnorm(x, r, torch.ones(1000, device=device()), algo="ll")
            comm.check()
        except CollectiveError as e:
            return str(e)
        raise AssertionError(f"rank {rank}: mismatched ll call returned")
    finally:
        comm.close()


def absent_peer(absent: int, timeout_s: float) -> tuple[str, float]:
    """Rank ``absent`` never calls; the others' ll call fails within about ``timeout_s``, naming it, and writes
    NaN. Returns (message, seconds to give up)."""
    rank = dist.get_rank()
    comm = Communicator(timeout_s=timeout_s, kernels="cuda")
    t0 = time.perf_counter()
    try:
        if rank == absent:
            return "", 0.0
        x = torch.ones(2, 1000, device=device())
        out, res_out = comm.all_reduce_residual_rmsnorm(x, x, torch.ones(1000, device=device()), algo="ll")
        try:
            comm.check()
        except CollectiveError as e:
            assert bool(out.isnan().all()) and bool(res_out.isnan().all()), "a failed call wrote numbers"
            return str(e), time.perf_counter() - t0
        raise AssertionError(f"rank {rank}: call without rank {absent} returned {out[0, :4]}")
    finally:
        dist.barrier()  # the absent rank must not tear down its memory while peers still push into it
        comm.close()


def grids_agree(segments: int, cases: list[tuple[int, int]]) -> None:
    """For each (tokens, hidden) in bf16: the LL kernel launched on ``segments`` blocks per row (1: whole rows per
    block up to one block per SM; threads as the policy's rule, 64..512, so 8192-wide rows on one block take two
    passes) against algo="ll" on the policy's grid: residual_out bitwise equal, out within one rounding, both
    against the float64 reference; outputs NaN-poisoned first."""
    from shardkit.kernels.all_reduce import cuda as cuda_dda

    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator(kernels="cuda", timeout_s=TIMEOUT_S)
    try:
        for i, (tokens, hidden) in enumerate(cases):
            xs, residual, weight = fused_inputs(world, tokens, hidden, torch.bfloat16, 7000 + 10 * i)
            ref_out, ref_res = all_reduce_residual_rmsnorm_reference(xs, residual, weight, EPS)
            x = xs[rank]
            out, res_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
            comm._rmsnorm_ll([x, residual, out, res_out], weight, EPS, tokens, hidden, segments=segments)
            want_out, want_res = comm.all_reduce_residual_rmsnorm(x, residual, weight, EPS, "ll")
            grid = cuda_dda.ll_rmsnorm_grid(tokens, hidden, x.element_size(), comm._sm_count, segments)
            what = (f"ll on {segments} block(s) per row ({grid.programs} x {grid.threads}), tokens={tokens} "
                    f"hidden={hidden}")
            assert torch.equal(res_out, want_res), f"{what}: residual_out differs from the policy grid's"
            torch.testing.assert_close(out, want_out, **tol(ROUNDING, torch.bfloat16), msg=lambda m: f"{what}: {m}")
            torch.testing.assert_close(out.double(), ref_out, **tol(ROUNDING, torch.bfloat16),
                                       msg=lambda m: f"{what}: out vs float64: {m}")
            torch.testing.assert_close(res_out.double(), ref_res, **tol(ROUNDING, torch.bfloat16),
                                       msg=lambda m: f"{what}: residual_out vs float64: {m}")
        comm.check()
    finally:
        comm.close()


def ll_without_cuda_kernels() -> str:
    """On the Triton kernels (CPU worlds), algo="ll" raises naming what it needs. Returns the message."""
    comm = Communicator()
    try:
        x = torch.randn(2, 96)
        try:
            comm.all_reduce_residual_rmsnorm(x, x, torch.ones(96), algo="ll")
        except ShardkitError as e:
            return str(e)
        raise AssertionError("algo='ll' ran without the CUDA kernels")
    finally:
        comm.close()
