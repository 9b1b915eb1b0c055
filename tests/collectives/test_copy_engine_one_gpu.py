"""The copy-engine all-reduce with every rank on ONE GPU (``PeerMemory.on_one_device``, a stream per rank):
each schedule ("barriers", "flags" with its three all-gathers, "oneshot") on real CUDA streams, events and
copies, against float64 and bitwise across schedules and input modes, whenever a single GPU is at hand.
The copies stay on one device (no NVLink): test_all_reduce_gpu.py on 2+ GPUs is the real thing. Skipped
without CUDA.

    pytest -q -m gpu tests/collectives/test_copy_engine_one_gpu.py
"""
import pytest
import torch

from shardkit.collectives import copy_engine
from shardkit.collectives.communicator import timeout_iters
from shardkit.memory.peer_memory import PeerMemory
from shardkit.reference.all_reduce import all_reduce_reference, rank_inputs
from shardkit.testing import launch_ranks

from ..conftest import gpu_count
from ..tolerances import ROUNDING, tol

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() < 1, reason="needs a CUDA GPU")]

BUFFER_BYTES = 4 << 20  # 5M bf16 elements (10 MB) run in call-chunks of the two-phase schedules
SIZES = [7, 1_000_003, 5_000_001]
SCHEDULES = [("barriers", "ce", 1), ("flags", "ce", 1), ("flags", "sm", 1), ("flags", "ce_push", 2),
             ("oneshot", "ce", 1), ("oneshot", "ce", 2)]


def all_reduce_on_one_gpu(world: int, n: int, config, seed: int, mode: str, timeout_s: float) -> list:
    """Every rank's all-reduce of ``n`` bf16 elements on fresh workspaces; ``mode``: "out" (ordinary
    input, poisoned out), "inplace", "zero_copy" (the input in the staging area, out of place) or
    "zero_copy_inplace". Returns (outputs, every rank's input as drawn, error records, the inputs passed)."""
    mems = PeerMemory.on_one_device(world, BUFFER_BYTES, "cuda")
    xs = rank_inputs(world, n, torch.bfloat16, seed=seed, device="cuda")
    if mode.startswith("zero_copy"):
        inputs = [m.staging(n, torch.bfloat16) for m in mems]
        for x, src in zip(inputs, xs):
            x.copy_(src)
    else:
        inputs = [x.clone() for x in xs]
    outs = inputs if mode.endswith("inplace") else [torch.full_like(x, float("nan")) for x in xs]
    iters = timeout_iters(timeout_s, "cuda")
    launch_ranks(world, lambda r: copy_engine.all_reduce(mems[r], inputs[r], outs[r], timeout_iters=iters,
                                                         config=config))
    return [o.clone() for o in outs], xs, [m.error_record.copy() for m in mems], inputs


@pytest.mark.parametrize("world", [2, 3])
def test_every_schedule_matches_float64_and_one_another(world):
    chunk = 256 << 10
    bits = {}
    for i, n in enumerate(SIZES):
        for sync, gather, streams in SCHEDULES:
            config = copy_engine.CopyConfig(chunk, sync, gather, streams)
            for mode in ("out", "inplace", "zero_copy", "zero_copy_inplace"):
                if mode.startswith("zero_copy") and 2 * n > BUFFER_BYTES:
                    continue  # the staging area holds BUFFER_BYTES
                what = f"world {world} n={n} {sync}/{gather}/{streams} {mode}"
                # A warm-up call first (launch_ranks): each mode's pointers may compile kernels of their own.
                all_reduce_on_one_gpu(world, n, config, 90 + i, mode, timeout_s=2.0)
                outs, xs, records, inputs = all_reduce_on_one_gpu(world, n, config, 90 + i, mode, timeout_s=20.0)
                assert all(rec[0] == 0 for rec in records), f"{what}: error records {records}"
                ref = all_reduce_reference(xs)
                for r, out in enumerate(outs):
                    assert bool(torch.isfinite(out).all()), f"{what} rank {r}: an element was not written"
                    torch.testing.assert_close(out.double(), ref, **tol(ROUNDING, out.dtype),
                                               msg=lambda m: f"{what} rank {r}: {m}")
                    assert torch.equal(out, outs[0]), f"{what}: rank {r} differs from rank 0"
                    if not mode.endswith("inplace"):
                        assert torch.equal(inputs[r], xs[r]), f"{what}: rank {r}'s input was modified"
                bits.setdefault(n, outs[0])
                assert torch.equal(outs[0], bits[n]), f"{what}: differs from {SCHEDULES[0]} out of place"
