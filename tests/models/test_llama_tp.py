"""The tensor-parallel Llama on CPU worlds (gloo; shardkit's fused sync points run their Triton kernels
in the interpreter) against transformers' LlamaForCausalLM and the plain-torch SPD reference."""
import pytest
import torch

from shardkit.models import LocalSync, TPLlama, shard_llama
from shardkit.models.spd import SimulatedTP, SPDPlan

from . import tp_checks
from .tp_checks import HAVE_MODEL, build, relative_error

needs_model = pytest.mark.skipif(not HAVE_MODEL, reason=f"no checkpoint at {tp_checks.MODEL_DIR}")
try:
    import transformers  # noqa: F401
    HAVE_HF = True
except ImportError:
    HAVE_HF = False
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers is not installed (the independent reference)")

# 5-token prompt, one decode step, then a 2-token chunk after the cache (the masked prefill path).
CHUNKS = [[[11, 400, 7, 3001, 42]], [[9]], [[1234, 77]]]


def hf_logits(spec, chunks):
    tokens = torch.tensor([sum((c[0] for c in chunks), [])])
    with torch.no_grad():
        return tp_checks.hf_model(spec)(tokens).logits


@needs_model
@needs_hf
@pytest.mark.parametrize("world", [2, 4])
def test_fused_tp_logits_match_hf(worlds, world):
    """One block (two fused sync points, the second with the final norm): prefill, then (TP=2) a decode
    step. The interpreter is slow; depth, SPD, decode at TP=4 and the masked chunk path are covered below."""
    spec, chunks = ("real", 1), CHUNKS[:2] if world == 2 else CHUNKS[:1]
    per_rank = worlds(world).run(tp_checks.tp_forward_chunks, spec, "fused", chunks)
    for got in per_rank[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, per_rank[0])), "ranks got different logits"
    err = relative_error(torch.cat(per_rank[0], dim=1), hf_logits(spec, chunks))
    assert err <= 1e-4, err


@needs_model
@needs_hf
def test_greedy_generation_matches_hf(worlds):
    """All 8 layers, TP=2, gloo all-reduce sync points: greedy tokens equal transformers' generate."""
    spec, prompt, new = ("real", 8), [[325, 4442, 8, 88, 320, 267]], 12
    got = worlds(2).run(tp_checks.tp_generate, spec, "nccl", prompt, new)
    ref = tp_checks.hf_greedy(tp_checks.hf_model(spec), prompt, new)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], ref), (got[0], ref)


@needs_model
def test_fused_spd_and_regrouped_heads_match_reference(worlds):
    """SPD on block 0 with heads moved across ranks (KV heads duplicated where needed), block 1 normal:
    the fused TP model equals the plain-torch simulation of the same plan."""
    spec = ("real", 2)
    heads = [[0, 2, 5, 7], [1, 3, 4, 6]]
    plan = SPDPlan([True, False], [None, None], [heads, None])
    config, weights = build(spec)
    per_rank = worlds(2).run(tp_checks.tp_forward_chunks, spec, "fused", [CHUNKS[0]], plan.spd,
                             plan.head_groups(config, 2))
    ref = SimulatedTP(config, weights, 2).logits(torch.tensor(CHUNKS[0]), plan)
    assert torch.equal(per_rank[0][0], per_rank[1][0])
    err = relative_error(per_rank[0][0], ref)
    assert err <= 1e-4, err
    normal = SimulatedTP(config, weights, 2).logits(torch.tensor(CHUNKS[0]))
    assert relative_error(normal, ref) > 1e-3, "SPD changed nothing: the test would not see a wrong switch"


@pytest.mark.parametrize("world", [2, 4])
def test_biases_spd_and_cache_chunks_match_reference(worlds, world):
    """Tiny random Llama with every bias: SPD on block 1 (o/down biases added once to the sum), a
    regrouped block, cached chunks; gloo sync points against the simulation (and transformers with SPD off)."""
    spec = ("random", True, 5, 2)
    config, weights = build(spec)
    heads = [[0, 5], [1, 2], [3, 7], [4, 6]] if world == 4 else [[0, 1, 6, 7], [2, 3, 4, 5]]
    plan = SPDPlan([False, True], [None, None], [None, heads])
    chunks = [[[5, 17, 88, 2], [60, 61, 3, 9]], [[44], [1]], [[7, 8, 9], [90, 91, 92]]]
    tokens = torch.cat([torch.tensor(c) for c in chunks], dim=1)
    sim = SimulatedTP(config, weights, world)
    for spd, groups, ref in ((plan.spd, plan.head_groups(config, world), sim.logits(tokens, plan)),
                             (None, None, sim.logits(tokens))):
        per_rank = worlds(world).run(tp_checks.tp_forward_chunks, spec, "nccl", chunks, spd, groups)
        err = relative_error(torch.cat(per_rank[0], dim=1), ref)
        assert err <= 1e-5, err
    if HAVE_HF:
        with torch.no_grad():
            assert relative_error(sim.logits(tokens), tp_checks.hf_model(spec)(tokens).logits) <= 1e-5


@needs_model
@needs_hf
def test_one_rank_local_sync_matches_hf():
    """World 1: every sync point is the local add + RMSNorm kernel."""
    spec = ("real", 2)
    got = torch.cat(tp_checks.tp_forward_chunks(spec, "local", CHUNKS), dim=1)
    err = relative_error(got, hf_logits(spec, CHUNKS))
    assert err <= 1e-4, err


def test_bad_arguments_raise_clear_errors():
    config, weights = build(("random", False, 1, 2))
    model = TPLlama(config, shard_llama(config, weights, 0, 1), LocalSync(), max_batch=2, max_seq=8)
    cases = [
        (lambda: shard_llama(config, weights, 2, 2), "0 <= rank < world"),
        (lambda: shard_llama(config, weights, 0, 3), "divide by the tensor-parallel degree 3"),
        (lambda: shard_llama(config, weights, 0, 2, [[[0, 1, 2, 3], [4, 5, 6, 7]]]), "one entry per layer"),
        (lambda: shard_llama(config, weights, 0, 2, [[[0, 1, 2], [3, 4, 5, 6, 7]]] * 2), "into 2 sorted groups of 4"),
        (lambda: shard_llama(config, weights, 0, 2, [[[3, 2, 1, 0], [4, 5, 6, 7]]] * 2), "sorted groups"),
        (lambda: model.forward(torch.zeros(1, 3)), "tokens must be int64"),
        (lambda: model.forward(torch.zeros(3, 1, dtype=torch.long)), "batch 3 must be in 1..2"),
        (lambda: model.forward(torch.zeros(1, 4, dtype=torch.long), 6), "within the cache's 8"),
        (lambda: model.set_spd([True]), "one flag per block"),
        (lambda: model.generate(torch.zeros(1, 4, dtype=torch.long), 6), "must fit the cache"),
        (lambda: model.decode_graph(1), "CUDA graphs need a CUDA device"),
    ]
    for case, text in cases:
        with pytest.raises(Exception) as info:
            case()
        assert text in str(info.value), (text, str(info.value))
