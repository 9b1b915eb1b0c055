"""Cutting the layers into pipeline stages by dynamic programming (HPipe, Ma et al. 2024, Sec. 3.2).

Stage ``m`` (in pipeline order) runs on its own device, whose measured time for layer ``i`` is
``layer_costs[m][i]`` (different devices, different rows: a slower or loaded device has larger
costs), and passes its activations to stage ``m + 1`` in ``link_costs[m]``. A pipeline is as fast
as its slowest stage, so the best cut minimises the bottleneck

    max over m of ( sum of layer_costs[m][i] for i in stage m  +  link_costs[m] )

over all ways to give each stage a contiguous, non-empty run of layers, in order. With ``A[b][m]``
the best bottleneck of layers ``0..b-1`` on stages ``0..m``:

    A[b][m] = min over k of max( A[k][m-1],  T_m(k..b-1) + link(m) )

(``T_m`` from prefix sums: O(M N^2) time for N layers on M stages, exact). The sender's link time
is charged to its stage, as in HPipe: where transfers overlap compute (``PipelineRuntime``'s
asynchronous sends) this overestimates slow links a little, never underestimates them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

__all__ = ["Partition", "partition_layers", "even_partition", "stage_loads"]


@dataclass(frozen=True)
class Partition:
    """Stage ``m`` holds layers ``bounds[m] .. bounds[m + 1] - 1``; ``loads[m]``: its time with its link."""

    bounds: Tuple[int, ...]
    loads: Tuple[float, ...]

    @property
    def bottleneck(self) -> float:
        return max(self.loads)

    @property
    def stages(self) -> List[range]:
        return [range(a, b) for a, b in zip(self.bounds, self.bounds[1:])]


def _check(layer_costs: Sequence[Sequence[float]], link_costs: Sequence[float]) -> Tuple[int, int]:
    stages = len(layer_costs)
    if stages < 1:
        raise ValueError("layer_costs must have one row per stage, got none")
    layers = len(layer_costs[0])
    if any(len(row) != layers for row in layer_costs):
        raise ValueError(f"layer_costs rows must all have one cost per layer, got lengths {[len(r) for r in layer_costs]}")
    if layers < stages:
        raise ValueError(f"every stage needs a layer: {layers} layers cannot fill {stages} stages")
    if len(link_costs) != stages - 1:
        raise ValueError(f"link_costs needs one cost per stage boundary ({stages - 1}), got {len(link_costs)}")
    for name, values in (("layer_costs", [c for row in layer_costs for c in row]), ("link_costs", link_costs)):
        if any(not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0) for c in values):
            raise ValueError(f"{name} must be finite numbers >= 0")
    return stages, layers


def stage_loads(bounds: Sequence[int], layer_costs: Sequence[Sequence[float]],
                link_costs: Sequence[float]) -> Tuple[float, ...]:
    """Each stage's layer time plus its outgoing link time under the cut ``bounds``."""
    links = list(link_costs) + [0.0]  # the last stage sends nothing
    return tuple(sum(layer_costs[m][bounds[m]:bounds[m + 1]]) + links[m] for m in range(len(layer_costs)))


def partition_layers(layer_costs: Sequence[Sequence[float]], link_costs: Sequence[float]) -> Partition:
    """The cut of ``N`` layers into ``M`` contiguous non-empty stages with the smallest bottleneck.

    Args:
        layer_costs: ``M`` rows of ``N`` non-negative times: ``layer_costs[m][i]`` is layer ``i`` on
            stage ``m``'s device.
        link_costs: ``M - 1`` times: moving the activations from stage ``m`` to ``m + 1``.

    Returns:
        The ``Partition``; among cuts with equal bottleneck, the one found first (earliest cuts).
    """
    M, N = _check(layer_costs, link_costs)
    links = list(link_costs) + [0.0]
    prefix = [[0.0] * (N + 1) for _ in range(M)]
    for m in range(M):
        for i, c in enumerate(layer_costs[m]):
            prefix[m][i + 1] = prefix[m][i] + c
    inf = float("inf")
    # best[m][b]: least bottleneck of layers 0..b-1 on stages 0..m; cut[m][b]: where stage m starts.
    best = [[inf] * (N + 1) for _ in range(M)]
    cut = [[0] * (N + 1) for _ in range(M)]
    for b in range(1, N + 1):
        best[0][b] = prefix[0][b] + links[0]
    for m in range(1, M):
        for b in range(m + 1, N + 1):
            for k in range(m, b):  # stage m gets layers k..b-1; stages 0..m-1 need >= m layers
                v = max(best[m - 1][k], prefix[m][b] - prefix[m][k] + links[m])
                if v < best[m][b]:
                    best[m][b], cut[m][b] = v, k
    bounds = [N]
    for m in range(M - 1, 0, -1):
        bounds.append(cut[m][bounds[-1]])
    bounds = tuple([0] + bounds[::-1])
    return Partition(bounds, stage_loads(bounds, layer_costs, link_costs))


def even_partition(layers: int, stages: int, layer_costs: Sequence[Sequence[float]] | None = None,
                   link_costs: Sequence[float] = ()) -> Partition:
    """The even split (the first ``layers % stages`` stages get one layer more), with its loads
    under ``layer_costs``/``link_costs`` if given (else zeros)."""
    if not 1 <= stages <= layers:
        raise ValueError(f"need 1 <= stages <= layers, got stages={stages}, layers={layers}")
    size, extra = divmod(layers, stages)
    bounds = [0]
    for m in range(stages):
        bounds.append(bounds[-1] + size + (m < extra))
    if layer_costs is None:
        return Partition(tuple(bounds), (0.0,) * stages)
    _check(layer_costs, link_costs)
    return Partition(tuple(bounds), stage_loads(bounds, layer_costs, link_costs))
