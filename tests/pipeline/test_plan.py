"""The planner: a plan never models slower than the best uniform slicing of its cut."""
from shardkit.pipeline.plan import plan_pipeline, stage_models, uniform_candidates
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
