"""Fused all-reduce + residual add + RMSNorm: the sync point after every row-parallel linear of a
tensor-parallel Llama-style block, in one kernel per rank.

For x [tokens, hidden] (this rank's partial sums), residual [tokens, hidden] and weight [hidden],
all equal-shaped on every rank (residual and weight replicated)::

    s            = sum over ranks of x                      (fp32, ranks in fixed order 0..W-1)
    residual_out = (residual + s)                           rounded to x's dtype
    out          = residual_out * rsqrt(mean(residual_out**2) + eps) * weight   (fp32, rounded)

The norm is taken of the *rounded* residual_out, so ``out`` is exactly the RMSNorm of the residual
stream that the next layer receives (as in vLLM's fused_add_rms_norm).

Two algorithms, named as the all-reduce's (DDA flat = one-shot, tree = two-shot).

Flat (decode sizes), per rank, program p handling whole rows p, p + G, p + 2G, ...
(BLOCK_H = next_pow2(hidden) columns: the norm needs the whole row):
  1. stage its x rows into this call's epoch buffer,
  2. barrier with the peers' program p (which staged the same rows),
  3. sum each row over the ranks, add the residual, normalise, write out and residual_out.
Tree (larger token counts): rank r owns rows [r*R, (r+1)*R), R = ceil(tokens / W). A work item
is one chunk of BLOCK_C columns of one row, so that R * hidden / BLOCK_C programs pull data instead
of R (with whole rows, 64 tokens on 4 GPUs kept 16 SMs busy). Program p takes items p, p + G, ...:
  1. stage x item by item for every shard (the map that the owners' program p reduces with),
  2. barrier (stage 0); reduce our items: residual_out into the output and over our own staged x
     (read only by this program, just before), and each chunk's sum of squares into a local 64-bit
     slot tagged with the call's epoch,
  3. per item, wait for the slots of all chunks of its row (programs of this launch: ``wait_tagged``),
     rstd from them in chunk order, write ``out`` and publish rstd per chunk,
  4. barrier (stage 1); gather the other ranks' items: residual_out and rstd, and normalise locally
     with the same fp32 products as the owner (``_normalise``), so out is bitwise equal everywhere
     and the all-gather moves residual_out only.
Step 3 needs all G programs resident at once, as the peer barriers do (G <= SMs).
Like the flat and tree all-reduce, no end barrier: call n+2 reuses call n's epoch buffer only
after every peer signalled in call n+1 (see docs/ARCHITECTURE.md).

Launch policy (``rmsnorm_config``): flat, one program per row up to one per SM; tree, about one
chunk of a row per SM (``chunk_columns``); measured on 2 and 4 H200s (bench/all_reduce_rmsnorm_bench.py).

Workspace rows are ``ws_stride`` elements apart, hidden rounded up to 16 elements, so every row
starts 16-byte aligned and peer loads are 16 bytes wide.
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...memory.protocol import MAX_PROGRAMS
from ..launch import CachedLauncher, int_key, ptr_key
from ..peer_tiles import peer_ptr, stage_rows, sum_tile
from ..sync import finish_call, peer_barrier, start_call, wait_tagged

MAX_HIDDEN = 32768  # one row lives in registers: BLOCK_H fp32 values per program


def check_rmsnorm_operands(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           what: str) -> int:
    """The operand contract of a residual add + RMSNorm over rows (this file's kernels and the SPD
    block's local one), after each tensor's own dtype/device/contiguity checks: x [..., hidden],
    residual x's shape and dtype, weight [hidden] of x's dtype, hidden <= MAX_HIDDEN, eps >= 0.
    Raises a ValueError naming the argument; returns hidden."""
    if x.dim() == 0:
        raise ValueError(f"{what}: x must be [..., hidden], got a 0-d tensor")
    hidden = x.shape[-1]
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"{what}: residual must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                         f"got {tuple(residual.shape)} and {residual.dtype}")
    if weight.shape != (hidden,) or weight.dtype != x.dtype:
        raise ValueError(f"{what}: weight must be [hidden] = [{hidden}] of x's dtype {x.dtype}, "
                         f"got {tuple(weight.shape)} and {weight.dtype}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"{what}: hidden size {hidden} exceeds the supported {MAX_HIDDEN}")
    if not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"{what}: eps must be a finite number >= 0, got {eps!r}")
    return hidden


@triton.jit
def _normalise(h, rstd, weight):
    """RMSNorm's last step, in one place: the owner of a row and every rank that gathers it compute
    exactly the same fp32 products, so ``out`` is bitwise equal on all ranks."""
    return h * rstd * weight


@triton.jit
def _reduce_norm_row(table_ptr, buf, row, ws_stride, residual_ptr, weight, out_ptr, res_out_ptr, hidden, eps,
                     cols, cmask, ok, WORLD: tl.constexpr, DTYPE: tl.constexpr):
    """Flat, one row: sum the staged row of every rank (fp32, rank order), add the residual,
    RMSNorm; stores ``out`` and ``residual_out`` (both NaN when ``ok`` is False: the call failed)."""
    total = sum_tile(table_ptr, buf, row * ws_stride + cols, cmask & ok, WORLD, DTYPE)
    res = tl.load(residual_ptr + row * hidden + cols, mask=cmask, other=0.0).to(tl.float32)
    h = (total + res).to(DTYPE).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
    y = tl.where(ok, _normalise(h, rstd, weight), float("nan")).to(DTYPE)
    h = tl.where(ok, h, float("nan")).to(DTYPE)
    tl.store(out_ptr + row * hidden + cols, y, mask=cmask)
    tl.store(res_out_ptr + row * hidden + cols, h, mask=cmask)


# Arguments whose values do not shape the code: Triton need not specialise (and recompile) on them.
_NOT_SPECIALISED = ["error_record_addr", "rank", "sig", "buffer_bytes", "timeout_iters"]


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def flat_rmsnorm_kernel(
    x_ptr,          # [tokens, hidden] this rank's partial sums (rows contiguous: row stride = hidden)
    residual_ptr,   # [tokens, hidden] residual stream, equal on every rank
    weight_ptr,     # [hidden] RMSNorm weight
    out_ptr,        # [tokens, hidden] normalised output; may be x or residual
    res_out_ptr,    # [tokens, hidden] residual + sum; may be x or residual
    table_ptr,      # int64[WORLD]: every rank's workspace base address, in this process
    error_record_addr,  # int64: address of this rank's int32[4] error record (memory/protocol.py)
    tokens,         # rows
    hidden,         # columns, and the row stride of the four [tokens, hidden] tensors
    ws_stride,      # row stride in the workspace (hidden rounded up to 16 elements)
    eps,            # RMSNorm epsilon
    rank,           # this rank
    sig,            # 31-bit call signature, equal on all ranks for a well-formed call
    buffer_bytes,   # bytes of one epoch buffer
    timeout_iters,  # barrier polls before giving up
    WORLD: tl.constexpr, WORLD_P2: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    own, epoch, flag, ok, buf = start_call(table_ptr, rank, sig, buffer_bytes)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < hidden
    if ok:
        # Rows p, p + G, ...: the rows that this program reads back from every rank below.
        stage_rows(x_ptr, peer_ptr(table_ptr, rank, buf, DTYPE), 0, tokens, hidden, ws_stride, cols, cmask,
                   pid, nprog)
    ok = peer_barrier(table_ptr, rank, 0, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)
    weight = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for row in range(pid, tokens, nprog):
        _reduce_norm_row(table_ptr, buf, row, ws_stride, residual_ptr, weight, out_ptr, res_out_ptr, hidden, eps,
                         cols, cmask, ok, WORLD, DTYPE)
    finish_call(own, epoch)


@triton.jit
def _row_rstd(slots, row, C, epoch, hidden, eps, own, error_record_addr, timeout_iters, C_P2: tl.constexpr):
    """rsqrt(mean square + eps) of ``row`` from the partial sums of squares of its C chunks, once all
    are published in this call (NaN if the wait failed). Summed in chunk order: deterministic."""
    idx = tl.arange(0, C_P2)
    words, arrived = wait_tagged(slots + row * C + idx, idx < C, epoch, own, error_record_addr, timeout_iters)
    partial = (words >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    ssq = tl.sum(tl.where(idx < C, partial, 0.0), axis=0)
    return tl.where(arrived, tl.rsqrt(ssq / hidden + eps), float("nan"))


@triton.jit
def _shard_items(s, R, tokens, C):
    """Work items of shard s (rows [s*R, min((s+1)*R, tokens)), C chunks each; none if empty)."""
    return tl.maximum(tl.minimum(R, tokens - s * R), 0) * C


@triton.jit
def _item(q, first_row, C, hidden, BLOCK_C: tl.constexpr):
    """Work item q of the shard that starts at ``first_row``: (its row, its columns, their bound)."""
    cols = (q % C) * BLOCK_C + tl.arange(0, BLOCK_C)
    return first_row + q // C, cols, cols < hidden


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def tree_rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, res_out_ptr,  # as in flat_rmsnorm_kernel
    table_ptr, error_record_addr, tokens, hidden, ws_stride, eps, rank, sig, buffer_bytes, timeout_iters,
    rows_per_rank,  # R: rank r owns rows [r*R, min((r+1)*R, tokens)) (the last ones short or empty)
    WORLD: tl.constexpr, WORLD_P2: tl.constexpr,
    BLOCK_C: tl.constexpr,  # columns of one chunk: a work item is one chunk of one row
    C_P2: tl.constexpr,     # next_pow2(cdiv(hidden, BLOCK_C)): chunks per row, rounded up
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    own, epoch, flag, ok, buf = start_call(table_ptr, rank, sig, buffer_bytes)
    C = tl.cdiv(hidden, BLOCK_C)
    # Our epoch buffer: the staged x rows (row i at i*ws_stride; our own rows are overwritten with
    # residual_out), then int64 slots[tokens * C] (partial sums of squares, local), then fp32
    # rstd[tokens * C] (one copy per chunk, read by the peers' program that gathers the chunk).
    mine = peer_ptr(table_ptr, rank, buf, DTYPE)
    rows_bytes = tokens * ws_stride * DTYPE.primitive_bitwidth // 8
    slots = (own + buf + rows_bytes).to(tl.pointer_type(tl.int64))
    rstd_off = buf + rows_bytes + tl.cdiv(tokens * C * 8, 16) * 16
    if ok:
        for s in tl.static_range(WORLD):  # with the map the owner of shard s reduces with
            for q in range(pid, _shard_items(s, rows_per_rank, tokens, C), nprog):
                row, cols, m = _item(q, s * rows_per_rank, C, hidden, BLOCK_C)
                tl.store(mine + row * ws_stride + cols, tl.load(x_ptr + row * hidden + cols, mask=m), mask=m)
    ok = peer_barrier(table_ptr, rank, 0, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)

    # Reduce-scatter of our rows, chunk by chunk: residual_out, and each chunk's sum of squares
    # published with this call's epoch in one 64-bit word (no flag to order it after).
    lo = rank * rows_per_rank
    n_own = _shard_items(rank, rows_per_rank, tokens, C)
    for q in range(pid, n_own, nprog):
        row, cols, m = _item(q, lo, C, hidden, BLOCK_C)
        total = sum_tile(table_ptr, buf, row * ws_stride + cols, m & ok, WORLD, DTYPE)
        res = tl.load(residual_ptr + row * hidden + cols, mask=m, other=0.0).to(tl.float32)
        h = tl.where(ok, total + res, float("nan")).to(DTYPE)
        tl.store(res_out_ptr + row * hidden + cols, h, mask=m)
        tl.store(mine + row * ws_stride + cols, h, mask=m)
        h32 = h.to(tl.float32)
        partial = tl.sum(tl.where(m, h32 * h32, 0.0), axis=0)
        bits = partial.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        tl.atomic_xchg(slots + row * C + q % C, (bits << 32) | epoch, sem="relaxed", scope="gpu")
    # Normalise our rows once every chunk of the row is in (the chunks of a row are other programs').
    for q in range(pid, n_own, nprog):
        row, cols, m = _item(q, lo, C, hidden, BLOCK_C)
        rstd = _row_rstd(slots, row, C, epoch, hidden, eps, own, error_record_addr, timeout_iters, C_P2)
        h = tl.load(mine + row * ws_stride + cols, mask=m, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * hidden + cols, _normalise(h, rstd, w).to(DTYPE), mask=m)
        tl.store(peer_ptr(table_ptr, rank, rstd_off, tl.float32) + row * C + q % C, rstd)
    ok = peer_barrier(table_ptr, rank, 1, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)

    # All-gather: the chunks that the other ranks' program p published.
    for i in tl.static_range(1, WORLD):
        s = (rank + i) % WORLD
        theirs = peer_ptr(table_ptr, s, buf, DTYPE)
        their_rstd = peer_ptr(table_ptr, s, rstd_off, tl.float32)
        for q in range(pid, _shard_items(s, rows_per_rank, tokens, C), nprog):
            row, cols, m = _item(q, s * rows_per_rank, C, hidden, BLOCK_C)
            h = tl.load(theirs + row * ws_stride + cols, mask=m & ok, other=float("nan"))
            rstd = tl.load(their_rstd + row * C + q % C, mask=ok, other=float("nan"))
            w = tl.load(weight_ptr + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(res_out_ptr + row * hidden + cols, h, mask=m)
            tl.store(out_ptr + row * hidden + cols, _normalise(h.to(tl.float32), rstd, w).to(DTYPE), mask=m)
    finish_call(own, epoch)


_launch_flat = CachedLauncher(flat_rmsnorm_kernel)
_launch_tree = CachedLauncher(tree_rmsnorm_kernel)


def workspace_stride(hidden: int) -> int:
    """Elements between workspace rows: hidden rounded up to 16, so that rows start 16-byte aligned."""
    return -(-hidden // 16) * 16


def max_rows(hidden: int, element_size: int, buffer_bytes: int, algo: str, block_c: int = 0) -> int:
    """Rows one call can take: the flat kernel stages x; the tree kernel also keeps a 64-bit slot and
    an fp32 rstd per chunk of ``block_c`` columns (plus 16 bytes of alignment), in one epoch buffer.
    0 when not even one row fits."""
    row_bytes = workspace_stride(hidden) * element_size
    if algo == "flat":
        return buffer_bytes // row_bytes
    return max(0, buffer_bytes - 16) // (row_bytes + 12 * -(-hidden // block_c))


def chunk_columns(hidden: int, rows_per_rank: int, programs: int) -> int:
    """Columns per work item of the tree kernel (a power of two): rows_per_rank * hidden split into
    about one chunk per program, so that all SMs pull data, but at least 512 columns (16-byte loads
    for 4 warps) and at most the whole row."""
    full = triton.next_power_of_2(hidden)
    return min(full, max(512, triton.next_power_of_2(-(-rows_per_rank * hidden // max(1, programs)))))


@dataclass(frozen=True)
class RMSNormConfig:
    """Launch grid of a fused call: at most ``programs`` programs (fewer when a launch has fewer
    work items: rows for flat, row chunks for tree) of ``warps`` warps; ``block_c`` columns per work
    item of the tree kernel (0 for flat, whose items are whole rows)."""

    programs: int
    warps: int
    block_c: int


@functools.lru_cache(maxsize=1024)
def rmsnorm_config(algo: str, tokens: int, hidden: int, world: int, sm_count: int,
                   interpret: bool = False) -> RMSNormConfig:
    """The grid of a fused call on [tokens, hidden]: a pure function of the shape and the SM count.

    Flat: ~16 elements per thread (4 to 16 warps), up to one program per SM. Tree: about one chunk
    of a row per SM (``chunk_columns``), 8 elements per thread. Interpreter: programs run one after
    another and a tree program waits for the other chunks of its row, so one program; 32-column
    chunks there, so that the CPU tests cover rows split into chunks.
    """
    if algo not in ("flat", "tree"):
        raise ValueError(f"rmsnorm_config: algo must be 'flat' or 'tree', got {algo!r}")
    most = min(sm_count, MAX_PROGRAMS)
    if algo == "flat":
        return RMSNormConfig(2, 1, 0) if interpret else RMSNormConfig(
            most, min(16, max(4, triton.next_power_of_2(hidden) // 512)), 0)
    if interpret:
        return RMSNormConfig(1, 1, 32)
    block_c = chunk_columns(hidden, -(-tokens // world), most)
    return RMSNormConfig(most, max(1, min(16, block_c // 256)), block_c)


def work_items(algo: str, tokens: int, hidden: int, world: int, block_c: int) -> int:
    """Work items of one launch on ``tokens`` rows: rows (flat) or the row chunks of the largest
    shard (tree); programs beyond that idle."""
    return tokens if algo == "flat" else -(-tokens // world) * -(-hidden // block_c)


def launch_all_reduce_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              out: torch.Tensor, residual_out: torch.Tensor, table: torch.Tensor,
                              error_record_addr: int, rank: int, world: int, sig: int, eps: float,
                              buffer_bytes: int, timeout_iters: int, algo: str, config: RMSNormConfig) -> None:
    """Launch one fused call on contiguous [tokens, hidden] x, residual, out, residual_out and [hidden]
    weight; ``tokens`` at most ``max_rows(hidden, x.element_size(), buffer_bytes, algo, config.block_c)``;
    algo "flat" or "tree"; the grid is ``config`` capped at the launch's ``work_items``."""
    tokens, hidden = x.shape
    eps = float(eps)  # an int would make Triton compile an integer argument
    ws_stride = workspace_stride(hidden)
    programs = max(1, min(config.programs, work_items(algo, tokens, hidden, world, config.block_c)))
    args = (x, residual, weight, out, residual_out, table, error_record_addr, tokens, hidden, ws_stride, eps, rank,
            sig, buffer_bytes, timeout_iters)
    consts = {"WORLD": world, "WORLD_P2": triton.next_power_of_2(world)}
    key = (*(ptr_key(t) for t in (x, residual, weight, out, residual_out)), int_key(tokens), int_key(hidden),
           int_key(ws_stride), int_key(error_record_addr), int_key(buffer_bytes), int_key(timeout_iters))
    if algo == "tree":
        rows_per_rank = -(-tokens // world)
        consts.update(BLOCK_C=config.block_c, C_P2=triton.next_power_of_2(-(-hidden // config.block_c)))
        _launch_tree((*key, int_key(rows_per_rank)), programs, (*args, rows_per_rank), consts, config.warps)
    else:
        consts["BLOCK_H"] = triton.next_power_of_2(hidden)
        _launch_flat(key, programs, args, consts, config.warps)
