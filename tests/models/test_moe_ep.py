"""The expert-parallel Mixtral (EPMoE over shardkit's MoeDispatcher) on CPU worlds against the
single-process forward of the same sequences: prefill and decode with a KV cache, EP = 2, 3, 4,
contiguous and mixed placements (per-layer permutations, uneven expert counts, replicated experts),
a rank without tokens, speculative token shuffling; the NCCL transport runs over gloo, the peer
transport in the Triton interpreter.
GPU: the real model in bf16 with NCCL and peer memory."""
import pytest
import torch

from ..conftest import gpu_count
from . import moe_ep_checks
from .test_moe_model import needs_model

# fp32: the EP sum runs per rank then across ranks (another order than the one-process sum)
FP32_TOL = 2e-5


def assert_close_to_reference(results, tol):
    for r in results:
        assert r["max_err"] <= tol * max(1.0, r["scale"]), r  # NaN fails this comparison


def assert_within_dtype_error(results):
    """bf16 EP logits are as close to the fp32 model as the one-process bf16 model is (within 2x)."""
    for r in results:
        assert r["max_err"] <= 2 * r["same_dtype_err"] + 1e-3 * r["scale"], r


@needs_model
def test_real_model_ep2_prefill_and_decode(worlds):
    results = worlds(2).run(moe_ep_checks.check_ep_model, "real", "contiguous", 3, 9, 2, "nccl", "exact", "loop",
                            "float32", 0)
    assert [r["sequences"] for r in results] == [2, 1]
    assert_close_to_reference(results, FP32_TOL)


def test_ep4_mixed_placements_with_replicas_and_an_idle_rank(worlds):
    """EP=4, 3 sequences: rank 3 has no tokens but serves its experts; per-layer permutations, uneven
    expert counts, replicated experts; the grouped_mm expert backend where torch has it on the CPU."""
    from shardkit.models.moe.experts import has_grouped_mm
    backend = "grouped_mm" if has_grouped_mm(torch.float32, torch.device("cpu")) else "loop"
    results = worlds(4).run(moe_ep_checks.check_ep_model, "small", "mixed", 3, 7, 2, "nccl", "exact", backend,
                            "float32", 4)
    assert [r["sequences"] for r in results] == [1, 1, 1, 0]
    assert_close_to_reference(results, FP32_TOL)


def test_peer_transport_in_interpreter(worlds):
    """The peer-memory kernels (Triton interpreter on shared memory), graph mode, one decode step."""
    results = worlds(2).run(moe_ep_checks.check_ep_model, "small", "contiguous", 2, 3, 1, "peer", "graph", "loop",
                            "float32", 11)
    assert_close_to_reference(results, FP32_TOL)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 CUDA GPUs")
@needs_model
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_gpu_real_model_bf16(worlds, backend):
    results = worlds(2, "nccl").run(moe_ep_checks.check_ep_model, "real", "mixed", 4, 33, 4, "auto", "graph", backend,
                                    "bfloat16", 0)
    assert_within_dtype_error(results)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 CUDA GPUs")
@needs_model
def test_gpu_decode_in_cuda_graph(worlds):
    results = worlds(2, "nccl").run(moe_ep_checks.check_graph_decode, 4, 17, 6)
    assert_within_dtype_error(results)


@pytest.mark.parametrize("world", [3])
def test_speculative_token_shuffling_equals_the_exact_model(worlds, world):
    """s-TS with the pre-gate prediction, with a poor one (every token to rank 0: rows wasted there
    at EP=3, late rows elsewhere) and without speculation: logits equal the single-process model, every needed
    copy travels exactly once."""
    for speculate, predictor in ((True, "pregate"), (True, "rank0"), (False, "pregate")):
        results = worlds(world).run(moe_ep_checks.check_sts_model, "small", 3, 6, 2, speculate, 13, predictor)
        assert_close_to_reference(results, FP32_TOL)
        early, late, wasted, needed = (sum(r[key] for r in results) for key in ("early", "late", "wasted", "needed"))
        assert early - wasted + late == needed, results
        if not speculate:
            assert early == 0 and late == needed, results
        elif predictor == "pregate":
            assert early > late > 0, results
        else:  # at EP=2 almost every token needs rank 0 too: waste shows at EP=3
            assert late > 0 and (wasted > 0 or world == 2), results
