"""Cost fits, the profile store, and a quick compute profile on the CPU."""
import math

import pytest
import torch

from shardkit.pipeline.llama import LlamaConfig
from shardkit.pipeline.profiler import ComputeCost, LinkCost, load_profile, profile_compute, save_profile


def test_fit_recovers_coefficients():
    true = ComputeCost(2e-4, 3e-6, 4e-10, 1e-10)
    samples = [(s, p, true(s, p)) for s in (64, 256, 1024, 4096) for p in (0, 2048, 8192)]
    fit = ComputeCost.fit(samples)
    for name in "abcd":
        assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=1e-6)
    assert fit.max_relative_error(samples) < 1e-9


def test_fit_keeps_coefficients_nonnegative():
    # Pure linear data plus noise that would pull the quadratic term below zero.
    samples = [(s, 0, 1e-3 + 1e-6 * s * (1 - 1e-3 * (s == 4096))) for s in (128, 512, 2048, 4096)]
    fit = ComputeCost.fit(samples)
    assert min(fit.a, fit.b, fit.c, fit.d) >= 0
    assert fit.max_relative_error(samples) < 0.01


def test_link_fit():
    samples = [(n, 5e-5 + n / 2e9) for n in (1024, 1 << 20, 1 << 24)]
    fit = LinkCost.fit(samples)
    assert fit.latency == pytest.approx(5e-5, rel=1e-6) and fit.bytes_per_s == pytest.approx(2e9, rel=1e-6)
    assert LinkCost.fit([(10, 2e-5), (1000, 1e-5)]) == LinkCost(pytest.approx(1.4e-5, rel=0.2), float("inf"))
    with pytest.raises(ValueError, match="seconds > 0"):
        LinkCost.fit([(10, 0.0), (20, 1.0)])


def test_profile_compute_and_store(tmp_path):
    cfg = LlamaConfig(vocab=50, hidden=32, layers=1, heads=4, kv_heads=2, head_dim=8, ffn=48)
    prof = profile_compute(cfg, device="cpu", dtype=torch.float32, slice_lengths=[3, 17], prefixes=[0, 9], reps=2)
    assert [(s, p) for s, p, _ in prof["layer"]] == [(3, 0), (3, 9), (17, 0), (17, 9)]
    assert [s for s, _, _ in prof["head"]] == [3, 17]
    assert all(t > 0 and math.isfinite(t) for _, _, t in prof["layer"] + prof["head"])
    doc = {"device": "cpu", "layer": ComputeCost.fit(prof["layer"]), "link": [LinkCost(1e-5, 1e9)],
           "samples": prof}
    save_profile(str(tmp_path / "p.json"), doc)
    back = load_profile(str(tmp_path / "p.json"))
    assert back["layer"] == doc["layer"] and back["link"] == doc["link"]
    assert [tuple(x) for x in back["samples"]["layer"]] == prof["layer"]
