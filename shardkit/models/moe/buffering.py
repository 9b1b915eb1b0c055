"""Expert buffering (Huang et al., "Towards MoE Deployment", 2023): each layer keeps up to ``slots``
experts in device memory, the rest in (pinned) host memory; an expert the router picks that is not
resident is copied in first, evicting one by the policy:

- ``lifo``: the most recently loaded expert (the proposal of Huang et al.: hot experts loaded early
  stay; a burst of rare ones churns one slot),
- ``lru``: the least recently used one,
- ``fifo``: the oldest load,
- ``belady``: the one needed again furthest in the future (offline optimum; simulator only).

``prefetch`` loads experts predicted for the next call on a side stream (overlapped with the
attention before the MoE step); prefetched experts are protected from eviction until used.

``CacheState`` is the bookkeeping, shared by the simulator (``simulate``: hit rates from a routing
trace) and the runtime (``ExpertBuffer``: real copies into device slots, outputs equal to the
unbuffered layer).
"""
from __future__ import annotations

import dataclasses

import torch

from .experts import offsets_of, swiglu_experts
from .mixtral import MixtralLayer, Routing, group_slots, route, weighted_sum

POLICIES = ("lifo", "lru", "fifo", "belady")


class CacheState:
    """Which expert sits in which of ``slots`` slots, and the eviction policy."""

    def __init__(self, slots: int, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"CacheState: policy must be one of {POLICIES}, got {policy!r}")
        if slots < 1:
            raise ValueError(f"CacheState: slots must be >= 1, got {slots}")
        self.slots, self.policy = slots, policy
        self.slot_of: dict[int, int] = {}
        self.loaded: dict[int, int] = {}  # expert -> clock at load
        self.used: dict[int, int] = {}  # expert -> clock at last use
        self.clock = 0

    def _victim(self, protected: set[int], next_use) -> int:
        cands = [e for e in self.slot_of if e not in protected] or list(self.slot_of)
        if self.policy == "lifo":
            return max(cands, key=lambda e: self.loaded[e])
        if self.policy == "fifo":
            return min(cands, key=lambda e: self.loaded[e])
        if self.policy == "lru":
            return min(cands, key=lambda e: self.used[e])
        if next_use is None:
            raise ValueError("CacheState: the belady policy needs next_use (the simulator's future)")
        return max(cands, key=next_use)

    def _load(self, expert: int, protected: set[int], next_use) -> int:
        self.clock += 1
        if len(self.slot_of) < self.slots:
            slot = len(self.slot_of)
        else:
            victim = self._victim(protected, next_use)
            slot = self.slot_of.pop(victim)
            del self.loaded[victim], self.used[victim]
        self.slot_of[expert] = slot
        self.loaded[expert] = self.used[expert] = self.clock
        return slot

    def access(self, expert: int, protected: set[int] = frozenset(), next_use=None) -> tuple[int, bool]:
        """(slot, hit) for a use of ``expert``; a miss loads it (evicting by the policy, sparing
        ``protected`` where it can)."""
        self.clock += 1
        if expert in self.slot_of:
            self.used[expert] = self.clock
            return self.slot_of[expert], True
        return self._load(expert, set(protected), next_use), False

    def prefetch(self, expert: int, protected: set[int], next_use=None) -> int | None:
        """Load ``expert`` ahead of its use; returns the slot written, or None if it was resident."""
        if expert in self.slot_of:
            return None
        return self._load(expert, protected, next_use)


@dataclasses.dataclass
class BufferStats:
    requests: int = 0
    hits: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.requests)

    @property
    def misses(self) -> int:
        return self.requests - self.hits


def simulate(steps: list[list[int]], slots: int, policy: str,
             predicted: list[list[int]] | None = None) -> BufferStats:
    """One layer's cache over a sequence of calls: ``steps[i]`` the experts call i uses (in order),
    ``predicted[i]`` the experts prefetched before it (or None)."""
    state, stats = CacheState(slots, policy), BufferStats()
    uses = [(i, e) for i, step in enumerate(steps) for e in step]
    next_at: dict[int, list[int]] = {}
    for pos, (_, e) in reversed(list(enumerate(uses))):
        next_at.setdefault(e, []).append(pos)  # descending positions; pop() gives the next one
    prefetched: set[int] = set()

    def next_use(e: int) -> int:
        later = next_at.get(e)
        return later[-1] if later else len(uses) + 1

    for i, step in enumerate(steps):
        if predicted is not None:
            want = set(predicted[i])
            for e in predicted[i][:slots]:
                if state.prefetch(e, want, next_use) is not None:
                    stats.prefetches += 1
                    prefetched.add(e)
        for e in step:
            next_at[e].pop()
            _, hit = state.access(e, set(step), next_use)
            stats.requests += 1
            stats.hits += hit
            if hit and e in prefetched:
                stats.prefetch_hits += 1
            prefetched.discard(e)
    return stats


class ExpertBuffer:
    """The runtime: every layer's experts in host memory (pinned when CUDA is used), ``slots`` device
    slots per layer, copies on a side stream (CUDA), outputs equal to computing with all experts.

    run(layer, x, topk_idx, topk_weights) -> out [T, hidden]   (x [T, hidden] on ``device``)
    prefetch(layer, experts)                                    (copies start now, on the side stream)
    """

    def __init__(self, layers: list[MixtralLayer], slots: int, policy: str = "lifo",
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        host = (lambda t: t.cpu().pin_memory()) if cuda else (lambda t: t.cpu().clone())  # noqa: E731
        self.host = [(host(l.gate_up), host(l.down)) for l in layers]
        e, f2, h = layers[0].gate_up.shape
        self.slots = min(slots, e)
        self.dev = [(torch.empty(self.slots, f2, h, dtype=l.gate_up.dtype, device=self.device),
                     torch.empty(self.slots, h, f2 // 2, dtype=l.down.dtype, device=self.device)) for l in layers]
        self.state = [CacheState(self.slots, policy) for _ in layers]
        self.stats = [BufferStats() for _ in layers]
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.protected: list[set[int]] = [set() for _ in layers]

    def _copy(self, layer: int, expert: int, slot: int) -> None:
        gu, dn = self.dev[layer]
        if self.copy_stream is None:
            gu[slot].copy_(self.host[layer][0][expert])
            dn[slot].copy_(self.host[layer][1][expert])
            return
        # the slot may still be read by queued expert GEMMs: the copy waits for the compute stream
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            gu[slot].copy_(self.host[layer][0][expert], non_blocking=True)
            dn[slot].copy_(self.host[layer][1][expert], non_blocking=True)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        want = set(experts)
        self.protected[layer] = want
        for e in experts[:self.slots]:
            slot = self.state[layer].prefetch(e, want)
            if slot is not None:
                self.stats[layer].prefetches += 1
                self._copy(layer, e, slot)

    def run(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """As ``combine_local`` with all experts, each expert's weights taken from its device slot."""
        order, counts = group_slots(topk_idx, self.host[layer][0].shape[0])
        bounds = offsets_of(counts).tolist()  # host sync: which experts to load
        rows = x[order // topk_idx.shape[1]]
        y = torch.zeros_like(rows)
        gu, dn = self.dev[layer]
        needed = {e for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]}
        for e in sorted(needed):
            slot, hit = self.state[layer].access(e, needed | self.protected[layer])
            self.stats[layer].requests += 1
            self.stats[layer].hits += hit
            if not hit:
                self._copy(layer, e, slot)
            if self.copy_stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            lo, hi = bounds[e], bounds[e + 1]
            y[lo:hi] = swiglu_experts(rows[lo:hi], gu[slot:slot + 1], dn[slot:slot + 1], torch.tensor([0, hi - lo]))
        self.protected[layer] = set()
        return weighted_sum(y, order, topk_idx, topk_weights, x.dtype)


class BufferedMoE:
    """The model's MoE step through an ExpertBuffer (route here, experts from the buffer)."""

    def __init__(self, buffer: ExpertBuffer, topk: int) -> None:
        self.buffer, self.topk = buffer, topk

    def __call__(self, layer_index: int, x: torch.Tensor, layer: MixtralLayer) -> tuple[torch.Tensor, Routing]:
        routing = route(x, layer.router, self.topk)
        return self.buffer.run(layer_index, x, routing.topk_idx, routing.topk_weights), routing
