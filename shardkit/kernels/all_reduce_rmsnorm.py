"""Fused all-reduce + residual add + RMSNorm: the sync point after every row-parallel linear of a
tensor-parallel Llama-style block, in one kernel per rank.

For x [tokens, hidden] (this rank's partial sums), residual [tokens, hidden] and weight [hidden],
all equal-shaped on every rank (residual and weight replicated)::

    s            = sum over ranks of x                      (fp32, ranks in fixed order 0..W-1)
    residual_out = (residual + s)                           rounded to x's dtype
    out          = residual_out * rsqrt(mean(residual_out**2) + eps) * weight   (fp32, rounded)

The norm is taken of the *rounded* residual_out, so ``out`` is exactly the RMSNorm of the residual
stream that the next layer receives (as in vLLM's fused_add_rms_norm). Every program handles whole
rows (BLOCK_H = next_pow2(hidden) columns), since the norm needs the whole row.

One-shot (decode sizes), per rank, program p handling rows p, p + G, p + 2G, ...:
  1. stage its x rows into this call's half of the double-buffered workspace,
  2. barrier with the peers' program p (which staged the same rows),
  3. sum each row over the ranks, add the residual, normalise, write out and residual_out.
Two-shot (larger token counts): rank r owns rows [r*R, (r+1)*R), R = ceil(tokens / W):
  1. stage x shard by shard, program p taking rows p, p + G, ... of every shard (the map that the
     owners' program p reduces with),
  2. barrier (stage 0); reduce the own rows, add the residual, normalise, write both outputs and
     publish them in our half: out over our own staged x rows (read only by this program, just
     before), residual_out in a second region after the staged rows,
  3. barrier (stage 1); copy the other ranks' published rows of out and residual_out.
Like the flat and tree all-reduce, no end barrier: call n+2 reuses call n's half only after every
peer signalled in call n+1 (see docs/ARCHITECTURE.md).

Workspace rows are ``ws_stride`` elements apart, hidden rounded up to 16 elements, so every row
starts 16-byte aligned and peer loads are 16 bytes wide.
"""
import torch
import triton
import triton.language as tl

from .launch import CachedLauncher, int_key, ptr_key
from .peer_tiles import peer_ptr, stage_rows, sum_tile
from .sync import finish_call, peer_barrier, start_call

MAX_HIDDEN = 32768  # one row lives in registers: BLOCK_H fp32 values per program


@triton.jit
def _reduce_norm_row(table_ptr, half, row, ws_stride, residual_ptr, weight, out_ptr, res_out_ptr, hidden, eps,
                     cols, cmask, ok, WORLD: tl.constexpr, DTYPE: tl.constexpr):
    """One row: sum the staged row of every rank (fp32, rank order), add the residual, RMSNorm;
    stores ``out`` and ``residual_out`` (both NaN when ``ok`` is False: the call failed) and
    returns them, in DTYPE."""
    total = sum_tile(table_ptr, half, row * ws_stride + cols, cmask & ok, WORLD, DTYPE)
    res = tl.load(residual_ptr + row * hidden + cols, mask=cmask, other=0.0).to(tl.float32)
    h = (total + res).to(DTYPE).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
    y = tl.where(ok, h * rstd * weight, float("nan")).to(DTYPE)
    h = tl.where(ok, h, float("nan")).to(DTYPE)
    tl.store(out_ptr + row * hidden + cols, y, mask=cmask)
    tl.store(res_out_ptr + row * hidden + cols, h, mask=cmask)
    return y, h


# Arguments whose values do not shape the code: Triton need not specialise (and recompile) on them.
_NOT_SPECIALISED = ["status_addr", "rank", "sig", "half_bytes", "timeout_iters"]


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def oneshot_rmsnorm_kernel(
    x_ptr,          # [tokens, hidden] this rank's partial sums (rows contiguous: row stride = hidden)
    residual_ptr,   # [tokens, hidden] residual stream, equal on every rank
    weight_ptr,     # [hidden] RMSNorm weight
    out_ptr,        # [tokens, hidden] normalised output; may be x or residual
    res_out_ptr,    # [tokens, hidden] residual + sum; may be x or residual
    table_ptr,      # int64[WORLD]: every rank's workspace base address, in this process
    status_addr,    # int64: address of this rank's int32[4] error record
    tokens,         # rows
    hidden,         # columns, and the row stride of the four [tokens, hidden] tensors
    ws_stride,      # row stride in the workspace (hidden rounded up to 16 elements)
    eps,            # RMSNorm epsilon
    rank,           # this rank
    sig,            # 31-bit call signature, equal on all ranks for a well-formed call
    half_bytes,     # bytes of one half of the double-buffered staging area
    timeout_iters,  # barrier polls before giving up
    WORLD: tl.constexpr, WORLD_P2: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    own, epoch, flag, ok, half = start_call(table_ptr, rank, sig, half_bytes)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < hidden
    if ok:
        # Rows p, p + G, ...: the rows that this program reads back from every rank below.
        stage_rows(x_ptr, peer_ptr(table_ptr, rank, half, DTYPE), 0, tokens, hidden, ws_stride, cols, cmask,
                   pid, nprog)
    ok = peer_barrier(table_ptr, rank, 0, flag, ok, status_addr, timeout_iters, WORLD, WORLD_P2)
    weight = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for row in range(pid, tokens, nprog):
        _reduce_norm_row(table_ptr, half, row, ws_stride, residual_ptr, weight, out_ptr, res_out_ptr, hidden, eps,
                         cols, cmask, ok, WORLD, DTYPE)
    finish_call(own, epoch)


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def twoshot_rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, res_out_ptr,  # as in oneshot_rmsnorm_kernel
    table_ptr, status_addr, tokens, hidden, ws_stride, eps, rank, sig, half_bytes, timeout_iters,
    rows_per_rank,  # R: rank r owns rows [r*R, min((r+1)*R, tokens)) (the last ones short or empty)
    WORLD: tl.constexpr, WORLD_P2: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    own, epoch, flag, ok, half = start_call(table_ptr, rank, sig, half_bytes)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < hidden
    # Our half: staged x rows (row i at i*ws_stride; our own rows are overwritten with out), then the
    # published residual_out rows (row i at (tokens + i)*ws_stride).
    mine = peer_ptr(table_ptr, rank, half, DTYPE)
    if ok:
        for s in tl.static_range(WORLD):
            stage_rows(x_ptr, mine, s * rows_per_rank, tl.minimum((s + 1) * rows_per_rank, tokens), hidden,
                       ws_stride, cols, cmask, pid, nprog)
    ok = peer_barrier(table_ptr, rank, 0, flag, ok, status_addr, timeout_iters, WORLD, WORLD_P2)

    # Reduce-scatter + residual + norm of our rows.
    weight = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    lo = rank * rows_per_rank
    hi = tl.minimum(lo + rows_per_rank, tokens)
    for j in range(pid, hi - lo, nprog):
        row = lo + j
        y, h = _reduce_norm_row(table_ptr, half, row, ws_stride, residual_ptr, weight, out_ptr, res_out_ptr,
                                hidden, eps, cols, cmask, ok, WORLD, DTYPE)
        tl.store(mine + row * ws_stride + cols, y, mask=cmask & ok)
        tl.store(mine + (tokens + row) * ws_stride + cols, h, mask=cmask & ok)
    ok = peer_barrier(table_ptr, rank, 1, flag, ok, status_addr, timeout_iters, WORLD, WORLD_P2)

    # All-gather: the other ranks' rows, written there by their program p.
    for i in tl.static_range(1, WORLD):
        s = (rank + i) % WORLD
        theirs = peer_ptr(table_ptr, s, half, DTYPE)
        s_lo = s * rows_per_rank
        s_hi = tl.minimum(s_lo + rows_per_rank, tokens)
        for j in range(pid, s_hi - s_lo, nprog):
            row = s_lo + j
            y = tl.load(theirs + row * ws_stride + cols, mask=cmask & ok, other=float("nan"))
            h = tl.load(theirs + (tokens + row) * ws_stride + cols, mask=cmask & ok, other=float("nan"))
            tl.store(out_ptr + row * hidden + cols, y, mask=cmask)
            tl.store(res_out_ptr + row * hidden + cols, h, mask=cmask)
    finish_call(own, epoch)


_launch_oneshot = CachedLauncher(oneshot_rmsnorm_kernel)
_launch_twoshot = CachedLauncher(twoshot_rmsnorm_kernel)


def workspace_stride(hidden: int) -> int:
    """Elements between workspace rows: hidden rounded up to 16, so that rows start 16-byte aligned."""
    return -(-hidden // 16) * 16


def max_rows(hidden: int, element_size: int, half_bytes: int, two_shot: bool) -> int:
    """Rows one call can take: the one-shot kernel stages x, the two-shot kernel also publishes
    residual_out, in one workspace half. 0 when not even one row fits."""
    return half_bytes // (workspace_stride(hidden) * element_size * (2 if two_shot else 1))


def call_signature(two_shot: bool, tokens: int, hidden: int, dtype_code: int) -> int:
    """31-bit fingerprint of a fused call (op codes 3/4, distinct from the all-reduce's 1/2)."""
    h = ((4 if two_shot else 3) * 1_000_003 + dtype_code) * 2_147_483_629
    h = ((h ^ tokens) * 1_000_000_007 + hidden) * 998_244_353
    return h % 2_147_483_647


def default_warps(hidden: int) -> int:
    """GPU warps for a row of ``hidden`` elements: ~16 elements per thread, 4 to 16 warps."""
    return min(16, max(4, triton.next_power_of_2(hidden) // 512))


def launch_all_reduce_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              out: torch.Tensor, residual_out: torch.Tensor, table: torch.Tensor,
                              status_addr: int, rank: int, world: int, sig: int, eps: float, half_bytes: int,
                              timeout_iters: int, two_shot: bool, programs: int, num_warps: int) -> None:
    """Launch one fused call on contiguous [tokens, hidden] x, residual, out, residual_out and [hidden]
    weight; ``tokens`` at most ``max_rows(hidden, x.element_size(), half_bytes, two_shot)``.

    programs: the grid; at most ``tokens`` (one-shot) or ``ceil(tokens / world)`` (two-shot) do work.
    """
    tokens, hidden = x.shape
    eps = float(eps)  # an int would make Triton compile an integer argument
    ws_stride = workspace_stride(hidden)
    args = (x, residual, weight, out, residual_out, table, status_addr, tokens, hidden, ws_stride, eps, rank, sig,
            half_bytes, timeout_iters)
    consts = {"WORLD": world, "WORLD_P2": triton.next_power_of_2(world), "BLOCK_H": triton.next_power_of_2(hidden)}
    key = (*(ptr_key(t) for t in (x, residual, weight, out, residual_out)), int_key(tokens), int_key(hidden),
           int_key(ws_stride), int_key(status_addr), int_key(half_bytes), int_key(timeout_iters), world,
           consts["BLOCK_H"], num_warps)
    if two_shot:
        rows_per_rank = -(-tokens // world)
        _launch_twoshot((*key, int_key(rows_per_rank)), programs, (*args, rows_per_rank), consts, num_warps)
    else:
        _launch_oneshot(key, programs, args, consts, num_warps)
