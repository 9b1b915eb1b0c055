"""Functions that run on every rank of a ProcessWorld, shared by the CPU and GPU MoE tests.

Each rank draws every rank's input from a seeded generator, so it can build the float64 reference
and the list of rows it must receive by itself; results come back as small picklable summaries.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from shardkit import CollectiveError, ShardkitError
from shardkit.collectives.moe import MoeDispatcher
from shardkit.reference.moe import affine_experts, e4m3_roundtrip, moe_inputs, moe_reference, received_tokens
from shardkit.testing import capture_graph

from ..collectives.rank_checks import DTYPES, device, digest, error_messages
from ..tolerances import ROUNDING

EXPERT_SEED = 99


def moe_tol(dtype: torch.dtype) -> dict:
    """Tolerance of a combine output against float64: the expert output, each rank's partial sum and the
    final sum are each rounded to the dtype once (three roundings of values ~ the output's size)."""
    atol, rtol = ROUNDING[dtype]
    return {"atol": 4 * atol, "rtol": 4 * rtol}


def delivered(x: torch.Tensor, fp8: bool) -> torch.Tensor:
    """The rows as the experts receive them: x itself, or its fp8 round trip (the same bits as the kernel's)."""
    return e4m3_roundtrip(x) if fp8 else x


def all_inputs(world: int, tokens: list[int], hidden: int, experts: int, topk: int, dtype: torch.dtype, seed: int,
               routing: str, expert_rank: list[int]) -> list[tuple[torch.Tensor, ...]]:
    return [moe_inputs(tokens[s], hidden, experts, topk, dtype, seed * 100 + s, routing, expert_rank)
            for s in range(world)]


def apply_experts(disp: MoeDispatcher, recv_x: torch.Tensor, handle, scale: torch.Tensor, bias: torch.Tensor,
                  poison: bool = True) -> torch.Tensor:
    """The test experts on this rank's expert-major rows: rows of local expert l (global g) become
    ``rows * scale[g] + bias[g]``; padding and rows past the used ones are NaN (must never be read)."""
    rows = handle.expert_major(recv_x).float()
    out = torch.full_like(rows, float("nan")) if poison else torch.zeros_like(rows)
    offsets = handle.expert_offsets.tolist()
    counts = handle.expert_counts.tolist()
    for l, g in enumerate(disp.local_experts):
        lo, n = offsets[l], counts[l]
        out[lo:lo + n] = rows[lo:lo + n] * float(scale[g]) + bias[g].to(rows.device)
    return out.to(disp.cfg.dtype)


def pause(delays: list[float] | None) -> None:
    if delays:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        time.sleep(delays[dist.get_rank()])


def check_dispatch(disp: MoeDispatcher, recv_x: torch.Tensor, handle, inputs: list, fp8: bool) -> None:
    """The received rows and metadata against the per-token expectation."""
    cfg, rank = disp.cfg, disp.rank
    idxs = [inp[1] for inp in inputs]
    expected = received_tokens(idxs, list(cfg.expert_rank), rank)
    n, x_rows = (int(v) for v in handle.recv_info.tolist())
    assert n == len(expected), f"rank {rank}: received {n} rows, expected {len(expected)}"
    if handle.num_recv is not None:
        assert handle.num_recv == n and recv_x.shape[0] == n
    counts = [sum(1 for s, _ in expected if s == src) for src in range(cfg.world)]
    assert handle.recv_counts.tolist() == counts
    assert handle.recv_offsets.tolist() == [sum(counts[:s]) for s in range(cfg.world)]
    src_rank, src_token = handle.src_rank[:n].tolist(), handle.src_token[:n].tolist()
    assert list(zip(src_rank, src_token)) == expected, f"rank {rank}: rows not in rank-major token order"
    local = handle.local_expert[:n].cpu()
    weights = handle.weights[:n].cpu()
    expert_row = handle.expert_row[:n].cpu()
    index = handle.expert_index[:x_rows].cpu()
    offsets, per_expert = handle.expert_offsets.tolist(), handle.expert_counts.tolist()
    assert offsets[-1] == x_rows
    if n:
        got = handle.dequantize(recv_x[:n]) if fp8 else recv_x[:n]
        sent = torch.stack([delivered(inputs[s][0], fp8)[t] for s, t in expected]).to(got.device)
        assert torch.equal(got, sent), f"rank {rank}: received rows differ from the sent ones"
    seen = torch.zeros(x_rows, dtype=torch.int32)
    for i, (s, t) in enumerate(expected):
        ids, w = idxs[s][t], inputs[s][2][t]
        for k in range(cfg.topk):
            e = int(ids[k])
            mine = e >= 0 and cfg.expert_rank[e] == rank
            assert int(local[i, k]) == (cfg.expert_local[e] if mine else -1), (rank, i, k)
            assert float(weights[i, k]) == float(w[k].float())
            j = int(expert_row[i, k])
            if mine:
                l = cfg.expert_local[e]
                assert offsets[l] <= j < offsets[l] + per_expert[l], (rank, i, k, j)
                assert int(index[j]) == i
                seen[j] += 1
            else:
                assert j == -1
    # Every used expert-major row belongs to exactly one slot; padding rows are -1.
    for l in range(len(disp.local_experts)):
        lo, used = offsets[l], per_expert[l]
        assert bool((seen[lo:lo + used] == 1).all())
        assert bool((index[lo + used:offsets[l + 1]] == -1).all())
        assert (offsets[l + 1] - lo) % cfg.align == 0


def check_round(kwargs: dict, cases: list[tuple], seed: int, delays: list[float] | None = None) -> list[str]:
    """Dispatch + experts + combine for each case ``(tokens per rank, routing, with residual)`` on one
    dispatcher; every output against the float64 loop. Returns the outputs' digests. ``delays``: seconds
    each rank sleeps before its dispatch and its combine (to change the order in which rows arrive)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs = dict(kwargs)
    dtype = DTYPES[kwargs.pop("dtype", "bfloat16")]
    disp = MoeDispatcher(dtype=dtype, **kwargs)
    cfg = disp.cfg
    scale, bias = affine_experts(cfg.num_experts, cfg.hidden, EXPERT_SEED)
    digests = []
    try:
        for i, (tokens, routing, with_residual) in enumerate(cases):
            inputs = all_inputs(world, tokens, cfg.hidden, cfg.num_experts, cfg.topk, dtype, seed + i, routing,
                                list(cfg.expert_rank))
            x, idx, w = (t.to(device()) for t in inputs[rank])
            before = [t.clone() for t in (x, idx, w)]
            pause(delays)
            recv_x, handle = disp.dispatch(x, idx, w)
            check_dispatch(disp, recv_x, handle, inputs, cfg.fp8)
            expert_out = apply_experts(disp, recv_x, handle, scale, bias)
            if handle.num_expert_rows is None:  # graph mode: capacity rows, the rest poisoned
                full = torch.full((disp.expert_capacity, cfg.hidden), float("nan"), dtype=dtype, device=device())
                full[:expert_out.shape[0]] = expert_out
                expert_out = full
            residual = torch.randn(tokens[rank], cfg.hidden, generator=torch.Generator().manual_seed(seed + i)).to(
                dtype).to(device()) if with_residual else None
            out = torch.full((tokens[rank], cfg.hidden), float("nan"), dtype=dtype, device=device())
            pause(delays)
            got = disp.combine(expert_out, handle, residual=residual, out=out)
            assert got is out
            for a, b in zip(before, (x, idx, w)):
                assert torch.equal(a, b), "dispatch/combine modified an input"

            def expert(e: int, row: torch.Tensor) -> torch.Tensor:
                return row * float(scale[e]) + bias[e].double()

            ref = moe_reference(delivered(inputs[rank][0], cfg.fp8), inputs[rank][1], inputs[rank][2], expert,
                                residual.cpu() if residual is not None else None)
            torch.testing.assert_close(out.cpu().double(), ref, **moe_tol(dtype),
                                       msg=lambda m: f"case {i} {routing} tokens={tokens} rank {rank}: {m}")
            digests.append(digest(out))
        disp.check()
    finally:
        disp.close()
    return digests


def _bad_dispatch_args(kind: str, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, cfg) -> tuple:
    """The arguments of a dispatch made bad in one way (``kind``)."""
    if kind == "ids_out_of_range":
        idx = idx.clone()
        idx[-1, 0] = cfg.num_experts
    elif kind == "ids_below_minus_one":
        idx = idx.clone()
        idx[0, -1] = -2
    elif kind == "dtype":
        x = x.float() if x.dtype != torch.float32 else x.half()
    elif kind == "hidden":
        x = torch.cat([x, x[:, :1]], 1)
    elif kind == "tokens_above_max":
        reps = cfg.max_tokens // x.shape[0] + 1
        x, idx, w = x.repeat(reps, 1), idx.repeat(reps, 1), w.repeat(reps, 1)
    elif kind == "non_contiguous":
        x = torch.cat([x, x], 1)[:, ::2]
    elif kind == "idx_dtype":
        idx = idx.float()
    elif kind == "weights_shape":
        w = w[:, :-1].contiguous()
    return x, idx, w


def bad_input_rounds(kinds: list[str], culprit: int, kwargs: dict, seed: int) -> list[str]:
    """For each kind of bad input, a fresh dispatcher; rank ``culprit`` passes the bad input (to dispatch,
    or to combine for kinds starting with 'combine_'), the others good input. Every rank must raise
    (TypeError/ValueError on the culprit, CollectiveError on the others; ids are checked in the kernel,
    so there every rank raises CollectiveError), and the dispatcher must refuse further calls.
    Returns this rank's messages."""
    rank = dist.get_rank()
    kwargs = dict(kwargs)
    dtype = DTYPES[kwargs.pop("dtype", "bfloat16")]
    messages = []
    for i, kind in enumerate(kinds):
        disp = MoeDispatcher(dtype=dtype, timeout_s=20, **kwargs)
        cfg = disp.cfg
        try:
            x, idx, w = (t.to(device()) for t in moe_inputs(5, cfg.hidden, cfg.num_experts, cfg.topk, dtype,
                                                             seed + i, "uniform", list(cfg.expert_rank)))
            bad = rank == culprit
            try:
                if kind.startswith("combine_"):
                    recv_x, handle = disp.dispatch(x, idx, w)
                    rows = handle.num_expert_rows if handle.num_expert_rows is not None else disp.expert_capacity
                    expert_out = torch.zeros(rows, cfg.hidden, dtype=dtype, device=device())
                    if bad:
                        expert_out = {"combine_dtype": expert_out.float() if dtype != torch.float32 else
                                      expert_out.half(),
                                      "combine_rows": expert_out[:0],
                                      "combine_residual": expert_out}[kind]
                    disp.combine(expert_out, handle, residual=expert_out if kind == "combine_residual" and bad
                                 else None)
                else:
                    disp.dispatch(*(_bad_dispatch_args(kind, x, idx, w, cfg) if bad else (x, idx, w)))
                disp.check()
            except (TypeError, ValueError, ShardkitError) as e:
                in_kernel = kind.startswith("ids_") or kind == "overflow"  # found by every rank together
                expected = CollectiveError if (not bad or in_kernel) else (TypeError, ValueError)
                assert isinstance(e, expected), f"{kind}: rank {rank} raised {type(e).__name__}: {e}"
                messages.append(str(e))
            else:
                raise AssertionError(f"{kind}: rank {rank} did not raise")
            # The round failed on every rank: the dispatcher refuses to go on (all-bad rounds excepted).
            assert_raises(lambda: disp.dispatch(x, idx, w), CollectiveError)
        finally:
            dist.barrier()
            disp.close()
    return messages


def assert_raises(fn, error) -> str:
    try:
        fn()
    except error as e:
        return str(e)
    raise AssertionError(f"expected {error}")


def config_disagreement(kinds: list[str]) -> list[str]:
    """Rank 1 constructs its dispatcher with another hidden / dtype / placement / ...: every rank raises."""
    rank = dist.get_rank()
    messages = []
    for kind in kinds:
        kwargs = dict(num_experts=4, hidden=32, max_tokens=8, topk=2)
        if rank == 1:
            kwargs.update({"hidden": {"hidden": 48}, "dtype": {"dtype": torch.float16},
                           "placement": {"placement": [1, 1, 0, 0]}, "topk": {"topk": 3},
                           "mode": {"mode": "exact"}}[kind])
        messages.append(assert_raises(lambda: MoeDispatcher(**kwargs), ValueError))
    return messages


def bad_constructor_args() -> list[str]:
    """Arguments wrong on every rank: each raises a clear error before any communication."""
    good = dict(num_experts=4, hidden=32, max_tokens=8, topk=2)
    cases = [dict(good, num_experts=0), dict(good, topk=5), dict(good, dtype=torch.int32),
             dict(good, placement=[0, 1, 2, 0]), dict(good, placement=[0, 1]), dict(good, mode="lazy"),
             dict(good, transport="ucx"), dict(good, transport="nccl", mode="graph"), dict(good, align=0),
             dict(good, timeout_s=0), dict(good, launch_config="grid")]
    return error_messages([lambda c=c: MoeDispatcher(**c) for c in cases])


def absent_peer(absent: int, timeout_s: float) -> str:
    """Rank ``absent`` never dispatches; the others must fail within the timeout, naming it."""
    rank = dist.get_rank()
    disp = MoeDispatcher(num_experts=4, hidden=32, max_tokens=8, topk=2, timeout_s=timeout_s)
    try:
        if rank == absent:
            return ""
        x, idx, w = (t.to(device()) for t in moe_inputs(3, 32, 4, 2, torch.bfloat16, 1))
        return assert_raises(lambda: (disp.dispatch(x, idx, w), disp.check()), CollectiveError)
    finally:
        dist.barrier()  # the absent rank keeps its memory until the others gave up
        disp.close()


def check_ops(kwargs: dict, tokens: list[int], seed: int) -> list[int]:
    """torch.ops.shardkit.moe_dispatch / moe_combine against the float64 loop, and the fake
    implementations' shapes (FakeTensorMode) against the real outputs'. Returns the real shapes' rows."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    import shardkit.ops  # noqa: F401  (registers the ops)

    rank, world = dist.get_rank(), dist.get_world_size()
    disp = MoeDispatcher(name="moe_ops_test", **kwargs)
    cfg = disp.cfg
    scale, bias = affine_experts(cfg.num_experts, cfg.hidden, EXPERT_SEED)
    try:
        inputs = all_inputs(world, tokens, cfg.hidden, cfg.num_experts, cfg.topk, cfg.dtype, seed, "random",
                            list(cfg.expert_rank))
        x, idx, w = (t.to(device()) for t in inputs[rank])
        recv_x, scales, expert_index, offsets, info = torch.ops.shardkit.moe_dispatch(x, idx, w, "moe_ops_test")
        handle = disp.latest_handle
        assert torch.equal(expert_index, handle.expert_index) and torch.equal(offsets, handle.expert_offsets)
        expert_out = apply_experts(disp, recv_x, handle, scale, bias, poison=False)
        if cfg.mode == "graph":
            expert_out = torch.cat([expert_out, expert_out.new_zeros(disp.expert_capacity - expert_out.shape[0],
                                                                     cfg.hidden)])
        out = torch.ops.shardkit.moe_combine(expert_out, x.shape[0], "moe_ops_test", x)
        ref = moe_reference(inputs[rank][0], inputs[rank][1], inputs[rank][2],
                            lambda e, row: row * float(scale[e]) + bias[e].double(), inputs[rank][0])
        torch.testing.assert_close(out.cpu().double(), ref, **moe_tol(cfg.dtype))
        with FakeTensorMode(shape_env=ShapeEnv()) as mode:  # exact mode: data-dependent sizes
            fakes = torch.ops.shardkit.moe_dispatch(mode.from_tensor(x), mode.from_tensor(idx), mode.from_tensor(w),
                                                    "moe_ops_test")
            fake_out = torch.ops.shardkit.moe_combine(mode.from_tensor(expert_out), x.shape[0], "moe_ops_test", None)
        real = (recv_x, scales, expert_index, offsets, info)
        for f, r in zip(fakes, real):
            assert f.dtype == r.dtype and (cfg.mode == "exact" or f.shape == r.shape), (f, r.shape)
        assert fake_out.shape == out.shape and fake_out.dtype == out.dtype
        return [recv_x.shape[0], expert_index.shape[0]]
    finally:
        disp.close()


def vectorized_reference(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The float64 reference in tensor form (for many graph replays; ``moe_reference`` is the per-token loop):
    sum over valid slots of w * (x * scale[e] + bias[e]) (+ residual)."""
    x64, valid = x.double(), idx >= 0
    e = idx.clamp(min=0)
    y = x64[:, None, :] * scale.double().to(x.device)[e][..., None] + bias.double().to(x.device)[e]
    out = (torch.where(valid, w.double(), 0.0)[..., None] * y).sum(1)
    return out + residual.double() if residual is not None else out


def graph_experts(recv_x: torch.Tensor, handle, local_experts: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``apply_experts`` without host synchronisation or copies (CUDA-graph capturable; every tensor
    argument on the device): each expert-major row's local expert from ``expert_offsets`` by binary
    search (rows past the used ones get the last expert: never read)."""
    rows = handle.expert_major(recv_x).float()
    j = torch.arange(rows.shape[0], device=rows.device, dtype=torch.int32)
    local = torch.searchsorted(handle.expert_offsets[1:].contiguous(), j, right=True)
    g = local_experts[local.clamp(max=local_experts.numel() - 1)]
    return (rows * scale[g][:, None] + bias[g]).to(dtype)


def graph_replays(kwargs: dict, tokens: int, replays: int, seed: int) -> float:
    """dispatch + experts + combine captured in one CUDA graph, replayed with a new routing and new
    tokens every time (on CPU worlds: the same rounds, eagerly, on the same static buffers); returns
    the worst error relative to the tolerance (< 1 passes), accumulated on the device (no
    synchronisation per replay)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    disp = MoeDispatcher(mode="graph", **kwargs)
    cfg = disp.cfg
    scale, bias = affine_experts(cfg.num_experts, cfg.hidden, EXPERT_SEED)
    tol = moe_tol(cfg.dtype)
    try:
        pool = []
        for i, routing in enumerate(["uniform", "random", "one_rank", "duplicates", "dropped", "random"]):
            inp = all_inputs(world, [tokens] * world, cfg.hidden, cfg.num_experts, cfg.topk, cfg.dtype,
                             seed + i, routing, list(cfg.expert_rank))[rank]
            x, idx, w = (t.to(device()) for t in inp)
            seen = delivered(inp[0], cfg.fp8).to(device())
            pool.append((x, idx, w, vectorized_reference(seen, idx, w, scale, bias, x).float()))
        x, idx, w = (t.clone() for t in pool[0][:3])
        out = torch.empty_like(x)
        local_experts = torch.tensor(disp.local_experts, device=device())
        scale_d, bias_d = scale.to(device()), bias.to(device())

        def round_() -> None:
            recv_x, handle = disp.dispatch(x, idx, w)
            expert_out = graph_experts(recv_x, handle, local_experts, scale_d, bias_d, cfg.dtype)
            disp.combine(expert_out, handle, residual=x, out=out)

        run = capture_graph(round_, warmups=2)[0].replay if device().type == "cuda" else round_  # CPU worlds: the same rounds, eagerly
        worst = torch.zeros((), device=device())
        for i in range(replays):
            k = i % len(pool)
            for dst, src in zip((x, idx, w), pool[k][:3]):
                dst.copy_(src)
            out.fill_(float("nan"))
            run()
            ref = pool[k][3]
            err = ((out.float() - ref).abs() / (tol["atol"] + tol["rtol"] * ref.abs())).max()
            worst = torch.maximum(worst, torch.nan_to_num(err, nan=1e9))
        disp.check()
        return worst.item()
    finally:
        disp.close()


def compare_transports(kwargs: dict, tokens: list[int], routing: str, seed: int) -> None:
    """The peer-memory and the NCCL transports give the same round: the same received rows in the same
    rank-major order, the same expert-major order (by expert, source, token, slot) and metadata, and
    outputs that both match the float64 loop."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dispatchers = [MoeDispatcher(mode="exact", transport=t, name=f"cmp_{t}", **kwargs) for t in ("peer", "nccl")]
    cfg = dispatchers[0].cfg
    scale, bias = affine_experts(cfg.num_experts, cfg.hidden, EXPERT_SEED)
    try:
        inputs = all_inputs(world, tokens, cfg.hidden, cfg.num_experts, cfg.topk, cfg.dtype, seed, routing,
                            list(cfg.expert_rank))
        x, idx, w = (t.to(device()) for t in inputs[rank])
        rounds = [d.dispatch(x, idx, w) for d in dispatchers]
        (rx_p, h_p), (rx_n, h_n) = rounds
        assert torch.equal(rx_p, rx_n), "received rows differ between the transports"
        for name in ("src_rank", "src_token", "local_expert", "weights", "expert_row", "expert_index", "expert_offsets",
                     "expert_counts", "recv_counts", "recv_offsets", "recv_info"):
            a, b = getattr(h_p, name), getattr(h_n, name)
            assert torch.equal(a, b.to(a.dtype)), f"{name} differs between the transports:\n{a}\n{b}"
        for d, (recv_x, handle) in zip(dispatchers, rounds):
            out = d.combine(apply_experts(d, recv_x, handle, scale, bias), handle)
            ref = moe_reference(inputs[rank][0], inputs[rank][1], inputs[rank][2],
                                lambda e, row: row * float(scale[e]) + bias[e].double())
            torch.testing.assert_close(out.cpu().double(), ref, **moe_tol(cfg.dtype))
    finally:
        for d in dispatchers:
            d.close()
