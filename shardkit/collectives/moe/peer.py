"""The peer-memory transport of the MoE dispatcher: the Triton kernels of ``shardkit/kernels/moe``
on the dispatcher's own PeerMemory (sized for the worst case of its configuration).

A round, per rank, on one stream: layout + counts exchange (barrier) -> [exact mode: the host reads
the receive sizes] -> dispatch (barrier) -> the user's experts -> combine (per-item flags). The round's
state (the layout's buffers, the counts' offsets, the received rows and metadata in the workspace)
lives until the next dispatch, so the dispatcher runs one round at a time: dispatch, then combine.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ...errors import CollectiveError
from ...kernels.moe.combine import combine_pushers, launch_combine
from ...kernels.moe.counts import launch_counts
from ...kernels.moe.dispatch import launch_dispatch
from ...kernels.moe.launch_config import MoeLaunchConfig
from ...kernels.moe.layout import layout_programs
from ...kernels.moe.workspace import (BAD_EXPERT_ID, BAD_INPUT, RECV_OVERFLOW, MoeWorkspace, RoundBuffers,
                                      moe_workspace)
from ...memory.peer_memory import PeerMemory
from ...memory.protocol import MAX_PROGRAMS, MISMATCH, SIGNAL_BYTES, call_signature, describe_failure
from .config import MoeConfig, MoeHandle


def config_workspace(cfg: MoeConfig) -> MoeWorkspace:
    """The workspace layout of a dispatcher's configuration."""
    return moe_workspace(cfg.world, cfg.max_tokens, cfg.hidden, cfg.topk, cfg.num_experts, cfg.recv_rows,
                         cfg.expert_rows, cfg.dtype, cfg.fp8)


def peer_buffer_bytes(ws: MoeWorkspace) -> int:
    """PeerMemory ``buffer_bytes`` that hold the MoE workspace ``ws``: it uses everything past the signal
    area (staging + both epoch buffers) as one region."""
    return -(-(ws.nbytes - SIGNAL_BYTES) // 3)


class PeerTransport:
    """Dispatch/combine over peer memory for the ranks of ``group`` (see the module)."""

    name = "peer"

    def __init__(self, cfg: MoeConfig, group: dist.ProcessGroup | None, rank: int, backend: str,
                 device: torch.device, timeout_iters: int, timeout_s: float, launch: MoeLaunchConfig,
                 memory: PeerMemory | None = None) -> None:
        """``memory``: the workspace, default a new PeerMemory on ``group``. A given one (e.g. from
        ``PeerMemory.on_one_device``, with ``group`` None) must hold ``peer_buffer_bytes`` per buffer,
        and every rank's must be zeroed here before any rank's first round."""
        self.cfg, self.group, self.rank, self.device = cfg, group, rank, device
        self.timeout_iters, self.timeout_s = timeout_iters, timeout_s
        self.interpret = backend == "cpu"
        ws = self.ws = config_workspace(cfg)
        if memory is None:
            memory = PeerMemory(group, buffer_bytes=peer_buffer_bytes(ws), backend=backend, device=device)
        elif memory.buffer_bytes < peer_buffer_bytes(ws):
            raise ValueError(f"PeerTransport: memory holds {memory.buffer_bytes} bytes per buffer, the MoE workspace "
                             f"needs {peer_buffer_bytes(ws)}")
        self.memory = memory
        # Symmetric memory comes uninitialised: zero it, so that graph mode's rows and indices past the
        # used ones are harmless (an index is always a valid row, a payload byte never NaN). A peer's first
        # counts launch writes into our counts region before any barrier: it must not start before this.
        self.memory.buffer[SIGNAL_BYTES:ws.nbytes].zero_()
        if backend == "cuda":
            torch.cuda.synchronize(device)
        if group is not None:
            dist.barrier(group=group)
        self.launch: MoeLaunchConfig = launch
        self.set_launch(launch)
        self.n_local = len(cfg.local_experts[rank])
        self._no_ids = torch.empty(0, cfg.topk, dtype=torch.int32, device=device)  # a rejected round's routing
        max_chunks = layout_programs(cfg.max_tokens, 1, MAX_PROGRAMS)[0]  # any launch config's chunks
        self.b = RoundBuffers.make(list(cfg.expert_rank), list(cfg.expert_local), [list(e) for e in cfg.local_experts],
                                   cfg.max_tokens, cfg.topk, max_chunks, device)
        self._views(ws)
        self._graph_views = self._handle_views(ws.recv_rows, ws.expert_rows)
        self.error: str | None = None

    def set_launch(self, launch: MoeLaunchConfig) -> None:
        """Use ``launch``'s grids from the next round on (every rank must switch alike: the signatures
        include the grids, so ranks that differ fail the round at its first barrier)."""
        launch.check(self.cfg.fp8)
        self.launch = launch
        fp = self.cfg.fingerprint()
        self.sig_counts = call_signature("moe_counts", *fp)
        self.sig_dispatch = call_signature("moe_dispatch", *fp, launch.programs, launch.dispatch_block_t,
                                           launch.dispatch_block_h, launch.meta_t, launch.dispatch_item_chunks)
        # The combine's item numbering must agree; its grid and roles need not (it waits per item).
        self.sig_combine = call_signature("moe_combine", *fp, launch.combine_block_t, launch.combine_block_h,
                                          launch.combine_item_chunks)
        self.combine_grid = combine_pushers(launch.programs, self.cfg.world, launch.combine_pushers)

    def _views(self, ws) -> None:
        """Tensors over this rank's workspace regions (the received rows and their metadata)."""
        buf = self.memory.buffer
        cfg = self.cfg

        def region(off: int, n: int, dtype: torch.dtype) -> torch.Tensor:
            nbytes = n * torch.empty((), dtype=dtype).element_size()
            return buf[off:off + nbytes].view(dtype)

        r, k = ws.recv_rows, ws.topk
        payload = torch.float8_e4m3fn if cfg.fp8 else cfg.dtype
        self.recv_x = region(ws.recv_x_off, r * ws.row_elems, payload).view(r, ws.row_elems)[:, :cfg.hidden]
        self.scales = (region(ws.recv_scales_off, r * ws.scale_groups, torch.float32).view(r, ws.scale_groups)
                       if cfg.fp8 else None)
        self.src_rank = region(ws.src_rank_off, r, torch.int32)
        self.src_token = region(ws.src_token_off, r, torch.int32)
        self.local_expert = region(ws.local_expert_off, r * k, torch.int32).view(r, k)
        self.weights = region(ws.weight_off, r * k, torch.float32).view(r, k)
        self.expert_row = region(ws.expert_row_off, r * k, torch.int32).view(r, k)
        self.expert_index = region(ws.expert_index_off, ws.expert_rows, torch.int32)

    # ------------------------------------------------------------------ errors
    def raise_if_failed(self) -> None:
        if self.error is None and self.memory.error_record[0] != 0:
            self.error = self._describe(self.memory.error_record)
        if self.error is not None:
            raise CollectiveError(self.error)

    def _describe(self, record) -> str:
        code, wanted, culprits, epoch = (int(v) for v in record)
        ranks = [r for r in range(self.cfg.world) if culprits >> r & 1]
        tail = (" This dispatcher is unusable now; its outputs from this round on are NaN or stale. "
                "Create a new MoeDispatcher.")
        head = f"shardkit MoE dispatch failed on rank {self.rank}: "
        if code == BAD_EXPERT_ID:
            return head + (f"rank(s) {ranks} passed expert ids outside [-1, {self.cfg.num_experts}) in topk_idx "
                           f"(call {epoch}).") + tail
        if code == BAD_INPUT:
            return head + f"rank(s) {ranks} rejected their input to dispatch (see the error raised there)." + tail
        if code == RECV_OVERFLOW:
            return head + (f"rank(s) {ranks} would receive more rows than max_recv_tokens={self.cfg.recv_rows} "
                           f"(up to {wanted}).") + tail
        if code == MISMATCH:
            return head + (f"rank(s) {ranks} made another call than this rank in this round, or had not arrived "
                           f"yet (a rank that rejects its combine input arrives with another signature; call "
                           f"{epoch}).") + tail
        return describe_failure(record, self.rank, self.cfg.world, self.timeout_s).replace(
            "Create a new Communicator", "Create a new MoeDispatcher")

    def poison_round(self) -> None:
        """This rank rejected its dispatch input: take part in the counts exchange with no tokens and the
        BAD_INPUT flag, so that every rank fails this round together instead of waiting for us."""
        self._counts(self._no_ids, input_error=1)
        self._rejected("dispatch")

    def _rejected(self, what: str) -> None:
        """Fail here at once (on GPUs the kernels that record the failure may still be queued)."""
        self.error = self.error or (f"shardkit MoE dispatch failed on rank {self.rank}: this rank rejected its "
                                    f"input to {what}. This dispatcher is unusable now. Create a new MoeDispatcher.")

    # ------------------------------------------------------------------ a round
    def _counts(self, topk_idx: torch.Tensor, input_error: int) -> int:
        """The layout + counts launch; returns the layout's tokens per chunk."""
        mem, lc = self.memory, self.launch
        programs, chunk = layout_programs(topk_idx.shape[0], lc.layout_block_t, lc.layout_programs)
        launch_counts(topk_idx, mem.table, mem.error_record_addr, self.rank, self.cfg.world, self.sig_counts,
                      mem.buffer_bytes, self.timeout_iters, self.b, programs, chunk, lc.layout_block_t, input_error,
                      self.cfg.align, self.ws, lc.layout_warps)
        return chunk

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 round_id: int) -> tuple[torch.Tensor, MoeHandle]:
        cfg, mem, ws, lc = self.cfg, self.memory, self.ws, self.launch
        self.raise_if_failed()
        tokens = x.shape[0]
        chunk = self._counts(topk_idx, 0)
        num_recv = num_expert_rows = None
        if cfg.mode == "exact":
            num_recv, num_expert_rows = self.b.recv_info.tolist()  # the host waits for the sizes here
        if self.interpret or cfg.mode == "exact":
            self.raise_if_failed()
        launch_dispatch(x, topk_idx, topk_weights, self.b, mem.table, mem.error_record_addr, self.rank, cfg.world,
                        self.sig_dispatch, mem.buffer_bytes,
                        self.timeout_iters, chunk, ws, cfg.fp8, lc.programs, lc.dispatch_block_t, lc.dispatch_block_h,
                        lc.meta_t, lc.dispatch_item_chunks, lc.dispatch_warps)
        if self.interpret:
            self.raise_if_failed()
        views = self._graph_views if num_recv is None else self._handle_views(num_recv, num_expert_rows)
        return views["recv_x"], MoeHandle(round=round_id, tokens=tokens, hidden=cfg.hidden, dtype=cfg.dtype,
                                          num_recv=num_recv, num_expert_rows=num_expert_rows,
                                          **{k: v for k, v in views.items() if k != "recv_x"})

    def _handle_views(self, rows: int, expert_rows: int) -> dict:
        """The received rows and the handle's tensors, for ``rows`` rows and ``expert_rows`` expert-major rows
        (graph mode: the capacities, made once: slicing costs microseconds per tensor in eager mode)."""
        return dict(recv_x=self.recv_x[:rows], src_rank=self.src_rank[:rows], src_token=self.src_token[:rows],
                    local_expert=self.local_expert[:rows], weights=self.weights[:rows],
                    expert_row=self.expert_row[:rows], expert_index=self.expert_index[:expert_rows],
                    expert_offsets=self.b.expert_offsets[:self.n_local + 1],
                    expert_counts=self.b.expert_counts[:self.n_local], recv_counts=self.b.recv_counts,
                    recv_offsets=self.b.recv_offsets, recv_info=self.b.recv_info,
                    scales=self.scales[:rows] if self.scales is not None else None)

    def combine(self, expert_out: torch.Tensor, handle: MoeHandle, residual: torch.Tensor | None,
                out: torch.Tensor) -> torch.Tensor:
        self.raise_if_failed()
        self._combine(expert_out, residual, out, poisoned=False)
        if self.interpret:
            self.raise_if_failed()
        return out

    def poison_combine(self) -> None:
        """This rank rejected its combine input: flag every item to the peers with another signature and
        push nothing, so that the peers fail this round instead of waiting for us."""
        dummy = torch.empty(0, self.cfg.hidden, dtype=self.cfg.dtype, device=self.device)
        self._combine(torch.empty(1, self.cfg.hidden, dtype=self.cfg.dtype, device=self.device), None, dummy,
                      poisoned=True)
        self._rejected("combine")

    def _combine(self, expert_out: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor,
                 poisoned: bool) -> None:
        mem, lc = self.memory, self.launch
        launch_combine(expert_out, residual, out, self.b.mask, self.b.src_tokens, mem.table, mem.error_record_addr,
                       self.rank, self.cfg.world, self.sig_combine ^ int(poisoned), mem.buffer_bytes,
                       self.timeout_iters, self.ws, poisoned, *self.combine_grid, lc.combine_block_t,
                       lc.combine_block_h, lc.combine_item_chunks, lc.combine_warps, lc.combine_stages)

    def close(self) -> None:
        self.memory.close()
