"""The token-dimension pipeline on CPU worlds of 2 and 3 processes (gloo): tiny-llama-pycode in
fp32, uneven cuts and slicings; last-slice logits and greedy tokens against the float64 reference
and the single-device model."""
import pytest
import torch

from shardkit.pipeline.llama import LlamaStage
from shardkit.testing import RankError

from . import stage_checks
from ._model import MODEL_DIR, NEW_TOKENS, config, needs_model, prompt, reference, relative_error, weights

pytestmark = needs_model

CASES = [  # (world, layer cut, slices of the 70-token prompt)
    (2, (0, 3, 8), (30, 25, 15)),
    (2, (0, 6, 8), (70,)),
    (3, (0, 2, 5, 8), (7, 40, 23)),
    (3, (0, 1, 7, 8), (1, 1, 20, 20, 28)),
]


def single_device_logits() -> torch.Tensor:
    cfg = config()
    stage = LlamaStage(cfg, weights(), range(cfg.layers), first=True, last=True, max_tokens=prompt().shape[1])
    with torch.no_grad():
        return stage.forward(prompt(), 0)


@pytest.mark.parametrize("world,bounds,slices", CASES)
def test_matches_single_device(worlds, world, bounds, slices):
    out = worlds(world).run(stage_checks.generate, MODEL_DIR, bounds, slices, prompt(), NEW_TOKENS)
    ref_logits, ref_tokens = reference()
    logits = out[-1]["logits"]
    assert all(o["logits"] is None for o in out[:-1])
    assert logits.shape == (1, slices[-1], config().vocab)
    assert relative_error(logits, ref_logits[:, -slices[-1]:]) <= 1e-4
    assert relative_error(logits, single_device_logits()[:, -slices[-1]:]) <= 1e-4
    for o in out:  # every rank gets the generated tokens
        assert torch.equal(o["tokens"], ref_tokens), (o["tokens"], ref_tokens)
        assert len(o["timeline"]) == len(slices)
        assert all(0 <= a <= b for a, b in o["timeline"])


def test_sends_overlap_next_slice(worlds):
    # The last stage starts 2 s late: stage 0 still computes all its slices back to back (its
    # sends do not wait for the receiver), then waits for its sends at the end of the prefill.
    out = worlds(2).run(stage_checks.sends_do_not_wait, MODEL_DIR, (0, 4, 8), (20, 20, 30), prompt(), 2.0)
    first = out[0]
    assert first["seconds"] >= 1.9
    assert first["timeline"][-1][1] < first["seconds"] - 1.0, first


def test_mismatched_stages_raise_on_every_rank(worlds):
    with pytest.raises(RankError) as e:
        worlds(2).run(stage_checks.mismatched_stages, MODEL_DIR, [(0, 4, 8), (0, 5, 8)])
    assert sorted(e.value.errors) == [0, 1]
    assert all("layer" in msg for _, msg in e.value.errors.values())


@pytest.mark.parametrize("kwargs,match", [({"link_ctas": 0}, "link_ctas must be"), ({"wire": "pcie"}, "wire must be")])
def test_bad_runtime_argument_on_one_rank_raises_on_every_rank(worlds, kwargs, match):
    with pytest.raises(RankError) as e:
        worlds(2).run(stage_checks.runtime_arguments, MODEL_DIR, [kwargs, {}])
    assert sorted(e.value.errors) == [0, 1]
    assert all(match in msg for _, msg in e.value.errors.values())


@pytest.mark.parametrize("slices,match", [((30, 30), "sum to the prompt length"), ((70, 0), "positive ints"),
                                          ({0: (35, 35), 1: (30, 40)}, "called differently")])
def test_bad_slices_raise_on_every_rank(worlds, slices, match):
    with pytest.raises(RankError) as e:
        worlds(2).run(stage_checks.bad_prefill, MODEL_DIR, (0, 4, 8), slices, prompt())
    assert sorted(e.value.errors) == [0, 1]
    assert all(match in msg for _, msg in e.value.errors.values())


def test_link_profile(worlds):
    out = worlds(3).run(stage_checks.link_profile, MODEL_DIR, (0, 2, 5, 8), [1, 64, 512])
    samples, fits = out[0]
    assert all(o[0] == samples for o in out)  # every rank gets every link's samples
    assert len(samples) == 2 and all(len(s) == 3 for s in samples)
    assert [n for n, _ in samples[0]] == [4 * 512 * t for t in (1, 64, 512)]
    assert all(t > 0 for s in samples for _, t in s)
    assert all(f.bytes_per_s > 0 and f.latency >= 0 for f in fits)
