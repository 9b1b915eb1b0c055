"""The layer-partition DP against brute force over every cut, on random heterogeneous costs."""
import itertools
import random

import pytest

from shardkit.pipeline.partition import even_partition, partition_layers, stage_loads


def brute_force(layer_costs, link_costs):
    """(best bottleneck, every cut achieving it) by enumerating all C(N-1, M-1) cuts."""
    M, N = len(layer_costs), len(layer_costs[0])
    best, cuts = float("inf"), []
    for inner in itertools.combinations(range(1, N), M - 1):
        bounds = (0,) + inner + (N,)
        loads = [sum(layer_costs[m][bounds[m]:bounds[m + 1]]) + (link_costs[m] if m < M - 1 else 0.0)
                 for m in range(M)]
        v = max(loads)
        if v < best - 1e-12:
            best, cuts = v, [bounds]
        elif abs(v - best) <= 1e-12:
            cuts.append(bounds)
    return best, cuts


def random_case(rng, stages, layers, kinds):
    """``kinds`` device kinds (a speed per kind, and per-layer variation shared by all kinds, as for
    real layers of different shapes), each stage on a random kind; random link costs."""
    layer_work = [rng.uniform(0.2, 3.0) for _ in range(layers)]
    speed = [rng.uniform(0.3, 4.0) for _ in range(kinds)]
    kind_of = [rng.randrange(kinds) for _ in range(stages)]
    costs = [[w / speed[kind_of[m]] for w in layer_work] for m in range(stages)]
    links = [rng.choice([0.0, rng.uniform(0.0, 2.0)]) for _ in range(stages - 1)]
    return costs, links


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5])
def test_dp_equals_brute_force(stages):
    rng = random.Random(stages)
    for trial in range(60):
        layers = rng.randint(stages, 11)
        costs, links = random_case(rng, stages, layers, kinds=rng.randint(1, 3))
        if trial % 4 == 3:  # arbitrary per-(stage, layer) costs, not a speed times a work
            costs = [[rng.uniform(0.0, 5.0) for _ in range(layers)] for _ in range(stages)]
        want, cuts = brute_force(costs, links)
        got = partition_layers(costs, links)
        assert got.bottleneck == pytest.approx(want, rel=1e-12, abs=1e-12), (costs, links)
        assert got.bounds in cuts
        assert got.loads == stage_loads(got.bounds, costs, links)
        assert [len(r) for r in got.stages] == [b - a for a, b in zip(got.bounds, got.bounds[1:])]
        assert all(len(r) >= 1 for r in got.stages)


def test_slower_device_gets_fewer_layers():
    # 16 equal layers, stage 1 twice as slow: 11 / 5 balances 11 vs 10 (10.67 ideal), a slow link
    # on stage 0 moves a layer back.
    fast, slow = [1.0] * 16, [2.0] * 16
    assert partition_layers([fast, slow], [0.0]).bounds == (0, 11, 16)
    assert partition_layers([fast, slow], [1.5]).bounds == (0, 10, 16)
    assert partition_layers([slow, fast], [0.0]).bounds == (0, 5, 16)


def test_even_partition():
    assert even_partition(10, 3).bounds == (0, 4, 7, 10)
    p = even_partition(4, 2, [[1, 2, 3, 4], [1, 1, 1, 1]], [0.5])
    assert p.loads == (3.5, 2.0) and p.bottleneck == 3.5


@pytest.mark.parametrize("costs,links,match", [
    ([], [], "one row per stage"),
    ([[1, 2], [1]], [0], "one cost per layer"),
    ([[1], [1]], [0], "cannot fill"),
    ([[1, 2], [1, 2]], [], "stage boundary"),
    ([[1, float("nan")], [1, 2]], [0], "finite"),
    ([[1, -2], [1, 2]], [0], "finite numbers >= 0"),
])
def test_bad_input(costs, links, match):
    with pytest.raises(ValueError, match=match):
        partition_layers(costs, links)
