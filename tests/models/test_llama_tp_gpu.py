"""The tensor-parallel Llama on 2 GPUs (NCCL group, shardkit's fused sync points on peer memory):
fp32 greedy generation of 64 tokens equal to transformers' on the same GPU, eager and CUDA-graph decode
equal, SPD in the fused model equal to the plain-torch simulation, bf16 logits within bf16 error.
Skipped without 2+ GPUs or without the checkpoint."""
import pytest
import torch

from shardkit.models.spd import SimulatedTP, SPDPlan

from ..conftest import gpu_count
from . import tp_checks
from .tp_checks import HAVE_MODEL, build, relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() < 2, reason="needs 2+ CUDA GPUs"),
              pytest.mark.skipif(not HAVE_MODEL, reason=f"no checkpoint at {tp_checks.MODEL_DIR}")]

PROMPTS = [[325, 4442, 8, 88, 320, 267, 371, 448], [11, 400, 7, 3001, 42, 9, 1234, 77]]


@pytest.mark.parametrize("graph", [False, True])
def test_fp32_greedy_64_tokens_match_hf(worlds, graph):
    spec = ("real", 8)
    got = worlds(2, "nccl").run(tp_checks.tp_generate, spec, "fused", PROMPTS, 64, graph)
    assert torch.equal(got[0], got[1]), "ranks generated different tokens"
    ref = tp_checks.hf_greedy(tp_checks.hf_model(spec).cuda(), PROMPTS, 64)
    assert torch.equal(got[0], ref), f"first difference at {(got[0] != ref).nonzero()[:1].tolist()}"


def test_graph_decode_with_spd_equals_eager(worlds):
    spec, spd = ("real", 8), [True, False] * 4
    eager = worlds(2, "nccl").run(tp_checks.tp_generate, spec, "fused", PROMPTS, 32, False, spd)
    graph = worlds(2, "nccl").run(tp_checks.tp_generate, spec, "fused", PROMPTS, 32, True, spd)
    assert torch.equal(eager[0], graph[0]) and torch.equal(graph[0], graph[1])


def test_fp32_spd_regrouped_matches_simulation(worlds):
    spec = ("real", 8)
    config, weights = build(spec)
    heads = [[0, 2, 5, 7], [1, 3, 4, 6]]
    plan = SPDPlan([True, False, True, True, False, False, True, False], [None] * 8, [heads] + [None] * 7)
    chunks = [PROMPTS, [[5], [6]]]
    per_rank = worlds(2, "nccl").run(tp_checks.tp_forward_chunks, spec, "fused", chunks, plan.spd,
                                     plan.head_groups(config, 2))
    tokens = torch.cat([torch.tensor(c) for c in chunks], dim=1)
    ref = SimulatedTP(config, weights, 2).logits(tokens, plan)
    assert relative_error(torch.cat(per_rank[0], dim=1), ref) <= 1e-4


def test_bf16_logits_within_bf16_error(worlds):
    spec = ("real", 8)
    per_rank = worlds(2, "nccl").run(tp_checks.tp_forward_chunks, spec, "fused", [PROMPTS, [[5], [6]]], None, None,
                                     "bfloat16")
    tokens = torch.cat([torch.tensor(PROMPTS), torch.tensor([[5], [6]])], dim=1)
    with torch.no_grad():
        ref = tp_checks.hf_model(spec)(tokens).logits
    assert torch.equal(per_rank[0][0], per_rank[1][0])
    assert relative_error(torch.cat(per_rank[0], dim=1), ref) <= 3e-2
