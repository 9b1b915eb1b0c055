"""From measured costs to a pipeline plan: the layer partition and the prompt's slicing.

The partition DP needs each layer's time for the whole prompt, which depends on the slicing; the
optimal slicing depends on the partition. ``plan_pipeline`` alternates the two, as HPipe's planner
does: start from a uniform slicing, cut the layers (``partition_layers``), slice optimally for that
cut (``optimal_slicing``), recompute the per-layer times under the new slicing, and stop when the
cut repeats; the plan with the smallest modelled makespan wins. For each cut the uniform slicings
within the caps are candidates too, so that a plan never models slower than the best uniform
slicing of its cut (the search is exact on its grid, but a uniform slicing need not lie on it);
with ``lengths`` (the profiled slice lengths) only those whose every slice has a listed length: on
an H200 the 14 slices of 2341 tokens that the model put 0.5% below 32 x 1024 ran 8% slower than
them, 22% above the model (unprofiled lengths run off the smooth fit).

**Calibration** (``run_scales``). A stage in a pipelined run computes more slowly than the same
layers profiled alone: on 2 H200s, with 1024-4096-token slices, 5-10% on the sending stage and
10-14% on the receiving one (causes not separated: the excess grows over a run's first ~100 ms,
as sustained clocks would, and the receiving stage has a link kernel waiting beside its compute).
A pipelined run's own per-slice timelines measure it per stage: its compute time over what the
model gives for the same slices. Scaling each stage's costs by that (``ComputeCost.scaled``), one
run of x16 slices predicted x8 and x32 within +3.1% and +0.2% (x4, 8192-token slices, whose excess
was 1-3%: +7.7%); a constant extra per slice from the same run missed x32 by +12%: the excess
grows with the work more than with the calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .partition import Partition, partition_layers, stage_loads
from .profiler import ComputeCost, LinkCost
from .slicing import Schedule, StageModel, check_slices, optimal_slicing, schedule, uniform_slicing

__all__ = ["Plan", "stage_models", "plan_pipeline", "uniform_candidates", "run_scales"]


def stage_models(bounds: Sequence[int], layer_cost: Sequence[ComputeCost], head_cost: ComputeCost,
                 link_cost: Sequence[LinkCost], bytes_per_token: int) -> List[StageModel]:
    """``StageModel``s of the cut ``bounds``: stage ``m`` runs ``bounds[m+1] - bounds[m]`` layers at
    ``layer_cost[m]`` each, the last one also the head (``head_cost``, on the final slice), and
    sends ``bytes_per_token`` per token over ``link_cost[m]``."""
    M = len(bounds) - 1
    if len(layer_cost) != M or len(link_cost) != M - 1:
        raise ValueError(f"{M} stages need {M} layer costs and {M - 1} link costs, got "
                         f"{len(layer_cost)} and {len(link_cost)}")
    models = []
    for m in range(M):
        count, cost = bounds[m + 1] - bounds[m], layer_cost[m]
        link = (lambda s, c=link_cost[m]: c(s * bytes_per_token)) if m < M - 1 else (lambda s: 0.0)
        final = (lambda s: head_cost(s)) if m == M - 1 else (lambda s: 0.0)
        models.append(StageModel(lambda s, p, n=count, c=cost: n * c(s, p), link, final))
    return models


@dataclass(frozen=True)
class Plan:
    partition: Partition
    slices: Tuple[int, ...]
    stages: Tuple[StageModel, ...]

    @property
    def schedule(self) -> Schedule:
        return schedule(self.stages, self.slices)

    @property
    def makespan(self) -> float:
        return self.schedule.makespan


def plan_pipeline(layer_cost: Sequence[ComputeCost], head_cost: ComputeCost, link_cost: Sequence[LinkCost], *,
                  layers: int, tokens: int, bytes_per_token: int, granularity: int,
                  max_slice_tokens: Optional[int] = None, lengths: Optional[Sequence[int]] = None,
                  bounds: Optional[Sequence[int]] = None, rounds: int = 4) -> Plan:
    """The partition and slicing with the smallest modelled makespan (see the module doc).

    Args:
        layer_cost: per stage, one decoder layer's cost on that stage's device.
        head_cost: the final norm + LM head on the last stage's device.
        link_cost: per stage boundary, the link's cost.
        layers, tokens: the model's decoder layers and the prompt's length.
        bytes_per_token: activation bytes a link carries per token (batch * hidden * element size).
        granularity, max_slice_tokens, lengths: as in ``optimal_slicing``.
        bounds: a fixed cut (e.g. the even split) to slice for, instead of the partition DP.
        rounds: at most this many partition/slicing alternations.
    """
    slices = uniform_slicing(tokens, min(8, max(1, tokens // granularity)))
    best: Optional[Plan] = None
    seen = set()
    for _ in range(rounds):
        per_layer = [sum(cost(s, p) for s, p in zip(slices, _starts(slices))) for cost in layer_cost]
        costs = [[c] * layers for c in per_layer]
        for row in costs:
            row[-1] += head_cost(slices[-1])
        links = [sum(c(s * bytes_per_token) for s in slices) for c in link_cost]
        part = partition_layers(costs, links) if bounds is None else Partition(tuple(bounds), stage_loads(bounds, costs, links))
        if part.bounds in seen:
            break
        seen.add(part.bounds)
        models = stage_models(part.bounds, layer_cost, head_cost, link_cost, bytes_per_token)
        slices = optimal_slicing(models, tokens, granularity=granularity, max_slice_tokens=max_slice_tokens,
                                 lengths=lengths).slices
        slices = min([slices] + uniform_candidates(tokens, max_slice_tokens, lengths),
                     key=lambda c: (schedule(models, c).makespan, c is not slices))
        plan = Plan(part, slices, tuple(models))
        if best is None or plan.makespan < best.makespan:
            best = plan
        if bounds is not None:
            break
    assert best is not None
    return best


def _starts(slices: Sequence[int]) -> List[int]:
    out, p = [], 0
    for s in slices:
        out.append(p)
        p += s
    return out


def uniform_candidates(tokens: int, max_slice_tokens: Optional[int] = None, lengths: Optional[Sequence[int]] = None,
                       most: int = 256) -> List[Tuple[int, ...]]:
    """The uniform slicings of ``tokens`` into 1..``most`` slices whose longest slice is within the cap
    and, with ``lengths``, whose every slice has one of those lengths."""
    out = [uniform_slicing(tokens, n) for n in range(1, min(tokens, most) + 1)
           if max_slice_tokens is None or -(-tokens // n) <= max_slice_tokens]
    return out if lengths is None else [c for c in out if set(c) <= set(lengths)]


def run_scales(stages: Sequence[StageModel], slices: Sequence[int],
               timelines: Sequence[Sequence[Tuple[float, float]]]) -> Tuple[float, ...]:
    """Per stage, its compute time in a pipelined run of ``slices`` over the time ``stages`` model
    for the same slices (the module doc: calibration).

    Args:
        stages: the run's stage models (``stage_models`` of its cut).
        slices: the run's slicing.
        timelines: per stage, the run's per-slice ``(start, end)`` seconds
            (``PipelineRuntime.timeline()`` of every rank, in rank order).
    """
    slices = check_slices(slices)
    if len(timelines) != len(stages) or any(len(tl) != len(slices) for tl in timelines):
        raise ValueError(f"timelines must hold {len(stages)} stages x {len(slices)} slices, got "
                         f"{[len(tl) for tl in timelines]}")
    modelled = schedule(stages, slices).compute
    out = []
    for m, (tl, row) in enumerate(zip(timelines, modelled)):
        measured, model = sum(b - a for a, b in tl), sum(b - a for a, b in row)
        if not (measured > 0 and model > 0):
            raise ValueError(f"stage {m}: measured {measured} s and modelled {model} s must both be > 0")
        out.append(measured / model)
    return tuple(out)
