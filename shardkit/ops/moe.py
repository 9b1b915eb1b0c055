"""torch.ops.shardkit.moe_dispatch / moe_combine: a MoeDispatcher's round as torch custom ops.

No autograd (inference ops). The dispatcher is looked up by name (``MoeDispatcher(..., name=...)``,
default ``"moe:<group name>"``): create it on every rank first. Fake implementations give the shapes
to torch.compile: in graph mode the capacities (static), in exact mode data-dependent sizes.

``recv_x`` is a view of the dispatcher's workspace (no copy), valid until the next dispatch, like
the handle of ``MoeDispatcher.dispatch``; the small index tensors are copies (a custom op may not
return two views of one buffer). The combine uses the dispatcher's latest dispatch.
"""
from __future__ import annotations

import torch

from ..collectives.moe import get_dispatcher


@torch.library.custom_op("shardkit::moe_dispatch", mutates_args=())
def moe_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(recv_x [N, hidden], scales [N, ceil(hidden/128)] (fp8 dispatch; else empty), expert_index [X],
    expert_offsets [L + 1], recv_info [2]): see MoeDispatcher.dispatch and MoeHandle."""
    recv_x, h = get_dispatcher(name).dispatch(x, topk_idx, topk_weights)
    scales = h.scales.clone() if h.scales is not None else torch.empty(0, 0, device=x.device)
    return recv_x, scales, h.expert_index.clone(), h.expert_offsets.clone(), h.recv_info.clone()


@moe_dispatch.register_fake
def _(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, name: str):
    disp = get_dispatcher(name)
    cfg = disp.cfg
    if cfg.mode == "graph":
        rows, expert_rows = cfg.recv_rows, cfg.expert_rows
    else:
        ctx = torch.library.get_ctx()
        rows, expert_rows = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    payload = torch.float8_e4m3fn if cfg.fp8 else cfg.dtype
    scales = x.new_empty(rows if cfg.fp8 else 0, cfg.scale_groups if cfg.fp8 else 0, dtype=torch.float32)
    i32 = dict(dtype=torch.int32)
    return (x.new_empty(rows, cfg.hidden, dtype=payload), scales, x.new_empty(expert_rows, **i32),
            x.new_empty(len(disp.local_experts) + 1, **i32), x.new_empty(2, **i32))


@torch.library.custom_op("shardkit::moe_combine", mutates_args=())
def moe_combine(expert_out: torch.Tensor, tokens: int, name: str,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """[tokens, hidden]: the latest dispatch's tokens (``tokens`` of them: x's rows) as the weighted sum
    of their expert outputs (+ residual); see MoeDispatcher.combine."""
    disp = get_dispatcher(name)
    handle = disp.latest_handle
    if handle is None or handle.tokens != tokens:
        raise ValueError(f"moe_combine: tokens={tokens} does not match the latest dispatch of {name!r} "
                         f"({None if handle is None else handle.tokens} tokens)")
    return disp.combine(expert_out, handle, residual=residual)


@moe_combine.register_fake
def _(expert_out: torch.Tensor, tokens: int, name: str, residual: torch.Tensor | None = None) -> torch.Tensor:
    return expert_out.new_empty(tokens, get_dispatcher(name).cfg.hidden)
