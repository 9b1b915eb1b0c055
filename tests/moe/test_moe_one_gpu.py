"""MoE dispatch + combine with every rank on ONE GPU: the ranks of a 2- or 3-rank group share one device
(``PeerMemory.on_one_device``: a workspace per rank, a stream per rank), so the GPU-only code
(the system-scope flag releases, the no-split and the software-pipelined combines, cp.async) is checked
against the float64 loop whenever a single GPU is at hand. test_moe_gpu.py, on 2+ GPUs over NVLink, is
the real thing; this one is skipped without CUDA.

    CUDA_MODULE_LOADING=EAGER pytest -q -m gpu tests/moe/test_moe_one_gpu.py

Grids have ``sm_count // (2 * world)`` programs, so every rank's programs are resident at once (a
program spinning at a barrier holds its SM; one process's ranks share the SMs).
"""
import dataclasses
import types

import pytest
import torch

from shardkit import CollectiveError
from shardkit.collectives.communicator import timeout_iters
from shardkit.collectives.moe.config import make_config
from shardkit.collectives.moe.peer import PeerTransport, config_workspace, peer_buffer_bytes
from shardkit.kernels.moe.launch_config import moe_launch_config
from shardkit.memory.peer_memory import PeerMemory
from shardkit.reference.moe import affine_experts, moe_reference
from shardkit.testing import launch_ranks

from ..collectives.rank_checks import digest
from ..conftest import gpu_count
from .moe_checks import EXPERT_SEED, all_inputs, apply_experts, check_dispatch, delivered, moe_tol

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() < 1, reason="needs a CUDA GPU")]

DEEPSEEK = dict(num_experts=256, hidden=7168, topk=8)


def grid(max_tokens: int, hidden: int, world: int, fp8: bool, **changes):
    """The default grid of this shape with ``sm_count // (2 * world)`` programs (see the module), changed."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    default = moe_launch_config(max_tokens, hidden, 2, fp8, sms, interpret=False)
    programs = sms // (2 * world)
    pushers = programs if default.combine_pushers >= default.programs else default.combine_pushers
    return dataclasses.replace(default, programs=programs, combine_pushers=pushers, **changes)


def one_device_ranks(world: int, launch, timeout_s: float, *, max_tokens: int, num_experts: int, hidden: int,
                     topk: int, fp8: bool = False, align: int = 1, placement=None) -> tuple:
    """(config, every rank's PeerTransport) of a ``world``-rank bf16 graph-mode dispatcher on this GPU, on fresh
    workspaces."""
    dev = torch.device("cuda", 0)
    cfg = make_config(world, num_experts, hidden, torch.bfloat16, max_tokens, topk, placement, "graph", fp8, align,
                      None)
    peers = PeerMemory.on_one_device(world, peer_buffer_bytes(config_workspace(cfg)), dev)
    iters = timeout_iters(timeout_s, "cuda")
    return cfg, [PeerTransport(cfg, None, r, "cuda", dev, iters, timeout_s, launch, memory=peers[r])
                 for r in range(world)]


def one_device_round(world: int, tokens: list[int], routing: str, seed: int, launch, *, timeout_s: float = 20.0,
                     check: bool = True, **shape) -> list[str]:
    """One graph-mode dispatch + experts + combine of ``world`` ranks on this GPU (each rank's launches
    on its own stream, every rank's launches of a phase before the host waits); each rank's rows and
    output against the float64 loop (``check``). Returns the outputs' digests. ``shape``: as
    ``one_device_ranks``."""
    dev = torch.device("cuda", 0)
    dtype = torch.bfloat16
    cfg, ranks = one_device_ranks(world, launch, timeout_s, **shape)
    hidden, num_experts, topk, fp8 = cfg.hidden, cfg.num_experts, cfg.topk, cfg.fp8
    scale, bias = affine_experts(num_experts, hidden, EXPERT_SEED)
    inputs = all_inputs(world, tokens, hidden, num_experts, topk, dtype, seed, routing, list(cfg.expert_rank))
    on_dev = [[t.to(dev) for t in inp] for inp in inputs]
    torch.cuda.synchronize(dev)

    def failed() -> list[str]:
        errors = []
        for t in ranks:
            try:
                t.raise_if_failed()
            except CollectiveError as e:
                errors.append(str(e))
        return errors

    dispatched = launch_ranks(world, lambda r: ranks[r].dispatch(*on_dev[r], round_id=1))
    errors = failed()
    if errors and not check:
        return errors
    assert not errors, errors
    outs, experts_out, residuals = [], [], []
    for r, (recv_x, handle) in enumerate(dispatched):
        view = types.SimpleNamespace(cfg=cfg, rank=r, local_experts=cfg.local_experts[r])
        if check:
            check_dispatch(view, recv_x, handle, inputs, fp8)
        y = apply_experts(view, recv_x, handle, scale, bias)
        full = torch.full((cfg.expert_rows, hidden), float("nan"), dtype=dtype, device=dev)  # graph capacity
        full[:y.shape[0]] = y
        experts_out.append(full)
        residuals.append(torch.randn(tokens[r], hidden, generator=torch.Generator().manual_seed(seed + r)).to(
            dtype).to(dev))
        outs.append(torch.full((tokens[r], hidden), float("nan"), dtype=dtype, device=dev))
    launch_ranks(world, lambda r: ranks[r].combine(experts_out[r], dispatched[r][1], residuals[r], outs[r]))
    errors = failed()
    if not check:
        return errors
    assert not errors, errors

    def expert(e: int, row: torch.Tensor) -> torch.Tensor:
        return row * float(scale[e]) + bias[e].double()

    for r in range(world):
        x, idx, w = inputs[r]
        ref = moe_reference(delivered(x, fp8), idx, w, expert, residuals[r].cpu())
        torch.testing.assert_close(outs[r].cpu().double(), ref, **moe_tol(dtype),
                                   msg=lambda m: f"world {world} rank {r} tokens={tokens} {routing}: {m}")
    return [digest(o) for o in outs]


def checked_rounds(world: int, cases: list[tuple], launch, seed: int, **shape) -> list[str]:
    """A warm-up round with a short timeout (``launch_ranks``), then each case ``(tokens per rank,
    routing)`` on fresh workspaces; the digests of all."""
    one_device_round(world, cases[0][0], cases[0][1], seed, launch, timeout_s=5.0, check=False, **shape)
    return [d for i, (tokens, routing) in enumerate(cases)
            for d in one_device_round(world, tokens, routing, seed + i, launch, **shape)]


@pytest.mark.parametrize("world", [2, 3])
def test_small_batches_no_split_and_split_combine(world):
    """Up to 256 tokens the default combine has no role split (every program pushes, then sums) and
    dispatch blocks are 8 tokens; the split combine of larger batches gives the same bits."""
    shape = dict(DEEPSEEK, max_tokens=256)
    cases = [([256, 33, 128][:world], "uniform"), ([1, 7, 0][:world], "random"),
             ([100, 256, 5][:world], "one_rank"), ([64] * world, "dropped")]
    default = grid(256, shape["hidden"], world, False)
    assert default.combine_pushers >= default.programs  # the no-split combine
    runs = [checked_rounds(world, cases, g, 41, **shape) for g in (default, dataclasses.replace(default,
                                                                                             combine_pushers=0))]
    assert runs[0] == runs[1]


def test_large_batches_pipelined_combine_gives_the_same_bits():
    """At 512 tokens: the default (split) grid, the 3-stage cp.async combine of 512-channel chunks at
    8 warps (14 chunks per item: whole rows), and 2 stages."""
    shape = dict(DEEPSEEK, max_tokens=512)
    cases = [([512, 301], "uniform"), ([77, 512], "duplicates")]
    default = grid(512, shape["hidden"], 2, False)
    grids = [default,
             dataclasses.replace(default, combine_stages=3, combine_block_h=512, combine_item_chunks=14,
                                 combine_warps=8),
             dataclasses.replace(default, combine_stages=2)]
    runs = [checked_rounds(2, cases, g, 43, **shape) for g in grids]
    assert runs[0] == runs[1] == runs[2]


def test_fp8_dispatch_any_placement_aligned_blocks():
    shape = dict(DEEPSEEK, max_tokens=256, fp8=True, align=16, placement=[(e * 7) % 3 for e in range(256)])
    checked_rounds(3, [([256, 33, 200], "uniform"), ([1, 0, 2], "random")], grid(256, 7168, 3, True), 47, **shape)


def test_an_absent_rank_fails_the_round_and_the_device_runs_on():
    """Rank 1 never launches: rank 0's counts exchange times out, its host error record names rank 1, and
    the device still runs kernels. The record's host copy is written with plain stores after a system
    fence; the system-scope atomic it was written with before is not allowed on host memory here
    (compute-sanitizer flags it; it came with "misaligned address" faults in one-GPU runs)."""
    dev = torch.device("cuda", 0)
    cfg, (rank0, _) = one_device_ranks(2, grid(256, DEEPSEEK["hidden"], 2, False), 0.5, max_tokens=256, **DEEPSEEK)
    x, idx, w = (t.to(dev) for t in all_inputs(1, [9], cfg.hidden, cfg.num_experts, cfg.topk, torch.bfloat16, 5,
                                               "uniform", list(cfg.expert_rank))[0])
    rank0.dispatch(x, idx, w, round_id=1)
    torch.cuda.synchronize(dev)
    with pytest.raises(CollectiveError, match=r"rank\(s\) \[1\] did not arrive"):
        rank0.raise_if_failed()
    assert torch.arange(1000, device=dev).sum().item() == 499500
