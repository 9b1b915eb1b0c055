"""Measured costs for the pipeline planner: one decoder layer and the LM head on a device, as a
function of the slice length ``s`` and the tokens ``p`` cached before it, and the link between two
stages as a function of the bytes sent.

A layer's time is fitted to ``t(s, p) = a + b s + c s p + d s^2`` (seconds): the projections and
FFN grow with ``s``, attention with ``s p`` (every new query reads every cached key) and ``s^2``
(the causal block of the slice itself); ``a`` absorbs fixed per-call costs and, fitted over the
slice lengths the planner uses, the lower efficiency of short slices. The fit weights every sample
by ``1 / t`` (it minimises relative error) and keeps the coefficients >= 0. A link is fitted to
``t(n) = latency + n / bandwidth``.

That smooth fit misses what depends on the exact slice length: GEMM tiles and waves (on an H200
a slice of 1536 or 3584 tokens ran 10-18% slower than the fit through 1024, 2048, 4096 said, one of
2048 or 4096 did not). So ``ComputeCost.fit`` also keeps, per profiled slice length ``s``, its own
line in the prefix, ``t(s, p) = A_s + C_s p`` (the ``lengths`` table), and a cost called at a
profiled length uses that line; the planner slices with profiled lengths only
(``optimal_slicing(lengths=...)``), so its costs are interpolated in ``p`` only, never in ``s``.

Samples are timed the way the runtime runs: the same ``LlamaStage`` code with random weights of
the model's shape, on the device (under whatever load shares it: a co-running job on the device
is part of what the profile measures), and the same transport (``PipelineRuntime``'s links, so a
host-memory link includes its device-host copies). CUDA times by events, CPU times by the wall
clock; the median of ``reps`` after one warm-up. A repetition calls the layer back to back for at
least ``min_seconds`` as the runtime does (16 layers per slice, slice after slice): a lone call
on an idle GPU shows the host's launch latency that a full queue hides, and a GPU under a
sustained load clocks lower than in a short burst; a device time-sliced with another process
needs many of its time slices per sample. ``save_profile`` / ``load_profile`` keep them as JSON.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .llama import LlamaConfig, LlamaStage, random_weights
from .runtime import PipelineRuntime

__all__ = ["ComputeCost", "LinkCost", "time_call", "profile_compute", "profile_links", "save_profile",
           "load_profile"]


def _fit_nonnegative(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Coefficients >= 0 of ``features @ coef ~ seconds`` in least relative squares: a negative
    coefficient is dropped and the rest refitted."""
    if len(seconds) < 1 or np.any(~(seconds > 0)):
        raise ValueError(f"fit needs samples with seconds > 0, got {seconds.tolist()[:4]}")
    scaled = features / seconds[:, None]
    active = [i for i in range(features.shape[1]) if np.any(scaled[:, i] > 0)]
    while True:
        coef, *_ = np.linalg.lstsq(scaled[:, active], np.ones_like(seconds), rcond=None)
        if np.all(coef >= 0) or len(active) == 1:
            break
        active = [i for i, c in zip(active, coef) if c >= 0] or [active[int(np.argmax(coef))]]
    full = np.zeros(features.shape[1])
    full[active] = np.maximum(coef, 0.0)
    return full


@dataclass(frozen=True)
class ComputeCost:
    """Seconds of one call for ``s`` new tokens after ``p`` cached: ``A_s + C_s p`` where ``lengths``
    holds a row ``(s, A_s, C_s)`` for this ``s``, else ``a + b s + c s p + d s^2``."""

    a: float
    b: float
    c: float = 0.0
    d: float = 0.0
    lengths: Tuple[Tuple[int, float, float], ...] = ()

    def __post_init__(self) -> None:  # JSON gives lists back: keep the table hashable, looked up by s
        object.__setattr__(self, "lengths", tuple((int(s), float(A), float(C)) for s, A, C in self.lengths))
        object.__setattr__(self, "_by_length", {s: (A, C) for s, A, C in self.lengths})

    def __call__(self, s: int, p: int = 0) -> float:
        row = self._by_length.get(s)
        if row is not None:
            return row[0] + row[1] * p
        return self.a + self.b * s + self.c * s * p + self.d * s * s

    def scaled(self, factor: float) -> "ComputeCost":
        """This cost times ``factor`` (> 0) at every ``(s, p)``: a calibration (``plan.run_scales``)."""
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        return ComputeCost(self.a * factor, self.b * factor, self.c * factor, self.d * factor,
                           tuple((s, A * factor, C * factor) for s, A, C in self.lengths))

    @classmethod
    def fit(cls, samples: Sequence[Tuple[int, int, float]]) -> "ComputeCost":
        """Least relative squares over ``(s, p, seconds)`` samples, coefficients >= 0: the smooth
        model over all samples, and a line in ``p`` for every ``s`` sampled at two or more ``p``."""
        x = np.array(samples, dtype=np.float64).reshape(-1, 3)
        s, p = x[:, 0], x[:, 1]
        smooth = _fit_nonnegative(np.stack([np.ones_like(s), s, s * p, s * s], axis=1), x[:, 2])
        rows = []
        for length in sorted(set(s.tolist())):
            at = s == length
            if len(set(p[at].tolist())) >= 2:
                A, C = _fit_nonnegative(np.stack([np.ones(int(at.sum())), p[at]], axis=1), x[at, 2])
                rows.append((int(length), float(A), float(C)))
        return cls(*map(float, smooth), lengths=tuple(rows))

    def max_relative_error(self, samples: Sequence[Tuple[int, int, float]]) -> float:
        """Largest ``|model - measured| / measured`` over the samples."""
        return max(abs(self(s, p) - t) / t for s, p, t in samples)


@dataclass(frozen=True)
class LinkCost:
    """Seconds to move ``n`` bytes to the next stage: ``latency + n / bytes_per_s``."""

    latency: float
    bytes_per_s: float

    def __call__(self, nbytes: int) -> float:
        return self.latency + nbytes / self.bytes_per_s

    @classmethod
    def fit(cls, samples: Sequence[Tuple[int, float]]) -> "LinkCost":
        """``(bytes, seconds)`` samples; least relative squares, both terms >= 0 (samples that do
        not grow with size give ``bytes_per_s = inf``: the link is latency-bound over their range)."""
        x = np.array(samples, dtype=np.float64).reshape(-1, 2)
        latency, per_byte = _fit_nonnegative(np.stack([np.ones(len(x)), x[:, 0]], axis=1), x[:, 1])
        return cls(float(latency), float(1.0 / per_byte) if per_byte > 0 else float("inf"))


def time_call(fn: Callable[[], object], device: torch.device, reps: int = 3, min_seconds: float = 0.0
              ) -> List[float]:
    """Seconds per call of ``fn`` in each of ``reps`` repetitions, after one warm-up call (CUDA events
    on CUDA). A repetition calls ``fn`` back to back as many times as it takes to last
    ``min_seconds`` (the module docstring says why; on a shared CPU a call of a few milliseconds
    also runs in the scheduler's burst for a thread that just woke up, faster than the same work
    sustained over seconds, as in a prefill)."""
    def once() -> float:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()  # warm-up: kernels compile, execution plans are built, memory is allocated
    calls = max(1, int(min_seconds / max(once(), 1e-9) + 0.999)) if min_seconds > 0 else 1
    out = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e-3 / calls)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - t0) / calls)
    return out


def profile_compute(config: LlamaConfig, *, device: torch.device | str, dtype: torch.dtype,
                    slice_lengths: Sequence[int], prefixes: Sequence[int], reps: int = 3, batch: int = 1,
                    seed: int = 0, min_seconds: float = 0.0, attention: str = "auto"
                    ) -> Dict[str, List[Tuple[int, int, float]]]:
    """Median seconds of one decoder layer for every ``(s, p)`` in ``slice_lengths x prefixes`` and of
    the final norm + LM head for every ``s``, on ``device`` with random weights of ``config``'s shape.

    Returns ``{"layer": [(s, p, seconds), ...], "head": [(s, 0, seconds), ...]}``
    (``ComputeCost.fit`` turns each into a model). ``min_seconds``: see ``time_call``; ``attention``:
    the stage's attention kernel (``LlamaStage``), as in the run the profile predicts.
    """
    device = torch.device(device)
    if not slice_lengths or not prefixes or min(slice_lengths) < 1 or min(prefixes) < 0:
        raise ValueError(f"slice_lengths (>= 1) and prefixes (>= 0) must be non-empty, got "
                         f"{list(slice_lengths)}, {list(prefixes)}")
    max_tokens = max(slice_lengths) + max(prefixes)
    layer = LlamaStage(config, random_weights(config, range(1), False, False, seed=seed, device=device, dtype=dtype),
                       range(1), first=False, last=False, device=device, dtype=dtype, max_tokens=max_tokens,
                       batch=batch, attention=attention)
    head = LlamaStage(config, random_weights(config, range(0), False, True, seed=seed, device=device, dtype=dtype),
                      range(0), first=False, last=True, device=device, dtype=dtype, max_tokens=max(slice_lengths),
                      batch=batch)
    out: Dict[str, List[Tuple[int, int, float]]] = {"layer": [], "head": []}
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for s in slice_lengths:
        x = torch.randn((batch, s, config.hidden), generator=gen, device=device).to(dtype)
        for p in prefixes:
            def call(p: int = p, x: torch.Tensor = x) -> None:
                layer.length = p  # the cache's contents do not change the time; its length does
                layer.forward(x, p)
            out["layer"].append((s, p, statistics.median(time_call(call, device, reps, min_seconds))))
        out["head"].append((s, 0, statistics.median(time_call(lambda x=x: head.forward(x, 0), device, reps,
                                                                           min_seconds))))
    return out


def profile_links(runtime: PipelineRuntime, token_counts: Sequence[int], reps: int = 5
                  ) -> List[List[Tuple[int, float]]]:
    """``(bytes, seconds)`` of one transfer of ``[B, s, hidden]`` activations for each ``s`` in
    ``token_counts``, over every link of the pipeline (``result[m]``: stage ``m`` to ``m + 1``).

    Collective (every rank calls it; every rank gets the whole list). One boundary at a time, stage
    ``m`` sends to ``m + 1``, which sends it back, through the runtime's own ``send`` /
    ``post_recv`` / ``finish_recv``; one way is half the median round trip after one warm-up.
    """
    st, me = runtime.stage, runtime.index
    mine: List[List[Tuple[int, float]]] = []
    for b in range(runtime.stages - 1):
        if me not in (b, b + 1):
            continue
        peer = b + 1 if me == b else b
        samples = []
        for s in token_counts:
            shape = (st.batch, s, st.config.hidden)
            t = torch.zeros(shape, dtype=st.dtype, device=st.device)
            times = []
            for rep in range(reps + 1):
                if st.device.type == "cuda":
                    torch.cuda.synchronize(st.device)
                t0 = time.perf_counter()
                if me == b:
                    work, _ = runtime.send(t, peer)
                    work.wait()
                    runtime.finish_recv(runtime.post_recv(shape, st.dtype, peer))
                else:
                    work, _ = runtime.send(runtime.finish_recv(runtime.post_recv(shape, st.dtype, peer)), peer)
                    work.wait()
                if st.device.type == "cuda":
                    torch.cuda.synchronize(st.device)
                if rep:  # the first round trip sets up the connection
                    times.append((time.perf_counter() - t0) / 2)
            samples.append((t.numel() * t.element_size(), statistics.median(times)))
        if me == b:
            mine.append(samples)
    gathered: List[list] = [None] * runtime.stages  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine, group=runtime.group)
    return [gathered[b][0] for b in range(runtime.stages - 1)]


def save_profile(path: str, profile: dict) -> None:
    """Write a profile (any JSON-able dict of samples and fitted costs) to ``path``."""
    def plain(v):
        if isinstance(v, (ComputeCost, LinkCost)):
            return {"type": type(v).__name__, **asdict(v)}
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    with open(path, "w") as f:
        json.dump(plain(profile), f, indent=1)
        f.write("\n")


def load_profile(path: str) -> dict:
    """Read a profile written by ``save_profile`` (fitted costs come back as their classes)."""
    def typed(v):
        if isinstance(v, dict):
            kind = v.get("type")
            if kind in ("ComputeCost", "LinkCost"):
                cls = ComputeCost if kind == "ComputeCost" else LinkCost
                return cls(**{k: x for k, x in v.items() if k != "type"})
            return {k: typed(x) for k, x in v.items()}
        if isinstance(v, list):
            return [typed(x) for x in v]
        return v
    with open(path) as f:
        return typed(json.load(f))
