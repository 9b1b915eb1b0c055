"""Speculative token shuffling at run time: an expert-parallel MoE step whose rows start moving to the
ranks predicted for them before the router has run; mispredictions are corrected by a second, small
dispatch, so the outputs are those of the exact model.

    moe = SpeculativeEPMoE.from_layers(weights.layers, placements, topk=4)
    model = Mixtral(config, weights, moe)         # Mixtral calls moe.after_layer(i, h, next_layer)

Per layer l+1 (attention data parallel, as ``EPMoE``):

1. after layer l (``after_layer``): predict each token's destination ranks at l+1 (``pregate``: layer
   l+1's router on the residual after layer l, its top-k through the placement; see speculative.py
   for its accuracy) and agree on the speculative sizes with the peers (a small all-to-all of counts,
   off the critical path: in a pipelined engine it overlaps layer l+1's attention);
2. the MoE input rows go to their predicted ranks at once (an async all-to-all of pre-agreed sizes)
   while the router runs;
3. after the router: the late rows (ranks a token needs but was not predicted to) and every row's
   local top-k slots (metadata) follow in a second all-to-all -- the only row bytes that wait for the
   router (``stats``: early, late, wasted rows);
4. local experts over the received rows' local slots (grouped), per-row partial sums in fp32, sent
   back for the rows that had a local slot, summed over ranks in rank order on the token's rank.

Plain transport (``all_to_all_single`` on the group: NCCL on GPUs, gloo on CPU worlds), one copy of
a token per destination rank; with ``speculate=False`` every row is late (the same code as a plain
dedup dispatch, the baseline of the latency comparison). Placements without replicas.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .experts import offsets_of, swiglu_experts
from .mixtral import MixtralLayer, Routing, rms_norm, route
from .placement import Placement


@dataclasses.dataclass
class SpeculationStats:
    """Rows sent by this rank (to every rank, itself included) over the calls so far."""
    early_rows: int = 0
    late_rows: int = 0
    wasted_rows: int = 0
    needed_rows: int = 0


class SpeculativeEPMoE:
    """See the module. ``rms_eps``: the model's RMSNorm epsilon (for the pre-gate); ``predictor``:
    ``(layer, h, layer_weights) -> [T, W] bool`` predicted destinations (default ``pregate``)."""

    def __init__(self, gate_up: list[torch.Tensor], down: list[torch.Tensor], placements: list[Placement], *,
                 topk: int, rms_eps: float, group: dist.ProcessGroup | None = None, backend: str = "loop",
                 speculate: bool = True, predictor=None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        for i, p in enumerate(placements):
            if p.replicated or p.world != self.world:
                raise ValueError(f"SpeculativeEPMoE: layer {i}: needs a placement over {self.world} ranks without "
                                 f"replicas, got {p}")
        self.placements, self.topk, self.eps, self.backend = placements, topk, rms_eps, backend
        self.gate_up, self.down, self.speculate = gate_up, down, speculate
        self.predictor = predictor or self.pregate
        self.expert_rank = [torch.tensor(p.expert_rank()) for p in placements]
        self.expert_local = []
        for p in placements:
            local = [0] * p.num_experts
            for experts in p.rank_experts():
                for i, e in enumerate(experts):
                    local[e] = i
            self.expert_local.append(torch.tensor(local))
        self.stats = [SpeculationStats() for _ in placements]
        self._pending: tuple[int, list[torch.Tensor], list[int]] | None = None  # (layer, tokens per rank, recv sizes)

    @classmethod
    def from_layers(cls, layers: list[MixtralLayer], placements: list[Placement], *, device="cpu", dtype=None,
                    group: dist.ProcessGroup | None = None, **kwargs) -> "SpeculativeEPMoE":
        group = group if group is not None else dist.group.WORLD
        rank = dist.get_rank(group)
        gate_up, down = [], []
        for layer, p in zip(layers, placements):
            local = torch.tensor(p.rank_experts()[rank], dtype=torch.long)
            gate_up.append(layer.gate_up[local].to(device=device, dtype=dtype or layer.gate_up.dtype).contiguous())
            down.append(layer.down[local].to(device=device, dtype=dtype or layer.down.dtype).contiguous())
        return cls(gate_up, down, placements, group=group, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _masks(self, layer: int, topk_idx: torch.Tensor) -> torch.Tensor:
        """[T, W] bool: rank r holds one of the token's experts."""
        ranks = self.expert_rank[layer].to(topk_idx.device)[topk_idx]
        return (ranks[:, :, None] == torch.arange(self.world, device=topk_idx.device)).any(1)

    def _sizes(self, send: list[int]) -> list[int]:
        counts = torch.tensor(send, dtype=torch.int64, device=self._device)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        return recv.tolist()

    def _exchange(self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], async_op: bool = False):
        out = send.new_empty((sum(recv_sizes),) + tuple(send.shape[1:]))
        work = dist.all_to_all_single(out, send.contiguous(), recv_sizes, send_sizes, group=self.group,
                                      async_op=async_op)
        return (out, work) if async_op else out

    # ------------------------------------------------------------------ the two hooks
    def after_layer(self, layer: int, h: torch.Tensor, next_layer: MixtralLayer) -> None:
        """Predict layer+1's destinations from the residual ``h`` [T, hidden] and agree on the sizes."""
        self._device = h.device
        if not self.speculate:
            return
        masks = self.predictor(layer + 1, h, next_layer)
        tokens = [masks[:, r].nonzero().squeeze(1) for r in range(self.world)]
        sizes = [t.numel() for t in tokens]
        self._pending = (layer + 1, tokens, self._sizes(sizes))

    def pregate(self, layer: int, h: torch.Tensor, layer_weights: MixtralLayer) -> torch.Tensor:
        """The default prediction of ``layer``'s destinations [T, W] bool: its router on the residual
        ``h`` after the layer before (through its post-attention norm), top-k through the placement."""
        pre = route(rms_norm(h, layer_weights.post_norm, self.eps), layer_weights.router, self.topk)
        return self._masks(layer, pre.topk_idx)

    def __call__(self, layer_index: int, x: torch.Tensor, layer: MixtralLayer) -> tuple[torch.Tensor, Routing]:
        self._device = x.device
        w = self.world
        spec = self._pending if self._pending is not None and self._pending[0] == layer_index else None
        self._pending = None
        if spec is not None:  # 2. rows to the predicted ranks now, while the router runs
            _, spec_tokens, spec_recv = spec
            spec_send = [t.numel() for t in spec_tokens]
            early, early_work = self._exchange(x[torch.cat(spec_tokens)], spec_send, spec_recv, async_op=True)
        else:
            spec_tokens = [x.new_zeros(0, dtype=torch.long)] * w
            spec_send, spec_recv, early, early_work = [0] * w, [0] * w, None, None
        routing = route(x, layer.router, self.topk)
        masks = self._masks(layer_index, routing.topk_idx)
        predicted = torch.zeros_like(masks)
        for r in range(w):
            predicted[spec_tokens[r], r] = True
        late_tokens = [(masks[:, r] & ~predicted[:, r]).nonzero().squeeze(1) for r in range(w)]
        # 3. late rows, and the local slots of every row each rank gets (early rows first, then late)
        order = [torch.cat([spec_tokens[r], late_tokens[r]]) for r in range(w)]
        ranks = self.expert_rank[layer_index].to(x.device)[routing.topk_idx]
        local = torch.where(ranks[None] == torch.arange(w, device=x.device)[:, None, None],
                            self.expert_local[layer_index].to(x.device)[routing.topk_idx][None], -1)  # [W, T, K]
        meta = torch.cat([torch.cat([local[r][order[r]].double(), routing.topk_weights[order[r]].double()], 1)
                          for r in range(w)])
        late_send = [t.numel() for t in late_tokens]
        late_recv = self._sizes(late_send)
        late = self._exchange(x[torch.cat(late_tokens)], late_send, late_recv)
        all_recv = [a + b for a, b in zip(spec_recv, late_recv)]
        meta_recv = self._exchange(meta, [a + b for a, b in zip(spec_send, late_send)], all_recv)
        if early_work is not None:
            early_work.wait()
        st = self.stats[layer_index]
        st.early_rows += sum(spec_send)
        st.late_rows += sum(late_send)
        st.needed_rows += int(masks.sum())
        st.wasted_rows += int((predicted & ~masks).sum())
        # rows in source order: each source's early rows, then its late rows
        parts, e0, l0 = [], 0, 0
        for s in range(w):
            parts += [early[e0:e0 + spec_recv[s]]] if early is not None else []
            parts.append(late[l0:l0 + late_recv[s]])
            e0, l0 = e0 + spec_recv[s], l0 + late_recv[s]
        rows = torch.cat(parts)
        k = self.topk
        slot_expert = meta_recv[:, :k].long()
        partial = self._experts(layer_index, rows, slot_expert, meta_recv[:, k:])
        # 4. partials back for the rows with a local slot (both sides know which: no size exchange)
        needed_here = (slot_expert >= 0).any(1)
        back_send = [int(n) for n in torch.stack([p.sum() for p in needed_here.split(all_recv)]).tolist()] \
            if rows.shape[0] else [0] * w
        back_recv = [int(masks[order[r], r].sum()) for r in range(w)]
        back = self._exchange(partial[needed_here], back_send, back_recv)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = torch.zeros(x.shape, dtype=acc, device=x.device)
        start = 0
        for r in range(w):  # ranks in order
            dest = order[r][masks[order[r], r]]
            out.index_add_(0, dest, back[start:start + dest.numel()])
            start += dest.numel()
        return out.to(x.dtype), routing

    def _experts(self, layer: int, rows: torch.Tensor, slot_expert: torch.Tensor, slot_weight: torch.Tensor,
                 ) -> torch.Tensor:
        """Per received row, sum over its local slots (k order) of weight * expert(row), fp32 [N, hidden]."""
        n, k = slot_expert.shape
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        flat = slot_expert.reshape(-1)
        valid = (flat >= 0).nonzero().squeeze(1)
        order = valid[torch.argsort(flat[valid], stable=True)]
        counts = torch.zeros(self.gate_up[layer].shape[0], dtype=torch.long, device=rows.device)
        counts.scatter_add_(0, flat[order], torch.ones_like(order))
        y = swiglu_experts(rows[order // k], self.gate_up[layer], self.down[layer], offsets_of(counts), self.backend)
        per_slot = torch.zeros(n * k, rows.shape[1], dtype=acc, device=rows.device)
        per_slot[order] = y.to(acc) * slot_weight.reshape(-1)[order, None].to(acc)
        return per_slot.view(n, k, rows.shape[1]).sum(1)
