"""MoeDispatcher: expert-parallel dispatch and combine with one copy of a token per destination rank.

    disp = MoeDispatcher(group, num_experts=256, hidden=7168, dtype=torch.bfloat16, max_tokens=4096, topk=8)
    recv_x, handle = disp.dispatch(x, topk_idx, topk_weights)   # x [T, hidden], topk_* [T, topk]
    rows = handle.expert_major(recv_x)                          # [X, hidden] grouped by local expert
    y = experts(rows, handle.expert_offsets)                    # e.g. a grouped GEMM, [X, hidden]
    out = disp.combine(y, handle, residual=x)                   # [T, hidden]

``out[t] = residual[t] + sum over k of topk_weights[t, k] * expert_{topk_idx[t, k]}(x[t])`` (slots with
id -1 skipped), reduced in fp32: on the expert's rank over its local slots in k order, then on the
token's rank over ranks in rank order, so the result is bitwise the same on every run.

Transports: "peer" (Triton kernels on peer memory: NVLink on GPUs, shared memory on CPU worlds) or
"nccl" (``all_to_all_single`` through the process group, the same dedup; any group NCCL or gloo
serves). "auto" takes peer memory where every pair of ranks can use it, as the all-reduce does.
Modes: "graph" (no host synchronisation: CUDA-graph capturable; buffers sized for the worst case,
sizes in device memory) and "exact" (the host learns the receive sizes after the counts exchange and
the returned tensors are sized exactly). The NCCL transport needs the host sizes, so it is exact only.

Calls must be issued in the same order on every rank, dispatch then combine, on one stream per rank.
Errors are detected on every rank: bad arguments raise on the rank that passed them, and the peers
fail the same round (raising at once on CPU worlds and in exact mode; in graph mode on GPUs, the
round's outputs are NaN and the next call, or ``check()``, raises).
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.distributed as dist

from ...errors import ShardkitError
from ...kernels.moe.launch_config import MoeLaunchConfig, moe_launch_config
from ...memory.peer_memory import in_interpreter
from ...memory.protocol import MAX_PROGRAMS
from ..communicator import DEFAULT_TIMEOUT_S, peer_access_problem, timeout_iters
from .config import MoeHandle, check_agreement, check_combine_args, check_dispatch_args, make_config
from .nccl import NcclTransport
from .peer import PeerTransport

TRANSPORTS = ("auto", "peer", "nccl")
_REGISTRY: dict[str, "MoeDispatcher"] = {}


def get_dispatcher(name: str) -> "MoeDispatcher":
    """The dispatcher registered under ``name`` (``MoeDispatcher.name``), for the torch ops."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ShardkitError(f"no shardkit MoeDispatcher named {name!r}: create one on every rank first") from None


class MoeDispatcher:
    """Dispatch/combine for the ranks of ``group`` (default: the world), all of which must construct it
    with the same arguments.

    Args:
        num_experts: E; expert ids in ``topk_idx`` are in [0, E), or -1 for none.
        hidden: channels of a token row.
        dtype: of the token rows and expert outputs (bf16, fp16, fp32).
        max_tokens: the most tokens a rank passes to one dispatch.
        topk: K, columns of ``topk_idx`` / ``topk_weights``.
        placement: rank of each expert (a sequence or tensor of E ints, any map); default contiguous
            blocks of E / world experts.
        mode: "graph" or "exact" (see the module).
        fp8: send rows as e4m3 with one fp32 scale per 128 channels (half the bytes); ``recv_x`` is then
            fp8 and ``handle.scales`` holds the scales (``handle.dequantize``). Peer transport: the
            quantisation happens in the dispatch kernel.
        align: pad every local expert's expert-major block to a multiple of this many rows.
        max_recv_tokens: receive capacity in rows per rank (default world * max_tokens, which can
            never overflow); a round that would exceed it fails on every rank.
        transport: "auto", "peer" or "nccl".
        timeout_s: how long a barrier waits for a peer before the round fails (peer transport).
        name: registry name for the torch ops (default "moe:<group name>").
        programs: programs per launch (peer transport; default one per SM, 2 in the interpreter).
        launch_config: the kernels' grids (peer transport; a ``MoeLaunchConfig``, for tuning; default
            ``moe_launch_config`` of this configuration; ``programs`` overrides its programs).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, num_experts: int, hidden: int,
                 dtype: torch.dtype = torch.bfloat16, max_tokens: int, topk: int, placement=None,
                 mode: str = "graph", fp8: bool = False, align: int = 1, max_recv_tokens: int | None = None,
                 transport: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, name: str | None = None,
                 programs: int | None = None, launch_config: MoeLaunchConfig | None = None) -> None:
        if not dist.is_initialized():
            raise ShardkitError("MoeDispatcher needs an initialised torch.distributed process group")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "cuda"
                       else torch.device("cpu"))
        if transport not in TRANSPORTS:
            raise ValueError(f"MoeDispatcher: transport must be one of {TRANSPORTS}, got {transport!r}")
        if not timeout_s > 0:
            raise ValueError(f"MoeDispatcher: timeout_s must be positive, got {timeout_s}")
        self.cfg = make_config(self.world_size, num_experts, hidden, dtype, max_tokens, topk, placement, mode, fp8,
                               align, max_recv_tokens)
        sm_count = (torch.cuda.get_device_properties(self.device).multi_processor_count
                    if self.backend == "cuda" else 0)
        extras = check_agreement(self.cfg, self.group, {"transport": transport, "sm_count": sm_count})
        if any(e["transport"] != transport for e in extras):
            raise ValueError(f"MoeDispatcher: ranks disagree about transport: {[e['transport'] for e in extras]}")
        # Dispatch and combine programs wait for the same-numbered program of every peer: equal grids.
        if launch_config is None:
            element_size = torch.empty((), dtype=dtype).element_size()
            launch_config = moe_launch_config(max_tokens, hidden, element_size, bool(fp8),
                                              min(e["sm_count"] for e in extras), self.backend == "cpu")
        if not isinstance(launch_config, MoeLaunchConfig):
            raise TypeError(f"MoeDispatcher: launch_config must be a MoeLaunchConfig, got "
                            f"{type(launch_config).__name__}")
        if programs is not None:
            if not isinstance(programs, int) or not 1 <= programs <= MAX_PROGRAMS:
                raise ValueError(f"MoeDispatcher: programs must be in [1, {MAX_PROGRAMS}], got {programs}")
            launch_config = dataclasses.replace(launch_config, programs=programs)
        launch_config.check(bool(fp8))
        self.fallback_reason = None
        if transport == "auto":
            self.fallback_reason = peer_access_problem(self.group, self.backend, self.device)
            transport = "nccl" if self.fallback_reason else "peer"
            if self.fallback_reason and self.rank == 0:
                warnings.warn(f"shardkit: MoE dispatch over NCCL: {self.fallback_reason}", stacklevel=2)
        if transport == "peer" and self.backend == "cpu" and not in_interpreter():
            raise ShardkitError("a gloo group runs shardkit's kernels on the CPU: set TRITON_INTERPRET=1 "
                                "before importing triton (or use transport='nccl')")
        if transport == "nccl" and mode == "graph":
            raise ValueError("MoeDispatcher: the NCCL transport needs the host to know the sizes: use mode='exact' "
                             "(graph mode needs peer memory)" + (f"; peer memory is unavailable here: "
                                                                 f"{self.fallback_reason}" if self.fallback_reason
                                                                 else ""))
        self.timeout_s = float(timeout_s)
        if transport == "peer":
            self.transport = PeerTransport(self.cfg, self.group, self.rank, self.backend, self.device,
                                           timeout_iters(self.timeout_s, self.backend), self.timeout_s,
                                           launch_config)
        else:
            self.transport = NcclTransport(self.cfg, self.group, self.rank, self.device)
        self.rounds = 0
        self._handle: MoeHandle | None = None
        self.name = name or f"moe:{self.group.group_name}"
        _REGISTRY[self.name] = self

    # ------------------------------------------------------------------ properties
    @property
    def local_experts(self) -> tuple[int, ...]:
        """Global ids of this rank's experts, in local order (local index l = position here)."""
        return self.cfg.local_experts[self.rank]

    @property
    def latest_handle(self) -> MoeHandle | None:
        """The handle of the latest dispatch (None before the first)."""
        return self._handle

    @property
    def launch_config(self) -> MoeLaunchConfig | None:
        """The kernels' grids (peer transport; None over NCCL)."""
        return getattr(self.transport, "launch", None)

    def set_launch_config(self, config: MoeLaunchConfig) -> None:
        """Use other grids from the next dispatch on (for tuning): call it on every rank alike, between a
        combine and the next dispatch (ranks that differ fail that round at its first barrier)."""
        if not isinstance(self.transport, PeerTransport):
            raise ValueError("set_launch_config: the NCCL transport has no launch grids")
        if not isinstance(config, MoeLaunchConfig):
            raise TypeError(f"set_launch_config: config must be a MoeLaunchConfig, got {type(config).__name__}")
        self.transport.set_launch(config)

    @property
    def expert_capacity(self) -> int:
        """Rows of the expert-major order in graph mode (an expert_out must have at least these)."""
        return self.cfg.expert_rows

    # ------------------------------------------------------------------ API
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                 topk_weights: torch.Tensor) -> tuple[torch.Tensor, MoeHandle]:
        """Send each token once to every rank holding one of its experts.

        x: [T, hidden] of the dispatcher's dtype, T <= max_tokens (T may differ between ranks, 0 too).
        topk_idx: [T, topk] int32/int64 expert ids, -1 = no expert (duplicates count twice).
        topk_weights: [T, topk] fp32/bf16/fp16.
        All contiguous, on this rank's device; not modified.
        Returns (recv_x [N, hidden] rank-major received rows, handle) (see MoeHandle); both valid
        until the next dispatch.
        """
        try:
            check_dispatch_args(self.cfg, self.device, x, topk_idx, topk_weights)
        except (TypeError, ValueError):
            self.transport.poison_round()
            raise
        self.rounds += 1
        recv_x, self._handle = self.transport.dispatch(x, topk_idx, topk_weights, self.rounds)
        return recv_x, self._handle

    def combine(self, expert_out: torch.Tensor, handle: MoeHandle, residual: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum of each token's expert outputs, back on the token's rank.

        expert_out: [rows, hidden] in the handle's expert-major order (row j = the output of expert-major
            row j), rows >= ``handle.num_expert_rows`` (exact) or ``expert_capacity`` (graph).
        handle: the latest dispatch's handle (each combined once).
        residual: optional [T, hidden], added in fp32. out: optional [T, hidden] buffer.
        Returns out [T, hidden] in the dispatcher's dtype.
        """
        if handle is not self._handle or handle.combined:
            raise ValueError("combine: handle must be the latest dispatch's, combined once (dispatch and combine "
                             "alternate on every rank)")
        rows = handle.num_expert_rows if handle.num_expert_rows is not None else self.cfg.expert_rows
        try:
            check_combine_args(self.cfg, self.device, handle, rows, expert_out, residual, out)
        except (TypeError, ValueError):
            self.transport.poison_combine()
            raise
        if out is None:
            out = torch.empty(handle.tokens, self.cfg.hidden, dtype=self.cfg.dtype, device=self.device)
        handle.combined = True
        return self.transport.combine(expert_out, handle, residual, out)

    def check(self) -> None:
        """Wait for this rank's queued work; raise CollectiveError if a round failed."""
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
        self.transport.raise_if_failed()

    def close(self) -> None:
        """Release the workspace (idempotent)."""
        self.transport.close()
        if _REGISTRY.get(self.name) is self:
            del _REGISTRY[self.name]
