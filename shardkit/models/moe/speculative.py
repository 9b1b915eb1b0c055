"""Speculative token shuffling (s-TS, after "Speculative MoE", Li et al. 2025): predict the ranks a
token will be sent to at layer l+1 from what is known at layer l, so that the token can start moving
before layer l+1's router has run; a misprediction is corrected by a second, small dispatch.

A token's destination set at a layer is a bitmask over ranks (bit r: one of its top-k experts lives
on rank r, under that layer's placement). Predictors, fitted on one text, evaluated on another:

- ``Top1Table``: key = the token's top-1 expert at layer l; value = the most frequent destination
  set at l+1 among fit tokens with that key (the baseline the issue names).
- ``TopkTable``: key = the token's top-k expert set at layer l (backing off to its top-2 pair and
  then to the top-1 table where the fit text has fewer than ``min_count`` tokens with the key).
- ``PregatePredictor``: layer l+1's router applied to the residual stream after layer l (known one
  attention block early; "pre-gating"), its top-k experts mapped through the placement. No fitting.
- ``ProbePredictor``: multinomial logistic regression over the destination sets, on features known
  at layer l (router log-probabilities, the one-hot top-k, the pre-gate log-probabilities, the pre-gate's
  own destination set and its mass per rank), fitted on the fit text (L-BFGS, L2-regularised).

``coverage`` / ``waste`` say what a prediction means for s-TS: the share of the needed copies that
were sent early, and the copies sent to ranks that did not need them.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import torch

from .placement import Placement
from .trace import RoutingTrace


def rank_sets(placement: Placement, topk_idx: torch.Tensor) -> torch.Tensor:
    """Destination set of each token as a bitmask over ranks, int64 [N]."""
    ranks = placement.dest_ranks(topk_idx)
    return torch.zeros(ranks.shape[0], placement.world, dtype=torch.long).scatter_(1, ranks, 1).mul(
        1 << torch.arange(placement.world)).sum(1)


def _mode(values: list[int]) -> int:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -v))


class Top1Table:
    """top-1 expert at layer l -> most frequent destination set at l+1."""
    name = "top1_table"

    def fit(self, trace: RoutingTrace, layer: int, target: torch.Tensor) -> "Top1Table":
        keys = trace.topk_idx[layer, :, 0].tolist()
        groups: dict[int, list[int]] = defaultdict(list)
        for key, t in zip(keys, target.tolist()):
            groups[key].append(t)
        self.default = _mode(target.tolist())
        self.table = {key: _mode(v) for key, v in groups.items()}
        return self

    def predict(self, trace: RoutingTrace, layer: int) -> torch.Tensor:
        return torch.tensor([self.table.get(k, self.default) for k in trace.topk_idx[layer, :, 0].tolist()])


class TopkTable:
    """top-k expert set at layer l -> most frequent destination set, backing off to the top-2 pair and
    the top-1 expert for keys seen fewer than ``min_count`` times."""
    name = "topk_table"

    def __init__(self, min_count: int = 5) -> None:
        self.min_count = min_count

    @staticmethod
    def _keys(trace: RoutingTrace, layer: int) -> tuple[list, list, list]:
        idx = trace.topk_idx[layer]
        full = [tuple(sorted(r)) for r in idx.tolist()]
        pair = [tuple(sorted(r)) for r in idx[:, :2].tolist()]
        return full, pair, idx[:, 0].tolist()

    def fit(self, trace: RoutingTrace, layer: int, target: torch.Tensor) -> "TopkTable":
        self.tables = []
        for keys in self._keys(trace, layer):
            groups: dict = defaultdict(list)
            for key, t in zip(keys, target.tolist()):
                groups[key].append(t)
            self.tables.append({k: _mode(v) for k, v in groups.items() if len(v) >= self.min_count})
        self.default = _mode(target.tolist())
        return self

    def predict(self, trace: RoutingTrace, layer: int) -> torch.Tensor:
        out = []
        for keys in zip(*self._keys(trace, layer)):
            out.append(next((t[k] for t, k in zip(self.tables, keys) if k in t), self.default))
        return torch.tensor(out)


class PregatePredictor:
    """Layer l+1's router on the residual after layer l: its top-k, through layer l+1's placement."""
    name = "pregate"

    def __init__(self, placement: Placement, topk: int) -> None:
        self.placement, self.topk = placement, topk

    def fit(self, trace: RoutingTrace, layer: int, target: torch.Tensor) -> "PregatePredictor":
        return self

    def predict(self, trace: RoutingTrace, layer: int) -> torch.Tensor:
        return rank_sets(self.placement, trace.pregate[layer].topk(self.topk, -1).indices)


def probe_features(trace: RoutingTrace, layer: int, placement: Placement) -> torch.Tensor:
    """[N, 3E + 2^W + W + 1]: at layer l the log router probs and one-hot top-k; layer l+1's pre-gate
    log probs, the destination set its top-k gives (one-hot) and its probability mass per rank; a
    constant."""
    n, e, k = trace.tokens, trace.num_experts, trace.topk_idx.shape[2]
    onehot = torch.zeros(n, e).scatter_(1, trace.topk_idx[layer], 1.0)
    pre = trace.pregate[layer]
    pre_set = torch.nn.functional.one_hot(rank_sets(placement, pre.topk(k, -1).indices), 1 << placement.world)
    owner = torch.nn.functional.one_hot(placement.dest_ranks(torch.arange(e)[None, :])[0], placement.world).float()
    return torch.cat([trace.probs[layer].clamp(min=1e-6).log(), onehot, pre.clamp(min=1e-6).log(), pre_set.float(),
                      pre @ owner, torch.ones(n, 1)], dim=1).double()


class ProbePredictor:
    """Multinomial logistic regression: features at layer l (``probe_features``) -> destination set
    at l+1 (the pre-gate's own guess is among the features, so the probe learns where to trust it)."""
    name = "probe"

    def __init__(self, placement: Placement, l2: float = 1e-5, steps: int = 200) -> None:
        self.placement, self.classes, self.l2, self.steps = placement, 1 << placement.world, l2, steps

    def fit(self, trace: RoutingTrace, layer: int, target: torch.Tensor) -> "ProbePredictor":
        x = probe_features(trace, layer, self.placement)
        self.weight = torch.zeros(x.shape[1], self.classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight], max_iter=self.steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ self.weight, target) + self.l2 * self.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weight = self.weight.detach()
        return self

    def predict(self, trace: RoutingTrace, layer: int) -> torch.Tensor:
        logits = probe_features(trace, layer, self.placement) @ self.weight
        logits[:, 0] = float("-inf")  # the empty set is never a destination
        return logits.argmax(1)


def popcount(mask: torch.Tensor) -> torch.Tensor:
    bits = torch.zeros_like(mask)
    m = mask.clone()
    while bool((m > 0).any()):
        bits += m & 1
        m = m >> 1
    return bits


def prediction_quality(predicted: torch.Tensor, actual: torch.Tensor,
                       src_rank: torch.Tensor | None = None) -> dict[str, float]:
    """Of predicted and actual destination sets [N] (bitmasks): accuracy (exact set), coverage (needed
    copies sent early / needed copies), waste (copies sent early that were not needed, per token),
    late copies per token (needed, not sent early: the corrective dispatch). With ``src_rank`` [N]
    (the token's own rank, whose copy never crosses a link): remote copies per token (what a dispatch
    without speculation sends after routing) and late remote copies (what s-TS still sends then)."""
    needed = popcount(actual).double()
    hit = popcount(predicted & actual).double()
    out = {"accuracy": (predicted == actual).double().mean().item(),
           "coverage": (hit.sum() / needed.sum()).item(),
           "waste_per_token": popcount(predicted & ~actual).double().mean().item(),
           "late_copies_per_token": (needed - hit).mean().item()}
    if src_rank is not None:
        remote = ~(1 << src_rank)
        out["remote_copies_per_token"] = popcount(actual & remote).double().mean().item()
        out["late_remote_copies_per_token"] = popcount(actual & ~predicted & remote).double().mean().item()
    return out
