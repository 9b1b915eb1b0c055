"""What every rank of an expert-parallel group must agree on, the per-call input checks, and the handle
that a dispatch returns (shared by the peer-memory and the NCCL transports)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ...kernels.moe.workspace import SCALE_GROUP

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("graph", "exact")


@dataclass(frozen=True)
class MoeConfig:
    """The dispatcher's configuration; equal on every rank (checked when the dispatcher is made).

    ``expert_rank[e]``: the rank holding expert e (any placement); ``expert_local[e]``: e's index among
    its rank's experts (ascending global ids); ``recv_rows``: receive capacity in rows (default the
    worst case, every token of every rank); ``expert_rows``: expert-major capacity (each received row
    can feed ``topk`` slots, plus padding of every local expert to ``align`` rows).
    """

    world: int
    num_experts: int
    hidden: int
    dtype: torch.dtype
    max_tokens: int
    topk: int
    expert_rank: tuple[int, ...]
    mode: str
    fp8: bool
    align: int
    recv_rows: int
    expert_local: tuple[int, ...] = field(init=False)
    local_experts: tuple[tuple[int, ...], ...] = field(init=False)  # per rank, global ids in local order
    expert_rows: int = field(init=False)

    def __post_init__(self) -> None:
        per_rank = tuple(tuple(e for e in range(self.num_experts) if self.expert_rank[e] == r)
                         for r in range(self.world))
        local = [0] * self.num_experts
        for experts in per_rank:
            for i, e in enumerate(experts):
                local[e] = i
        object.__setattr__(self, "local_experts", per_rank)
        object.__setattr__(self, "expert_local", tuple(local))
        max_local = max(len(p) for p in per_rank)
        object.__setattr__(self, "expert_rows", self.recv_rows * self.topk + max_local * (self.align - 1))

    @property
    def max_local_experts(self) -> int:
        return max(len(p) for p in self.local_experts)

    @property
    def scale_groups(self) -> int:
        return -(-self.hidden // SCALE_GROUP)

    def fingerprint(self) -> tuple:
        """The integers every rank's calls depend on (for the call signatures)."""
        placement = int.from_bytes(hashlib.sha1(repr(self.expert_rank).encode()).digest()[:6], "little")
        return (self.world, self.num_experts, self.hidden, SUPPORTED_DTYPES.index(self.dtype), self.max_tokens,
                self.topk, placement, int(self.fp8), self.align, self.recv_rows)

    def describe(self) -> dict:
        """The fields a user chose, for the cross-rank comparison's error message."""
        return {"num_experts": self.num_experts, "hidden": self.hidden, "dtype": str(self.dtype),
                "max_tokens": self.max_tokens, "topk": self.topk, "placement": self.expert_rank, "mode": self.mode,
                "fp8": self.fp8, "align": self.align, "max_recv_tokens": self.recv_rows}


def make_config(world: int, num_experts: int, hidden: int, dtype: torch.dtype, max_tokens: int, topk: int,
                placement, mode: str, fp8: bool, align: int, max_recv_tokens: int | None) -> MoeConfig:
    """Validate the constructor's arguments (ValueError/TypeError naming the argument)."""
    what = "MoeDispatcher"
    for name, v, lo in (("num_experts", num_experts, 1), ("hidden", hidden, 1), ("max_tokens", max_tokens, 1),
                        ("topk", topk, 1), ("align", align, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{what}: {name} must be an int >= {lo}, got {v!r}")
    if topk > num_experts:
        raise ValueError(f"{what}: topk ({topk}) exceeds num_experts ({num_experts})")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    if mode not in MODES:
        raise ValueError(f"{what}: mode must be one of {MODES}, got {mode!r}")
    if placement is None:  # contiguous blocks, as even as possible
        expert_rank = tuple(e * world // num_experts for e in range(num_experts))
    else:
        expert_rank = tuple(int(r) for r in (placement.tolist() if isinstance(placement, torch.Tensor) else placement))
        if len(expert_rank) != num_experts or any(not 0 <= r < world for r in expert_rank):
            raise ValueError(f"{what}: placement must list a rank in [0, {world}) for each of the {num_experts} "
                             f"experts, got {list(expert_rank)[:16]}{'...' if len(expert_rank) > 16 else ''} "
                             f"({len(expert_rank)} entries)")
    recv_rows = world * max_tokens if max_recv_tokens is None else max_recv_tokens
    if not isinstance(recv_rows, int) or recv_rows < 1:
        raise ValueError(f"{what}: max_recv_tokens must be an int >= 1, got {max_recv_tokens!r}")
    return MoeConfig(world=world, num_experts=num_experts, hidden=hidden, dtype=dtype, max_tokens=max_tokens,
                     topk=topk, expert_rank=expert_rank, mode=mode, fp8=bool(fp8), align=align, recv_rows=recv_rows)


def check_agreement(cfg: MoeConfig, group: dist.ProcessGroup, extra: dict) -> list[dict]:
    """Gather every rank's configuration (plus ``extra``); raise ValueError on every rank if they differ.
    Returns the gathered ``extra`` dicts."""
    gathered: list = [None] * cfg.world
    dist.all_gather_object(gathered, (cfg.describe(), extra), group=group)
    user = [g[0] for g in gathered]
    for key in cfg.describe():
        values = [u[key] for u in user]
        if any(v != values[0] for v in values):
            shown = {r: (v if key != "placement" else f"{list(v)[:8]}...") for r, v in enumerate(values)}
            raise ValueError(f"MoeDispatcher: ranks disagree about {key}: {shown}; every rank must pass the same")
    return [g[1] for g in gathered]


def _check_placed(t, name: str, device: torch.device, what: str) -> None:
    """A tensor on this rank's device, contiguous (TypeError/ValueError naming ``name``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{what}: {name} must be on {device} (this rank's device), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{what}: {name} must be contiguous (call .contiguous() first)")


def check_dispatch_args(cfg: MoeConfig, device: torch.device, x, topk_idx, topk_weights) -> int:
    """Raise TypeError/ValueError naming the bad argument; returns T."""
    what = "dispatch"
    for name, t in (("x", x), ("topk_idx", topk_idx), ("topk_weights", topk_weights)):
        _check_placed(t, name, device, what)
    if x.dtype != cfg.dtype:
        raise TypeError(f"{what}: x must be {cfg.dtype} (the dispatcher's dtype), got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != cfg.hidden:
        raise ValueError(f"{what}: x must be [tokens, hidden={cfg.hidden}], got {tuple(x.shape)}")
    tokens = x.shape[0]
    if tokens > cfg.max_tokens:
        raise ValueError(f"{what}: x has {tokens} tokens, more than max_tokens={cfg.max_tokens}")
    if topk_idx.dtype not in ID_DTYPES:
        raise TypeError(f"{what}: topk_idx must be int32 or int64, got {topk_idx.dtype}")
    if topk_weights.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{what}: topk_weights must be float32, bfloat16 or float16, got {topk_weights.dtype}")
    for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
        if tuple(t.shape) != (tokens, cfg.topk):
            raise ValueError(f"{what}: {name} must be [tokens={tokens}, topk={cfg.topk}], got {tuple(t.shape)}")
    return tokens


def check_combine_args(cfg: MoeConfig, device: torch.device, handle: "MoeHandle", expert_rows: int, expert_out,
                       residual, out) -> None:
    """Raise TypeError/ValueError naming the bad argument. ``expert_rows``: rows expert_out needs."""
    what = "combine"
    for name, t in (("expert_out", expert_out), ("residual", residual), ("out", out)):
        if t is None and name != "expert_out":
            continue
        _check_placed(t, name, device, what)
        if t.dtype != cfg.dtype:
            raise TypeError(f"{what}: {name} must be {cfg.dtype} (the dispatcher's dtype), got {t.dtype}")
    if expert_out.dim() != 2 or expert_out.shape[1] != cfg.hidden or expert_out.shape[0] < expert_rows:
        raise ValueError(f"{what}: expert_out must be [rows >= {expert_rows}, hidden={cfg.hidden}] (one row per "
                         f"expert-major row of the handle), got {tuple(expert_out.shape)}")
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and tuple(t.shape) != (handle.tokens, cfg.hidden):
            raise ValueError(f"{what}: {name} must be [tokens={handle.tokens}, hidden={cfg.hidden}], "
                             f"got {tuple(t.shape)}")


@dataclass
class MoeHandle:
    """What a dispatch hands to the expert computation and to the combine (valid until the next dispatch).

    Rows (``recv_x`` returned beside the handle, and every per-row tensor here) are rank-major: the
    rows from source s are ``[recv_offsets[s], recv_offsets[s] + recv_counts[s])``, in token order.
    ``exact`` mode: tensors are sized exactly and ``num_recv`` / ``num_expert_rows`` are ints.
    ``graph`` mode: tensors have the capacity's size (rows past ``recv_info[0]`` / ``recv_info[1]``
    are stale), the sizes are only in device memory (``recv_info``), and every call returns the same
    tensors (static addresses for CUDA graphs).

    Fields, N = rows, X = expert-major rows, L = this rank's local experts, K = topk:
        src_rank, src_token   int32[N]: where each row came from
        local_expert          int32[N, K]: local index of each top-k slot's expert here, -1 if elsewhere
        weights               fp32[N, K]: the source's top-k weights
        expert_row            int32[N, K]: each slot's row in the expert-major order, -1 if elsewhere
        expert_index          int32[X]: receive row of each expert-major row, -1 for padding
        expert_offsets        int32[L + 1]: expert l's rows are [offsets[l], offsets[l] + counts[l]),
        expert_counts         int32[L]      its block padded to ``align`` rows (offsets[L] = X used)
        recv_counts, recv_offsets   int32[W]
        recv_info             int32[2]: (rows received, expert-major rows) on the device
        scales                fp32[N, ceil(hidden / 128)] with fp8 dispatch, else None
    The expert-major order: by local expert, then source rank, token and top-k slot (each expert's
    block padded to ``align`` rows); like the rank-major order, a function of the routing alone.
    Expert outputs for the combine are ``[X, hidden]`` in this order (``expert_major`` gathers the
    received rows into it: the input of a grouped GEMM).
    """

    round: int
    tokens: int
    hidden: int
    dtype: torch.dtype
    src_rank: torch.Tensor
    src_token: torch.Tensor
    local_expert: torch.Tensor
    weights: torch.Tensor
    expert_row: torch.Tensor
    expert_index: torch.Tensor
    expert_offsets: torch.Tensor
    expert_counts: torch.Tensor
    recv_counts: torch.Tensor
    recv_offsets: torch.Tensor
    recv_info: torch.Tensor
    scales: torch.Tensor | None = None
    num_recv: int | None = None
    num_expert_rows: int | None = None
    combined: bool = False

    def expert_major(self, recv_x: torch.Tensor) -> torch.Tensor:
        """The received rows in expert-major order, ``[X, hidden]`` (zero rows for padding); fp8 rows
        are dequantised first."""
        rows = self.dequantize(recv_x) if self.scales is not None else recv_x[:, :self.hidden]
        keep = self.expert_index >= 0
        out = rows.index_select(0, self.expert_index.clamp(min=0).long())
        return out * keep[:, None].to(out.dtype)

    def dequantize(self, recv_x: torch.Tensor) -> torch.Tensor:
        """fp8 rows times their per-128-channel scales, ``[N, hidden]`` in the dispatcher's dtype."""
        if self.scales is None:
            raise ValueError("dequantize: this dispatch did not use fp8")
        n = recv_x.shape[0]
        scale = self.scales[:n].repeat_interleave(SCALE_GROUP, dim=1)[:, :self.hidden]
        return (recv_x[:, :self.hidden].float() * scale).to(self.dtype)
