"""The expert-parallel MoE layer: router -> top-k -> dispatch -> local experts (grouped) -> combine.

    moe = EPMoE.from_layers(weights.layers, placements, topk=4, max_tokens=4096)   # on every rank
    model = Mixtral(config, weights, moe)      # attention data-parallel: each rank its own sequences
    logits = model.forward(my_tokens, cache)   # every rank calls forward for every step, 0 tokens too

Each rank runs attention for its own sequences (data parallel) and holds the experts its layer's
``Placement`` gives it; the MoE step sends each token once to every rank holding one of its experts
(shardkit's ``MoeDispatcher``: peer memory, or ``all_to_all_single`` over NCCL / gloo), runs the local
experts over the expert-major rows (one grouped GEMM pair: ``experts.swiglu_experts``), and combines
the weighted outputs back on the token's rank.

Replicated experts (a ``Placement`` with several ranks for an expert) become distinct *virtual
experts* for the dispatcher, one per (expert, rank) copy, numbered rank-major; before the dispatch
each slot's expert id is rewritten to the copy that ``Placement.dest_ranks`` picks. Different layers
may use different placements (one dispatcher per distinct virtual placement).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ...collectives.moe import MoeDispatcher
from .experts import swiglu_experts
from .mixtral import MixtralLayer, Routing, route
from .placement import Placement


class VirtualExperts:
    """A layer's placement as the dispatcher sees it: virtual expert v = a copy of expert
    ``expert_of[v]`` on rank ``rank_of[v]``; rank-major, so each rank's copies are in ascending
    expert order (the dispatcher's local order)."""

    def __init__(self, placement: Placement) -> None:
        pairs = sorted((r, e) for e, ranks in enumerate(placement.replicas) for r in ranks)
        self.placement = placement
        self.rank_of = tuple(r for r, _ in pairs)
        self.expert_of = tuple(e for _, e in pairs)
        self.table = torch.full((placement.num_experts, placement.world), -1, dtype=torch.long)
        for v, (r, e) in enumerate(pairs):
            self.table[e, r] = v
        self._device_table: dict[str, torch.Tensor] = {}

    def local(self, rank: int) -> list[int]:
        """Real expert ids of ``rank``'s copies, in the dispatcher's local order."""
        return [e for r, e in zip(self.rank_of, self.expert_of) if r == rank]

    def ids(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """Real expert ids [T, K] -> virtual ids [T, K] (the copy ``Placement.dest_ranks`` picks)."""
        key = str(topk_idx.device)
        if key not in self._device_table:
            self._device_table[key] = self.table.to(topk_idx.device)
        return self._device_table[key][topk_idx, self.placement.dest_ranks(topk_idx)]


class EPMoE:
    """The MoE step of every layer over expert parallelism (see the module).

    Args:
        gate_up / down: per layer, this rank's expert weights stacked in ``VirtualExperts.local``
            order ([L_l, 2F, hidden], [L_l, hidden, F]) on this rank's device.
        placements: per layer, where the experts live (same on every rank).
        topk: experts per token; max_tokens: the most tokens a rank passes to one step.
        group: the expert-parallel group (default: the world).
        transport / mode / align: of the MoeDispatcher ("nccl" + "exact" on CPU worlds; "auto" +
            "graph" for CUDA-graph decode on GPUs).
        backend: the grouped expert GEMMs ("loop" or "grouped_mm", see experts.py).
    """

    def __init__(self, gate_up: list[torch.Tensor], down: list[torch.Tensor], placements: list[Placement], *,
                 topk: int, max_tokens: int, group: dist.ProcessGroup | None = None, transport: str = "auto",
                 mode: str = "exact", backend: str = "loop", align: int = 1) -> None:
        if not (len(gate_up) == len(down) == len(placements)):
            raise ValueError(f"EPMoE: gate_up, down and placements must have one entry per layer, got "
                             f"{len(gate_up)}, {len(down)}, {len(placements)}")
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.topk, self.backend = topk, backend
        self.virtual = [VirtualExperts(p) for p in placements]
        for i, (p, v, gu) in enumerate(zip(placements, self.virtual, gate_up)):
            if p.world != self.world:
                raise ValueError(f"EPMoE: placement of layer {i} is for {p.world} ranks, the group has {self.world}")
            if gu.shape[0] != len(v.local(self.rank)):
                raise ValueError(f"EPMoE: layer {i}: rank {self.rank} holds {len(v.local(self.rank))} expert copies "
                                 f"under its placement, gate_up has {gu.shape[0]}")
        self.gate_up, self.down = gate_up, down
        hidden, dtype = gate_up[0].shape[2], gate_up[0].dtype
        self.dispatchers: dict[tuple, MoeDispatcher] = {}
        for v in self.virtual:
            if v.rank_of not in self.dispatchers:
                self.dispatchers[v.rank_of] = MoeDispatcher(
                    self.group, num_experts=len(v.rank_of), hidden=hidden, dtype=dtype, max_tokens=max_tokens,
                    topk=topk, placement=list(v.rank_of), mode=mode, transport=transport, align=align,
                    name=f"ep_moe:{self.group.group_name}:{len(self.dispatchers)}:{id(self)}")

    @classmethod
    def from_layers(cls, layers: list[MixtralLayer], placements: list[Placement], *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, group: dist.ProcessGroup | None = None, **kwargs) -> "EPMoE":
        """From full layer weights: keep this rank's expert copies (on ``device``, in ``dtype``)."""
        group = group if group is not None else dist.group.WORLD
        rank = dist.get_rank(group)
        gate_up, down = [], []
        for layer, p in zip(layers, placements):
            local = torch.tensor(VirtualExperts(p).local(rank), dtype=torch.long)
            gate_up.append(layer.gate_up[local].to(device=device, dtype=dtype or layer.gate_up.dtype).contiguous())
            down.append(layer.down[local].to(device=device, dtype=dtype or layer.down.dtype).contiguous())
        return cls(gate_up, down, placements, group=group, **kwargs)

    def __call__(self, layer_index: int, x: torch.Tensor, layer: MixtralLayer) -> tuple[torch.Tensor, Routing]:
        routing = route(x, layer.router, self.topk)
        return self.experts(layer_index, x, routing.topk_idx, routing.topk_weights), routing

    def experts(self, layer_index: int, x: torch.Tensor, topk_idx: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        """The weighted sum of each token's experts, [T, hidden], for a given routing (the dispatch,
        the local grouped experts, the combine)."""
        virtual = self.virtual[layer_index]
        disp = self.dispatchers[virtual.rank_of]
        recv_x, handle = disp.dispatch(x.contiguous(), virtual.ids(topk_idx).contiguous(), topk_weights.contiguous())
        rows = handle.expert_major(recv_x)
        y = swiglu_experts(rows, self.gate_up[layer_index], self.down[layer_index], handle.expert_offsets,
                           self.backend)
        return disp.combine(y.contiguous(), handle)

    def close(self) -> None:
        for d in self.dispatchers.values():
            d.close()
        self.dispatchers = {}
