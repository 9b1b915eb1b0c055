"""Makespans of slicings, and the optimal slicing against brute force over every slicing."""
import random

import pytest

from shardkit.pipeline.slicing import (StageModel, check_slices, makespan_lower_bound, optimal_slicing, schedule,
                                       uniform_slicing)


def compositions(units):
    """Every way to cut ``units`` into positive parts, in order."""
    for mask in range(1 << (units - 1)):
        out, run = [], 1
        for b in range(units - 1):
            if mask >> b & 1:
                out.append(run)
                run = 1
            else:
                run += 1
        yield out + [run]


def random_stages(rng, count):
    stages = []
    for _ in range(count):
        a, b, c, d = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, 0.3), rng.uniform(0, 0.3)
        la, lb = rng.choice([0.0, rng.uniform(0, 1)]), rng.uniform(0, 0.6)
        stages.append(StageModel(lambda s, p, a=a, b=b, c=c, d=d: a + b * s + c * s * p + d * s * s,
                                 lambda s, la=la, lb=lb: la + lb * s, lambda s, h=rng.uniform(0, 0.5): h * s))
    return stages


def test_schedule_by_hand():
    # Two stages, slice j costs (j+1) on stage 0 and 2 on stage 1, link 1 per slice:
    # stage 0: [0,1] [1,3] ; link: [1,2] [3,4] ; stage 1: [2,4] [4,6] + final 0.5 -> 6.5
    st0 = StageModel(lambda s, p: 1.0 + p, lambda s: 1.0)
    st1 = StageModel(lambda s, p: 2.0, final=lambda s: 0.5)
    sch = schedule([st0, st1], [1, 1])
    assert sch.compute == (((0.0, 1.0), (1.0, 3.0)), ((2.0, 4.0), (4.0, 6.5)))
    assert sch.transfer == (((1.0, 2.0), (3.0, 4.0)),)
    assert sch.makespan == 6.5


def test_link_is_its_own_resource():
    # A slow link (3 per slice) is the bottleneck: transfers queue behind each other.
    st0 = StageModel(lambda s, p: 1.0, lambda s: 3.0)
    st1 = StageModel(lambda s, p: 1.0)
    sch = schedule([st0, st1], [1, 1, 1])
    assert [t for t in sch.transfer[0]] == [(1.0, 4.0), (4.0, 7.0), (7.0, 10.0)]
    assert sch.makespan == 11.0


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_optimal_equals_brute_force(stages):
    rng = random.Random(10 + stages)
    for _ in range(25):
        models = random_stages(rng, stages)
        units = rng.randint(1, 9)
        want = min(schedule(models, c).makespan for c in compositions(units))
        got = optimal_slicing(models, units)
        assert got.makespan == pytest.approx(want, rel=1e-12)
        assert schedule(models, got.slices).makespan == pytest.approx(want, rel=1e-12)
        assert sum(got.slices) == units


def test_granularity_and_caps_against_brute_force():
    rng = random.Random(3)
    models = random_stages(rng, 3)
    tokens, g = 23, 4  # cuts at multiples of 4, the last slice ends at 23
    grid_slicings = [[4 * u for u in c[:-1]] + [4 * c[-1] - 1] for c in compositions(6)]
    for cap in (None, 8, 12):
        ok = [c for c in grid_slicings if cap is None or max(c) <= cap]
        want = min(schedule(models, c).makespan for c in ok)
        got = optimal_slicing(models, tokens, granularity=g, max_slice_tokens=cap)
        assert got.makespan == pytest.approx(want, rel=1e-12)
        assert all(s % g == 0 for s in got.slices[:-1]) and sum(got.slices) == tokens
    # A time cap: no slice may take longer than 6 s on any stage (TeraPipe's t_max).
    worst = lambda c: max(m.compute(s, p) for m in models for s, p in zip(c, [sum(c[:j]) for j in range(len(c))]))
    ok = [c for c in grid_slicings if worst(c) <= 6.0]
    if ok:
        got = optimal_slicing(models, tokens, granularity=g, max_slice_seconds=6.0)
        assert got.makespan == pytest.approx(min(schedule(models, c).makespan for c in ok), rel=1e-12)


def test_optimal_beats_uniform_on_long_prompts():
    # Attention makes late slices dear: the optimum puts longer slices first, shorter last.
    layer = lambda s, p: 16 * (2e-5 + 7e-7 * s + 2.7e-10 * s * p + 1.35e-10 * s * s)
    models = [StageModel(layer, lambda s: 1e-5 + s * 8192 / 1e11), StageModel(layer)]
    best = optimal_slicing(models, 32768, granularity=1024)
    uniform = min(schedule(models, uniform_slicing(32768, n)).makespan for n in range(1, 33))
    assert best.makespan < uniform
    assert best.slices[0] > best.slices[-1]


def test_uniform_slicing():
    assert uniform_slicing(10, 3) == (4, 3, 3)
    assert uniform_slicing(5, 5) == (1,) * 5


def test_bad_input():
    models = random_stages(random.Random(0), 2)
    with pytest.raises(ValueError, match="slices must be"):
        schedule(models, [3, 0])
    with pytest.raises(ValueError, match="slices must be"):
        check_slices([])
    with pytest.raises(ValueError, match="at least one StageModel"):
        schedule([], [1])
    with pytest.raises(ValueError, match="count <= tokens"):
        uniform_slicing(3, 4)
    with pytest.raises(ValueError, match="granularity"):
        optimal_slicing(models, 10, granularity=0)
    with pytest.raises(ValueError, match="no slicing"):
        optimal_slicing(models, 10, max_slice_seconds=1e-9)


def test_allowed_lengths_against_brute_force():
    # Every slice, the last one too, must have an allowed length (the profiled ones); a prompt that
    # no allowed lengths add up to has no slicing.
    rng = random.Random(8)
    for allowed in ([1, 2], [2, 3], [3], [2, 5]):
        for _ in range(10):
            models = random_stages(rng, rng.randint(1, 3))
            units = rng.randint(1, 9)
            ok = [c for c in compositions(units) if all(x in allowed for x in c)]
            if not ok:
                with pytest.raises(ValueError, match="no slicing"):
                    optimal_slicing(models, units, lengths=allowed)
                continue
            want = min(schedule(models, c).makespan for c in ok)
            got = optimal_slicing(models, units, lengths=allowed)
            assert got.makespan == pytest.approx(want, rel=1e-12)
            assert all(x in allowed for x in got.slices) and sum(got.slices) == units
            bound = makespan_lower_bound(models, units, lengths=allowed)
            assert bound <= got.makespan * (1 + 1e-12)


def test_lower_bound_holds_and_is_tight_for_one_stage():
    rng = random.Random(21)
    for _ in range(30):
        models = random_stages(rng, rng.randint(1, 3))
        units = rng.randint(1, 8)
        bound = makespan_lower_bound(models, units)
        assert bound <= optimal_slicing(models, units).makespan * (1 + 1e-12)
        if len(models) == 1:
            assert bound == pytest.approx(optimal_slicing(models, units).makespan, rel=1e-12)
    # Identical stages, cost 1 per slice plus 1 per token: 2 stages, 4 tokens -> busy >= 1 + 4 = 5,
    # plus the cheapest first slice on the stage in front (1 token: 2) -> 7; optimal: 1,1,1,1 -> 8+2.
    st = StageModel(lambda s, p: 1.0 + s)
    assert makespan_lower_bound([st, st], 4) == 7.0
