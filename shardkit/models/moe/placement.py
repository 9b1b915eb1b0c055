"""Expert placement and load balancing from routing statistics.

A ``Placement`` says which ranks hold a copy of each expert of one layer (one rank each, or several
for a replicated hot expert; ranks may hold different numbers of experts). Given a layer's routing
(``topk_idx [N, K]``), ``Placement.dest_ranks`` picks the rank that computes each (token, expert)
slot, and ``evaluate`` measures what a placement costs:

- copies per token: distinct ranks a token is sent to (one copy per rank with per-rank dedup),
- max/mean rank load: (token, expert) slots computed per rank, the busiest over the mean,
- remote copies per token: copies to ranks other than the token's own (the bytes on the wire).

Algorithms (each fitted on one text's routing, evaluated on another's):

- ``contiguous``: expert e on rank e * W // E (the default of every EP implementation).
- ``greedy``: experts by falling load, each to the least-loaded rank with a free slot (LPT; equal
  expert counts) -- equalises the expected load.
- ``anti_correlation``: experts whose activations are negatively correlated share a rank (they
  rarely peak together, so per-batch loads stay even): swaps minimising the within-rank sum of
  Pearson correlations, under the load cap.
- ``s_eg`` (co-activation grouping, after "Speculative MoE", Li et al. 2025): experts chosen together
  share a rank, so dedup sends fewer copies: local search over swaps minimising the copies per token
  under a cap on max/mean load.
- ``s_eg`` with ``extra_slots`` > 0: the same search may also move experts (uneven counts per rank)
  and replicate hot ones into the spare slots (as DeepSeek's EPLB replicates hot experts), which
  lets the co-activated groups stay together while the load stays under the cap.

Replica choice (``dest_ranks``): a slot whose expert has several copies goes to a copy on a rank the
token already visits (no extra copy), else to copy number ``token_id mod copies`` (spreads the load).
It is a pure function of the token's top-k ids, computable on the device before the dispatch.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import torch


@dataclasses.dataclass(frozen=True)
class Placement:
    """``replicas[e]``: the ranks holding expert e (ascending, at least one) for ``world`` ranks."""
    world: int
    replicas: tuple[tuple[int, ...], ...]
    name: str = ""

    def __post_init__(self) -> None:
        for e, ranks in enumerate(self.replicas):
            if not ranks or len(set(ranks)) != len(ranks) or any(not 0 <= r < self.world for r in ranks):
                raise ValueError(f"Placement: expert {e} must be on distinct ranks in [0, {self.world}), got {ranks}")

    @property
    def num_experts(self) -> int:
        return len(self.replicas)

    @property
    def replicated(self) -> bool:
        return any(len(r) > 1 for r in self.replicas)

    def rank_experts(self) -> list[list[int]]:
        """Per rank, the experts it holds (ascending ids)."""
        out: list[list[int]] = [[] for _ in range(self.world)]
        for e, ranks in enumerate(self.replicas):
            for r in ranks:
                out[r].append(e)
        return out

    def slots(self) -> list[int]:
        """Experts held per rank (the memory)."""
        return [len(x) for x in self.rank_experts()]

    def expert_rank(self) -> list[int]:
        """The single rank of each expert (for a placement without replicas, e.g. a MoeDispatcher's)."""
        if self.replicated:
            raise ValueError("Placement.expert_rank: the placement replicates experts; use dest_ranks")
        return [r[0] for r in self.replicas]

    def with_name(self, name: str) -> "Placement":
        return dataclasses.replace(self, name=name)

    @classmethod
    def from_expert_rank(cls, expert_rank, world: int, name: str = "") -> "Placement":
        return cls(world, tuple((int(r),) for r in expert_rank), name)

    def dest_ranks(self, topk_idx: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The rank computing each slot, [N, K] int64 (see the module for the replica rule).
        topk_idx [N, K] expert ids (>= 0); token_ids [N] (default 0..N-1) pick among copies.
        No host synchronisation (CUDA-graph capturable once the tables are on the device)."""
        first, has = _tables(self, topk_idx.device)
        ranks = first[topk_idx]
        if not self.replicated:
            return ranks
        n, k = topk_idx.shape
        token_ids = torch.arange(n, device=topk_idx.device) if token_ids is None else token_ids
        single = has[topk_idx].sum(-1) == 1  # [N, K]
        onehot = torch.nn.functional.one_hot(ranks, self.world).bool()
        visited = (onehot & single[..., None]).any(1)  # [N, W]: ranks the token visits already
        for j in range(k):
            cand = has[topk_idx[:, j]]
            shared = cand & visited
            cand = torch.where(shared.any(1, keepdim=True), shared, cand)
            pick = token_ids % cand.sum(1)
            choice = ((cand.cumsum(1) == (pick + 1)[:, None]) & cand).int().argmax(1)
            ranks[:, j] = torch.where(single[:, j], ranks[:, j], choice)
            visited |= torch.nn.functional.one_hot(ranks[:, j], self.world).bool()
        return ranks


_TABLES: dict = {}


def _tables(p: Placement, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first rank of each expert [E], has [E, W] bool) on ``device``, made once per placement."""
    key = (p.world, p.replicas, str(device))
    if key not in _TABLES:
        has = torch.zeros(p.num_experts, p.world, dtype=torch.bool)
        for e, ranks in enumerate(p.replicas):
            has[e, list(ranks)] = True
        _TABLES[key] = (torch.tensor([r[0] for r in p.replicas], device=device), has.to(device))
    return _TABLES[key]


def contiguous(num_experts: int, world: int) -> Placement:
    return Placement.from_expert_rank([e * world // num_experts for e in range(num_experts)], world, "contiguous")


@dataclasses.dataclass
class PlacementMetrics:
    copies_per_token: float
    remote_copies_per_token: float
    max_load_ratio: float
    loads: list[int]


def distinct_per_row(ranks: torch.Tensor) -> torch.Tensor:
    """Number of distinct values in each row of ranks [N, K]."""
    s = ranks.sort(1).values
    return 1 + (s[:, 1:] != s[:, :-1]).sum(1)


def evaluate(placement: Placement, topk_idx: torch.Tensor, src_rank: torch.Tensor | None = None,
             token_ids: torch.Tensor | None = None) -> PlacementMetrics:
    """Copies, remote copies (to ranks other than ``src_rank`` [N], default: none is local) and rank
    loads of one layer's routing ``topk_idx`` [N, K] under ``placement``."""
    ranks = placement.dest_ranks(topk_idx, token_ids)
    loads = torch.bincount(ranks.reshape(-1), minlength=placement.world)
    distinct = distinct_per_row(ranks)
    if src_rank is None:
        remote = distinct
    else:
        remote = distinct - (ranks == src_rank[:, None]).any(1).long()
    return PlacementMetrics(copies_per_token=distinct.float().mean().item(),
                            remote_copies_per_token=remote.float().mean().item(),
                            max_load_ratio=(loads.max() / loads.float().mean()).item(), loads=loads.tolist())


# ---------------------------------------------------------------- algorithms

def expert_loads(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots per expert, float [E]."""
    return torch.bincount(topk_idx.reshape(-1), minlength=num_experts).double()


def greedy(topk_idx: torch.Tensor, num_experts: int, world: int) -> Placement:
    """LPT with equal expert counts: experts by falling load to the least-loaded rank with room."""
    load = expert_loads(topk_idx, num_experts)
    cap = -(-num_experts // world)
    rank_load, rank_count, expert_rank = [0.0] * world, [0] * world, [0] * num_experts
    for e in sorted(range(num_experts), key=lambda e: -float(load[e])):
        r = min((r for r in range(world) if rank_count[r] < cap), key=lambda r: (rank_load[r], r))
        expert_rank[e] = r
        rank_load[r] += float(load[e])
        rank_count[r] += 1
    return Placement.from_expert_rank(expert_rank, world, "greedy")


class _Search:
    """Steepest-descent local search over placements for one layer's fit routing.

    The objective is ``cost(placement, ranks, weights)`` plus a penalty for max/mean load above
    ``cap`` (``penalty`` per unit) on the worst of the token ``chunks`` (default: all tokens as one;
    chunks of different text make the cap hold on text the fit has not seen); moves are swaps of two
    experts between ranks, and with spare slots (``slot_cap`` > E / W) also moving an expert copy to
    another rank and adding (up to ``max_copies`` per expert, at most ``max_replicas`` in all) or
    dropping a replica. Tokens are compressed to their distinct (sorted expert set, token id mod
    lcm(1..max_copies)) rows with multiplicities per chunk: exact for the copies and loads of every
    candidate, and 10-20x fewer rows than tokens."""

    def __init__(self, topk_idx: torch.Tensor, num_experts: int, world: int, cap: float, slot_cap: int,
                 cost, max_replicas: int, max_copies: int, chunks: torch.Tensor | None = None) -> None:
        n, k = topk_idx.shape
        period = math.lcm(*range(1, max_copies + 1)) if max_replicas else 1
        rows = torch.cat([topk_idx.sort(1).values, (torch.arange(n) % period)[:, None]], 1)
        unique, inverse = rows.unique(dim=0, return_inverse=True)
        chunks = torch.zeros(n, dtype=torch.long) if chunks is None else chunks.long()
        self.chunk_weight = torch.zeros(int(chunks.max()) + 1, unique.shape[0], dtype=torch.float64)
        self.chunk_weight.index_put_((chunks, inverse), torch.ones(n, dtype=torch.float64), accumulate=True)
        self.idx, self.token, self.weight = unique[:, :k].contiguous(), unique[:, k], self.chunk_weight.sum(0)
        self.E, self.W, self.cap, self.slot_cap = num_experts, world, cap, slot_cap
        self.cost, self.max_replicas, self.max_copies = cost, max_replicas, max_copies

    def score(self, p: Placement, penalty: float) -> float:
        ranks = p.dest_ranks(self.idx, self.token)
        per_row = torch.nn.functional.one_hot(ranks, self.W).sum(1).double()  # [R, W] slots per rank
        loads = self.chunk_weight @ per_row  # [chunks, W]
        ratio = float((loads.max(1).values / loads.mean(1)).max())
        return self.cost(p, ranks, self.weight) + penalty * max(0.0, ratio - self.cap)

    def neighbours(self, p: Placement):
        reps = [list(r) for r in p.replicas]
        slots = p.slots()
        extra = sum(len(r) for r in reps) - self.E
        for a, b in itertools.combinations(range(self.E), 2):
            for ra in reps[a]:
                for rb in reps[b]:
                    if ra != rb and rb not in reps[a] and ra not in reps[b]:
                        yield self._replace(reps, {a: (ra, rb), b: (rb, ra)})
        if self.slot_cap * self.W <= self.E:
            return
        for e in range(self.E):
            for r in range(self.W):
                if r in reps[e] or slots[r] >= self.slot_cap:
                    continue
                for src in reps[e]:  # move a copy
                    yield self._replace(reps, {e: (src, r)})
                if extra < self.max_replicas and len(reps[e]) < self.max_copies:  # add a replica
                    yield Placement(self.W, tuple(tuple(sorted(x + [r])) if i == e else tuple(x)
                                                  for i, x in enumerate(reps)))
            if len(reps[e]) > 1:  # drop a replica
                for r in reps[e]:
                    yield Placement(self.W, tuple(tuple(x2 for x2 in x if not (i == e and x2 == r))
                                                  for i, x in enumerate(reps)))

    def _replace(self, reps: list[list[int]], moves: dict[int, tuple[int, int]]) -> Placement:
        out = []
        for e, x in enumerate(reps):
            if e in moves:
                old, new = moves[e]
                x = [new if r == old else r for r in x]
            out.append(tuple(sorted(x)))
        return Placement(self.W, tuple(out))

    def run(self, starts: list[Placement], max_steps: int = 200) -> Placement:
        """The best local optimum (steepest descent) reached from any of ``starts``: first with a mild
        load penalty (10 per unit over the cap: a step that fixes much of the load at a small cost in
        copies, e.g. a hot expert's copy, is not passed over for one that fixes a little more load
        and fills the slot the copy needs), then with a strict one (100) that restores the cap."""
        found = []
        for best in starts:
            for penalty in (10.0, 100.0):
                best_score = self.score(best, penalty)
                for _ in range(max_steps):
                    step = min(((self.score(q, penalty), q) for q in self.neighbours(best)), key=lambda sq: sq[0],
                               default=None)
                    if step is None or step[0] >= best_score - 1e-9:
                        break
                    best_score, best = step
            found.append((best_score, best))
        return min(found, key=lambda sp: sp[0])[1]


def _copies_cost(p: Placement, ranks: torch.Tensor, weight: torch.Tensor) -> float:
    return float((distinct_per_row(ranks).double() * weight).sum() / weight.sum())


def s_eg(topk_idx: torch.Tensor, num_experts: int, world: int, cap: float = 1.15, extra_slots: int = 0,
         max_replicas: int | None = None, max_copies: int = 2, starts: list[Placement] | None = None,
         chunks: torch.Tensor | None = None) -> Placement:
    """Co-activation grouping: minimise copies per token on ``topk_idx`` with max/mean load <= ``cap``.
    ``extra_slots``: expert slots per rank beyond E / W (uneven counts and replicas of hot experts:
    at most ``max_replicas`` in all, default world * extra_slots, and ``max_copies`` copies of one
    expert). ``starts``: where the search starts (default: greedy and contiguous; with extra slots,
    the best placement without them). ``chunks`` [N]: the cap must hold on each chunk of tokens
    (e.g. parts of the fit text), not only on all of them."""
    slot_cap = -(-num_experts // world) + extra_slots
    search = _Search(topk_idx, num_experts, world, cap, slot_cap, _copies_cost,
                     world * extra_slots if max_replicas is None else max_replicas, max_copies, chunks)
    name = "s_eg" if extra_slots == 0 else f"s_eg_rep{extra_slots}"
    if starts is None:
        starts = [greedy(topk_idx, num_experts, world), contiguous(num_experts, world)]
        if extra_slots:  # replicas extend the best grouping without them
            starts = [s_eg(topk_idx, num_experts, world, cap, starts=starts, chunks=chunks)]
    return search.run(starts).with_name(name)


def anti_correlation(topk_idx: torch.Tensor, num_experts: int, world: int, cap: float = 1.15,
                     chunks: torch.Tensor | None = None) -> Placement:
    """Experts with negatively correlated activations share a rank: swaps minimising the sum over
    ranks of the pairwise Pearson correlations of their experts' activation indicators, load <= cap
    (on each of ``chunks``, as ``s_eg``)."""
    active = torch.zeros(topk_idx.shape[0], num_experts, dtype=torch.float64)
    active.scatter_(1, topk_idx, 1.0)
    corr = torch.nan_to_num(torch.corrcoef(active.t()), nan=0.0)
    corr.fill_diagonal_(0.0)

    def cost(p: Placement, ranks: torch.Tensor, weight: torch.Tensor) -> float:
        return sum(float(corr[x][:, x].sum()) / 2 for x in (torch.tensor(es) for es in p.rank_experts()))

    search = _Search(topk_idx, num_experts, world, cap, -(-num_experts // world), cost, 0, 1, chunks)
    return search.run([greedy(topk_idx, num_experts, world)]).with_name("anti_correlation")
