"""The NCCL transport of the MoE dispatcher: ``all_to_all_single`` through the process group (NCCL on
GPUs, gloo on CPU worlds), for groups whose ranks cannot share peer memory (across nodes, PCIe
without P2P). Same API, same dedup (a token travels once to each rank holding one of its experts),
same row order and fp32 reduction order as the peer-memory kernels, in plain torch.

A dispatch: the layout in torch; one ``all_gather`` of every rank's counts row (the size exchange,
carrying the input-error flags too), read on the host; rows and metadata sent with two
``all_to_all_single`` of exactly the counted sizes; the expert-major order built on the receiver
(stable: by local expert, then row, then top-k slot). A combine: one ``all_gather`` of flags (so that
a rank that rejects its input makes every rank fail instead of leaving them in the all-to-all),
the weighted reduction over local slots, the rows back with one ``all_to_all_single``, and the sum
over ranks in rank order on the token's rank. Tensors cross gloo as bytes (it has no bf16/fp8).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ...errors import CollectiveError
from ...kernels.moe.dispatch import E4M3_MAX
from ...kernels.moe.workspace import FLAG_BAD_IDS, FLAG_BAD_INPUT, SCALE_GROUP
from .config import MoeConfig, MoeHandle


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, hidden] -> (e4m3 [N, hidden], fp32 scales [N, ceil(hidden / 128)]): each group of 128
    channels divided by amax / 448 (the dispatch kernel's rule)."""
    n, hidden = x.shape
    groups = -(-hidden // SCALE_GROUP)
    padded = torch.nn.functional.pad(x.float(), (0, groups * SCALE_GROUP - hidden)).view(n, groups, SCALE_GROUP)
    scales = padded.abs().amax(-1).clamp(min=1e-12) / E4M3_MAX
    q = (padded / scales[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(n, groups * SCALE_GROUP)[:, :hidden].contiguous(), scales


class NcclTransport:
    """Dispatch/combine with ``all_to_all_single`` (see the module); exact mode only."""

    name = "nccl"

    def __init__(self, cfg: MoeConfig, group: dist.ProcessGroup, rank: int, device: torch.device) -> None:
        self.cfg, self.group, self.rank, self.device = cfg, group, rank, device
        self.expert_rank = torch.tensor(cfg.expert_rank, dtype=torch.long, device=device)
        self.expert_local = torch.tensor(cfg.expert_local, dtype=torch.long, device=device)
        self.n_local = len(cfg.local_experts[rank])
        self.error: str | None = None
        self._sent: tuple | None = None  # the last dispatch's (token order, rows per destination, rows per source)

    # ------------------------------------------------------------------ errors
    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise CollectiveError(self.error)

    def _fail(self, what: str) -> None:
        self.error = (f"shardkit MoE dispatch (NCCL transport) failed on rank {self.rank}: {what}. This dispatcher "
                      f"is unusable now. Create a new MoeDispatcher.")
        raise CollectiveError(self.error)

    def _combine_flags(self, rejected: bool) -> None:
        """Every rank's 'I rejected my combine input' flag; fail if any is set (all ranks together)."""
        flags = [torch.zeros(1, dtype=torch.int32, device=self.device) for _ in range(self.cfg.world)]
        dist.all_gather(flags, torch.tensor([int(rejected)], dtype=torch.int32, device=self.device), group=self.group)
        culprits = [r for r, f in enumerate(flags) if f.item()]
        if culprits:
            self._fail(f"rank(s) {culprits} rejected their combine input (see the error raised there)")

    def _exchange_counts(self, tokens: int, flags: int, per_rank: torch.Tensor,
                         per_expert: torch.Tensor) -> torch.Tensor:
        """All ranks' counts rows [W, 4 + W + E] on the host (the size exchange)."""
        cfg = self.cfg
        row = torch.cat([torch.tensor([tokens, flags, 0, 0], device=self.device), per_rank.to(self.device),
                         per_expert.to(self.device)]).to(torch.int32)
        rows = [torch.empty_like(row) for _ in range(cfg.world)]
        dist.all_gather(rows, row, group=self.group)
        rows = torch.stack(rows).cpu()
        ranks = lambda bit: [r for r in range(cfg.world) if rows[r, 1] & bit]  # noqa: E731
        if ranks(FLAG_BAD_INPUT):
            self._fail(f"rank(s) {ranks(FLAG_BAD_INPUT)} rejected their input to dispatch (see the error raised there)")
        if ranks(FLAG_BAD_IDS):
            self._fail(f"rank(s) {ranks(FLAG_BAD_IDS)} passed expert ids outside [-1, {cfg.num_experts}) in topk_idx")
        wanted = rows[:, 4:4 + cfg.world].sum(0)
        if (wanted > cfg.recv_rows).any():
            over = [r for r in range(cfg.world) if wanted[r] > cfg.recv_rows]
            self._fail(f"rank(s) {over} would receive more rows than max_recv_tokens={cfg.recv_rows} "
                       f"(up to {int(wanted.max())})")
        return rows

    def poison_round(self) -> None:
        """This rank rejected its dispatch input: exchange counts with the BAD_INPUT flag (peers fail)."""
        zeros = torch.zeros(self.cfg.world + self.cfg.num_experts, dtype=torch.int32)
        try:
            self._exchange_counts(0, FLAG_BAD_INPUT, zeros[:self.cfg.world], zeros[self.cfg.world:])
        except CollectiveError:
            pass  # the caller raises the reason

    def poison_combine(self) -> None:
        """This rank rejected its combine input: the peers fail at the combine's flag exchange."""
        try:
            self._combine_flags(rejected=True)
        except CollectiveError:
            pass  # the caller raises the reason

    # ------------------------------------------------------------------ a round
    def _alltoall(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Rows of ``send`` (any dtype, [n, ...]) to the ranks, ``send_splits[r]`` to rank r, as bytes."""
        row_bytes = send.element_size() * math.prod(send.shape[1:])
        out = torch.empty(sum(recv_splits), row_bytes, dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(out, send.contiguous().view(torch.uint8).view(send.shape[0], row_bytes), recv_splits,
                               send_splits, group=self.group)
        return out

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 round_id: int) -> tuple[torch.Tensor, MoeHandle]:
        cfg, w, k, me = self.cfg, self.cfg.world, self.cfg.topk, self.rank
        self.raise_if_failed()
        ids = topk_idx.long()
        valid = (ids >= 0) & (ids < cfg.num_experts)
        bad = bool(((ids < -1) | (ids >= cfg.num_experts)).any())
        safe = torch.where(valid, ids, 0)
        dest = torch.where(valid, self.expert_rank[safe], -1)
        goes = (dest[:, :, None] == torch.arange(w, device=self.device)).any(1)  # [T, W]: once per rank
        per_expert = torch.zeros(cfg.num_experts, dtype=torch.int32, device=self.device)
        per_expert.index_add_(0, safe[valid], torch.ones_like(safe[valid], dtype=torch.int32))
        counts = self._exchange_counts(x.shape[0], FLAG_BAD_IDS if bad else 0, goes.sum(0), per_expert)
        per_dest = counts[me, 4:4 + w].tolist()
        per_src = counts[:, 4 + me].tolist()

        tokens = torch.cat([goes[:, r].nonzero().flatten() for r in range(w)])  # by destination, in token order
        to = torch.repeat_interleave(torch.arange(w, device=self.device), torch.tensor(per_dest, device=self.device))
        here = dest[tokens] == to[:, None]  # [n, K] slots whose expert lives on the row's destination
        local = torch.where(here, self.expert_local[safe[tokens]], -1).to(torch.int32)
        weights = topk_weights[tokens].float()
        meta = [tokens[:, None].to(torch.int32), local, weights.view(torch.int32)]
        rows = x[tokens]
        scales = None
        if cfg.fp8:
            rows, scales = quantize_e4m3(rows)
            meta.append(scales.view(torch.int32))
        recv_rows = self._alltoall(rows, per_dest, per_src)
        recv_meta = self._alltoall(torch.cat(meta, 1), per_dest, per_src).view(torch.int32)
        n = recv_meta.shape[0]
        recv_x = recv_rows.view(torch.float8_e4m3fn if cfg.fp8 else cfg.dtype).view(n, cfg.hidden)
        src_token = recv_meta[:, 0].contiguous()
        local_expert = recv_meta[:, 1:1 + k].contiguous()
        recv_weights = recv_meta[:, 1 + k:1 + 2 * k].contiguous().view(torch.float32)
        recv_scales = recv_meta[:, 1 + 2 * k:].contiguous().view(torch.float32) if cfg.fp8 else None
        expert_row, expert_index, offsets, per_local = self._expert_major(local_expert)
        src_counts = torch.tensor(per_src, dtype=torch.int32, device=self.device)
        self._sent = (tokens, per_dest, per_src)
        handle = MoeHandle(
            round=round_id, tokens=x.shape[0], hidden=cfg.hidden, dtype=cfg.dtype,
            src_rank=torch.repeat_interleave(torch.arange(w, dtype=torch.int32, device=self.device), src_counts.long()),
            src_token=src_token, local_expert=local_expert, weights=recv_weights, expert_row=expert_row,
            expert_index=expert_index, expert_offsets=offsets, expert_counts=per_local, recv_counts=src_counts,
            recv_offsets=(torch.cumsum(src_counts, 0) - src_counts).to(torch.int32),
            recv_info=torch.tensor([n, expert_index.numel()], dtype=torch.int32, device=self.device),
            scales=recv_scales, num_recv=n, num_expert_rows=expert_index.numel())
        return recv_x, handle

    def _expert_major(self, local_expert: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The expert-major order of the received (row, slot) pairs: by local expert, then row, then slot,
        each expert's block padded to ``align`` rows. Returns (expert_row [N, K], expert_index [X],
        offsets [L + 1], counts [L])."""
        align, n_local = self.cfg.align, self.n_local
        flat = local_expert.flatten().long()
        used = flat >= 0
        per_local = torch.zeros(n_local, dtype=torch.long, device=self.device)
        per_local.index_add_(0, flat[used], torch.ones_like(flat[used]))
        padded = (per_local + align - 1) // align * align
        offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=self.device), torch.cumsum(padded, 0)])
        order = torch.sort(torch.where(used, flat, n_local), stable=True).indices[:int(used.sum())]
        experts = flat[order]
        first = torch.cumsum(per_local, 0) - per_local  # where each expert's pairs start in ``order``
        rows = offsets[experts] + torch.arange(order.numel(), device=self.device) - first[experts]
        expert_row = torch.full_like(flat, -1)
        expert_row[order] = rows
        expert_index = torch.full((int(offsets[-1]),), -1, dtype=torch.int32, device=self.device)
        expert_index[rows] = (order // self.cfg.topk).to(torch.int32)
        return (expert_row.view(local_expert.shape).to(torch.int32), expert_index, offsets.to(torch.int32),
                per_local.to(torch.int32))

    def combine(self, expert_out: torch.Tensor, handle: MoeHandle, residual: torch.Tensor | None,
                out: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        self.raise_if_failed()
        self._combine_flags(rejected=False)
        tokens, per_dest, per_src = self._sent
        acc = torch.zeros(handle.num_recv, cfg.hidden, dtype=torch.float32, device=self.device)
        for k in range(cfg.topk if expert_out.shape[0] else 0):  # slots in order, as the kernel
            rows = handle.expert_row[:, k].long()
            product = handle.weights[:, k, None] * expert_out[rows.clamp(min=0)].float()
            acc += torch.where(rows[:, None] >= 0, product, 0.0)
        back = self._alltoall(acc.to(cfg.dtype), per_src, per_dest).view(cfg.dtype).view(-1, cfg.hidden)
        total = residual.float() if residual is not None else torch.zeros(handle.tokens, cfg.hidden,
                                                                          device=self.device)
        start = 0
        for n in per_dest:  # ranks in order; each token at most once per rank
            total.index_add_(0, tokens[start:start + n], back[start:start + n].float())
            start += n
        return out.copy_(total)

    def close(self) -> None:
        self._sent = None
