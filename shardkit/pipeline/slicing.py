"""Slicing a long prompt along the tokens for a token-dimension pipeline (TeraPipe, HPipe).

The prompt's ``L`` tokens are cut into slices ``s_1, ..., s_n`` that enter stage 0 one after
another; slice ``j`` starts at position ``p_j = s_1 + ... + s_{j-1}`` and its attention reads the
``p_j`` cached positions before it, so a slice costs more the later it comes. Each stage computes
the slices in order; each link carries them in order, overlapped with compute (the runtime's
asynchronous sends). With ``c[m][j]`` the time of slice ``j`` on stage ``m`` and ``l[m][j]`` on the
link from ``m`` to ``m + 1``, slice ``j`` finishes

    F[m][j] = max(F[m][j-1], X[m-1][j]) + c[m][j]       (F[0][j] = F[0][j-1] + c[0][j])
    X[m][j] = max(X[m][j-1], F[m][j]) + l[m][j]         (the link is a resource of its own)

and the prompt's last logits are ready at the makespan ``F[M-1][n]`` (the last stage's final slice
includes the LM head). ``schedule`` evaluates this for any slicing.

**Optimal slicing** (``optimal_slicing``). TeraPipe's DP fixes a bound on the slowest slice and
minimises the sum of slice times, which is exact for identical stages. Here stages differ (devices,
layer counts, links), so the search is exact for any stages instead: the future of a partial
slicing that covers tokens ``0..i-1`` depends only on ``i`` and the state vector
``(F[0], X[0], F[1], ..., F[M-1])`` after its last slice, and every step is a max-plus map, monotone
in every coordinate. So at each cut position only the Pareto-minimal state vectors can lead to an
optimum; a DP over cut positions (multiples of ``granularity``) that keeps exactly those finds the
minimal makespan over all slicings on that grid. Caps: ``max_slice_tokens`` (activation memory)
and ``max_slice_seconds`` (no slice may occupy any stage longer: a latency bound, TeraPipe's
``t_max``); ``lengths`` restricts every slice, the last one too, to the given lengths (those whose
cost was measured: a length between them can run well off any curve through them, e.g. GEMM tiles
and waves; the prompt's length must then be a sum of listed lengths).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["check_slices", "StageModel", "Schedule", "schedule", "uniform_slicing", "optimal_slicing", "SlicingResult",
           "makespan_lower_bound"]


def _zero(*_: int) -> float:
    return 0.0


@dataclass(frozen=True)
class StageModel:
    """What one pipeline stage costs, in seconds.

    compute(s, p): a slice of ``s`` tokens after ``p`` cached ones, through all of the stage's layers.
    link(s): sending that slice's activations to the next stage (ignored on the last stage).
    final(s): extra time of the prompt's last slice (the LM head; only the last stage's counts).
    """

    compute: Callable[[int, int], float]
    link: Callable[[int], float] = _zero
    final: Callable[[int], float] = _zero


@dataclass(frozen=True)
class Schedule:
    """Start and end times (seconds from the prompt's start) of every slice on every stage and link."""

    slices: Tuple[int, ...]
    compute: Tuple[Tuple[Tuple[float, float], ...], ...]   # [stage][slice] -> (start, end)
    transfer: Tuple[Tuple[Tuple[float, float], ...], ...]  # [stage][slice] -> (start, end), stages 0..M-2

    @property
    def makespan(self) -> float:
        return self.compute[-1][-1][1]


def check_slices(slices: Sequence[int]) -> Tuple[int, ...]:
    """``slices`` as a tuple of ints, or ValueError unless it is a non-empty sequence of ints >= 1."""
    slices = tuple(slices)
    if not slices or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in slices):
        raise ValueError(f"slices must be a non-empty sequence of positive ints, got {slices!r}")
    return tuple(int(s) for s in slices)


def schedule(stages: Sequence[StageModel], slices: Sequence[int]) -> Schedule:
    """The pipeline's timetable for ``slices`` (token counts, in order) under the stage models."""
    slices = check_slices(slices)
    if not stages:
        raise ValueError("stages must hold at least one StageModel")
    M, n = len(stages), len(slices)
    compute = [[(0.0, 0.0)] * n for _ in range(M)]
    transfer = [[(0.0, 0.0)] * n for _ in range(M - 1)]
    p = 0
    for j, s in enumerate(slices):
        for m, st in enumerate(stages):
            ready = max(compute[m][j - 1][1] if j else 0.0, transfer[m - 1][j][1] if m else 0.0)
            cost = st.compute(s, p) + (st.final(s) if (m == M - 1 and j == n - 1) else 0.0)
            compute[m][j] = (ready, ready + cost)
            if m < M - 1:
                start = max(transfer[m][j - 1][1] if j else 0.0, compute[m][j][1])
                transfer[m][j] = (start, start + st.link(s))
        p += s
    return Schedule(slices, tuple(map(tuple, compute)), tuple(map(tuple, transfer)))


def uniform_slicing(tokens: int, count: int) -> Tuple[int, ...]:
    """``count`` slices of (nearly) equal length: the first ``tokens % count`` one token longer."""
    if tokens < 1 or not 1 <= count <= tokens:
        raise ValueError(f"need tokens >= 1 and 1 <= count <= tokens, got tokens={tokens}, count={count}")
    size, extra = divmod(tokens, count)
    return tuple(size + (j < extra) for j in range(count))


@dataclass(frozen=True)
class SlicingResult:
    slices: Tuple[int, ...]
    makespan: float
    largest_front: int = field(default=0)  # most Pareto states kept at one cut position


def _pareto(states: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``states`` that no other row is <= in every column (of equal rows, one).

    Rows in lexicographic order can only be dominated by rows before them. Blocks of that order are
    reduced exactly among themselves, then everything after a block is filtered against the block's
    survivors at once; since early rows dominate most others, the blocks left shrink fast.
    """
    order = np.lexsort(states.T[::-1])
    x = states[order]
    kept: List[np.ndarray] = []
    alive = np.arange(len(x))
    while alive.size:
        block, rest = alive[:256], alive[256:]
        xb = x[block]
        below = np.all(xb[None, :, :] <= xb[:, None, :], axis=2)  # below[i, j]: row j <= row i
        survivors = block[~np.any(np.tril(below, k=-1), axis=1)]
        kept.append(survivors)
        dominated = np.zeros(len(rest), dtype=bool)
        for c in range(0, len(survivors), 64):
            xs = x[survivors[c:c + 64]]
            dominated |= np.any(np.all(xs[None, :, :] <= x[rest][:, None, :], axis=2), axis=1)
        alive = rest[~dominated]
    return order[np.concatenate(kept)]


def optimal_slicing(stages: Sequence[StageModel], tokens: int, *, granularity: int = 1,
                    max_slice_tokens: Optional[int] = None, max_slice_seconds: Optional[float] = None,
                    lengths: Optional[Sequence[int]] = None) -> SlicingResult:
    """The slicing of ``tokens`` with the smallest makespan (``schedule``) whose cuts lie on
    multiples of ``granularity`` (the last slice ends at ``tokens``), subject to the caps; with
    ``lengths``, every slice (the last one too) has one of those lengths.

    Exact (Pareto DP, see the module doc); the work grows with the number of cut positions
    (``tokens / granularity``) squared times the Pareto front's size (tens to hundreds of states).
    Raises ValueError when no slicing meets the caps.
    """
    if not stages:
        raise ValueError("stages must hold at least one StageModel")
    if tokens < 1 or granularity < 1:
        raise ValueError(f"tokens and granularity must be >= 1, got tokens={tokens}, granularity={granularity}")
    if max_slice_tokens is not None and max_slice_tokens < 1:
        raise ValueError(f"max_slice_tokens must be >= 1 or None, got {max_slice_tokens}")
    allowed = None if lengths is None else {int(x) for x in lengths}
    M = len(stages)
    cuts = list(range(0, tokens, granularity)) + [tokens]
    U = len(cuts) - 1
    dims = 2 * M - 1  # F[0], X[0], F[1], X[1], ..., F[M-1]
    # pending[k]: candidate (states [K, dims], parent position, parent state indices [K]) ending at cut k
    pending: List[List[Tuple[np.ndarray, int, np.ndarray]]] = [[] for _ in range(U + 1)]
    fronts: List[Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]] = [None] * (U + 1)
    fronts[0] = (np.zeros((1, dims)), np.full(1, -1), np.full(1, -1))
    largest = 1
    for i in range(U + 1):
        if i:
            if not pending[i]:
                continue
            states = np.concatenate([c[0] for c in pending[i]])
            parent_pos = np.concatenate([np.full(len(c[0]), c[1]) for c in pending[i]])
            parent_idx = np.concatenate([c[2] for c in pending[i]])
            pending[i] = []
            keep = _pareto(states) if i < U else np.array([int(np.argmin(states[:, -1]))])
            fronts[i] = (states[keep], parent_pos[keep], parent_idx[keep])
            largest = max(largest, len(keep))
        if i == U:
            break
        front = fronts[i][0]
        p = cuts[i]
        for k in range(i + 1, U + 1):
            s = cuts[k] - p
            if max_slice_tokens is not None and s > max_slice_tokens:
                break
            if allowed is not None and s not in allowed:
                continue
            costs = [st.compute(s, p) + (st.final(s) if (m == M - 1 and k == U) else 0.0)
                     for m, st in enumerate(stages)]
            if max_slice_seconds is not None and max(costs) > max_slice_seconds:
                continue
            new = np.empty_like(front)
            finish = front[:, 0] + costs[0]
            new[:, 0] = finish
            for m in range(1, M):
                link_done = np.maximum(front[:, 2 * m - 1], finish) + stages[m - 1].link(s)
                new[:, 2 * m - 1] = link_done
                finish = np.maximum(front[:, 2 * m], link_done) + costs[m]
                new[:, 2 * m] = finish
            pending[k].append((new, i, np.arange(len(front))))
    if fronts[U] is None:
        raise ValueError(f"no slicing of {tokens} tokens meets max_slice_tokens={max_slice_tokens}, "
                         f"max_slice_seconds={max_slice_seconds}, lengths={lengths} on a {granularity}-token grid")
    states, ppos, pidx = fronts[U]
    makespan = float(states[0, -1])
    slices = []
    pos, idx = U, 0
    while pos > 0:
        prev_pos, prev_idx = int(fronts[pos][1][idx]), int(fronts[pos][2][idx])
        slices.append(cuts[pos] - cuts[prev_pos])
        pos, idx = prev_pos, prev_idx
    return SlicingResult(tuple(reversed(slices)), makespan, largest)


def makespan_lower_bound(stages: Sequence[StageModel], tokens: int, **search) -> float:
    """A bound no slicing's makespan goes below (``search``: ``optimal_slicing``'s grid and caps).

    Stage ``m`` computes every slice, at best in the slicing that minimises its own busy time (the
    exact one-stage search), and cannot start before the stages in front of it have computed some
    first slice, nor end before the stages after it have computed some last one; each of those
    costs at least the cheapest slice at its position. So ``makespan >= max over m of (cheapest
    first slices on stages < m) + (least busy time of stage m) + (cheapest last slices on stages
    > m)``. With equal stages the only slack left is the pipeline's fill and drain: how far the
    best uniform slicing's makespan lies above this bound is all that any slicing can gain.
    """
    cuts = sorted({min(tokens, k) for k in range(search.get("granularity", 1), tokens + 1,
                                                 search.get("granularity", 1))} | {tokens})
    lengths = search.get("lengths")
    allowed = lambda s: lengths is None or s in lengths  # noqa: E731
    firsts = [c for c in cuts if allowed(c)]                         # the first slice ends at c
    lasts = [c for c in [0] + cuts[:-1] if allowed(tokens - c)]      # the last slice starts at c
    if not firsts or not lasts:
        raise ValueError(f"no first or last slice of {tokens} tokens has one of lengths={lengths} on a "
                         f"{search.get('granularity', 1)}-token grid")
    first = [min(st.compute(c, 0) for c in firsts) for st in stages]
    M = len(stages)
    last = [min(st.compute(tokens - c, c) + (st.final(tokens - c) if m == M - 1 else 0.0) for c in lasts)
            for m, st in enumerate(stages)]
    busy = [optimal_slicing([StageModel(st.compute, final=st.final if m == M - 1 else _zero)],
                            tokens, **search).makespan for m, st in enumerate(stages)]
    return max(sum(first[:m]) + busy[m] + sum(last[m + 1:]) for m in range(M))
