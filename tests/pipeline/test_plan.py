"""The planner: a plan never models slower than the best uniform slicing of its cut, uses only the
listed (profiled) slice lengths when given them; calibration scales from a run's timelines."""
import pytest

from shardkit.pipeline.plan import plan_pipeline, run_scales, stage_models, uniform_candidates
from shardkit.pipeline.profiler import ComputeCost, LinkCost
from shardkit.pipeline.slicing import makespan_lower_bound, schedule


def test_plan_not_worse_than_uniform_and_above_bound():
    # Slices that cost the same wherever they start: two equal slices are best, and 2 x 50 tokens is
    # off the 30-token grid, which holds (60, 40) at best: the plan must still take the uniform one.
    layer = ComputeCost(a=5.0, b=0.1)
    head, link = ComputeCost(a=0.1, b=0.0), LinkCost(0.01, 1e4)
    kw = dict(layers=6, tokens=100, bytes_per_token=4, granularity=30, max_slice_tokens=60)
    plan = plan_pipeline([layer, layer], head, [link], **kw)
    models = stage_models(plan.partition.bounds, [layer, layer], head, [link], 4)
    uniform = [c for c in uniform_candidates(100, 60)]
    assert all(max(c) <= 60 for c in uniform) and len(uniform) == 99
    assert plan.makespan <= min(schedule(models, c).makespan for c in uniform) + 1e-12
    assert plan.slices == (50, 50)
    assert plan.makespan >= makespan_lower_bound(models, 100, granularity=30, max_slice_tokens=60) - 1e-12


def _compositions_of(tokens, lengths):
    """Every sequence of ``lengths`` that sums to ``tokens``."""
    if tokens == 0:
        yield ()
        return
    for s in lengths:
        if s <= tokens:
            for rest in _compositions_of(tokens - s, lengths):
                yield (s,) + rest


def test_plan_uses_only_listed_lengths_and_is_exact():
    # Slices cost the same wherever they start, with a fixed cost per call: 2 x 50 tokens models best,
    # but 50 is not a listed (profiled) length; the plan must be the best slicing made of listed
    # lengths only, the last slice too (brute force over every such slicing), for a fixed cut.
    layer = ComputeCost(a=5.0, b=0.1, c=1e-4, lengths=((30, 8.0, 0.01), (40, 9.5, 0.01), (60, 11.0, 0.02)))
    head, link = ComputeCost(a=0.1, b=0.0), LinkCost(0.01, 1e4)
    lengths = (30, 40, 60)
    kw = dict(layers=6, tokens=100, bytes_per_token=4, granularity=10, max_slice_tokens=60, lengths=lengths)
    bounds = (0, 3, 6)
    plan = plan_pipeline([layer, layer], head, [link], bounds=bounds, **kw)
    models = stage_models(bounds, [layer, layer], head, [link], 4)
    assert schedule(models, (50, 50)).makespan < plan.makespan  # the off-list uniform models faster
    assert set(plan.slices) <= set(lengths) and sum(plan.slices) == 100
    want = min(schedule(models, c).makespan for c in _compositions_of(100, lengths))
    assert plan.makespan == pytest.approx(want, rel=1e-12)
    assert all(set(c) <= set(lengths) for c in uniform_candidates(100, 60, lengths))


def test_run_scales_and_scaled_costs():
    # A run whose stage 0 computed every slice 1.1x the model and stage 1 1.3x: the scales say so,
    # and the scaled costs model that run's compute times.
    layer = ComputeCost(a=1e-3, b=1e-6, c=1e-10, d=1e-11, lengths=((1024, 2e-3, 3e-8),))
    head, link = ComputeCost(a=1e-4, b=1e-7), LinkCost(1e-5, 1e9)
    bounds, slices = (0, 2, 5), (1024, 700, 300)
    models = stage_models(bounds, [layer, layer], head, [link], 8)
    run = schedule(models, slices).compute
    timelines = [[(10 + a, 10 + a + k * (b - a)) for a, b in row] for row, k in zip(run, (1.1, 1.3))]
    scales = run_scales(models, slices, timelines)
    assert scales == pytest.approx((1.1, 1.3), rel=1e-12)
    calibrated = stage_models(bounds, [layer.scaled(k) for k in scales], head.scaled(scales[-1]), [link], 8)
    for row, cal, k in zip(run, schedule(calibrated, slices).compute, scales):
        assert [b - a for a, b in cal] == pytest.approx([k * (b - a) for a, b in row], rel=1e-12)
    with pytest.raises(ValueError, match="factor"):
        layer.scaled(0.0)
    with pytest.raises(ValueError, match="timelines must hold"):
        run_scales(models, slices, timelines[:1])
