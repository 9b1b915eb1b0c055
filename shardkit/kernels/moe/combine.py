"""MoE combine: each received token's local experts reduced once on the expert side, one row per
(token, source rank) pushed back, and the source's sum over ranks in rank order.

Program p of G (G equal on every rank; an item is ``item_chunks`` consecutive chunks of BLOCK_H
channels of a block of BLOCK_T tokens, numbered ``block * n_items + i``; program p takes items
p, p + G, ...):
  1. as a receiver, for every source s (in turn from s = p mod W, as the dispatch: at any time some
     programs push over NVLink while others compute this rank's own partials from HBM; a program's
     stores cannot run ahead of the fabric, so the two kinds of work overlap only across programs)
     and each of s's items of program p, for the tokens sent here (``inv[s][t] >= 0``, row i):
     ``sum over k in order of weight[i, k] * expert_out[expert_row[i, k]]`` in fp32, over the slots
     whose expert lives here; pushed in x's
     dtype to row (rank, t) of s's ``comb`` region;
  2. barrier with the peers' program p, which pushed to us exactly the items that we read next;
  3. as the source, for its own items of program p: ``residual + sum over ranks r in mask[t], in
     order 0..W-1, of comb[r][t]`` (fp32), stored in x's dtype.
An item's receive rows (or token masks) are loaded once for its chunks, one item ahead (each chunk's
loads wait on them: their L2 round trip overlaps the previous item's loads); the expert rows and
weights, per chunk, are L1 hits after the first chunk.
Every rank reduces in a fixed order whatever the arrival order, so the output is bitwise the same
from run to run. A token with no expert gets the residual (or zeros). NaN where the round failed.
"""
import torch
import triton
import triton.language as tl

from ..launch import CachedLauncher, ptr_key
from ..peer_tiles import peer_ptr
from ..sync import finish_call, peer_barrier, start_call
from .workspace import int_keys


@triton.jit
def _recv_rows(inv_ptr, item, n, n_items, src_tokens, offs_t, BLOCK_T: tl.constexpr):
    """Receive rows of item ``item``'s tokens of a source (-1: not sent here, or no such item)."""
    t = (item // n_items) * BLOCK_T + offs_t
    return tl.load(inv_ptr + t, mask=(t < src_tokens) & (item < n), other=-1)


@triton.jit
def _token_bits(mask_ptr, item, n, n_items, tokens, offs_t, BLOCK_T: tl.constexpr):
    """Destination-rank masks of item ``item``'s tokens (0 past the last)."""
    t = (item // n_items) * BLOCK_T + offs_t
    return tl.load(mask_ptr + t, mask=(t < tokens) & (item < n), other=0)


@triton.jit(do_not_specialize=["error_record_addr", "rank", "sig", "buffer_bytes", "timeout_iters", "tokens",
                               "skip", "item_chunks"])
def moe_combine_kernel(
    expert_out_ptr,   # [rows, hidden] expert outputs in this rank's expert-major order (row stride hidden)
    residual_ptr,     # [T, hidden] added to the output (read only when HAS_RESIDUAL)
    out_ptr,          # out [T, hidden]
    mask_ptr,         # int32[T] from this round's layout
    table_ptr, error_record_addr, rank, sig, buffer_bytes, timeout_iters,  # the protocol's
    tokens,           # T (this rank's)
    skip,             # 1: do no work, only arrive (this rank rejected its input; see ``sig``)
    item_chunks,      # chunks of BLOCK_H channels per item
    hidden, max_tokens,
    counts_off, counts_row, inv_off, weight_off, expert_row_off, comb_off, comb_elems,  # workspace.py
    K: tl.constexpr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    own, epoch, flag, ok, _ = start_call(table_ptr, rank, sig, buffer_bytes)
    n_chunks = tl.cdiv(hidden, BLOCK_H)
    n_items = tl.cdiv(n_chunks, item_chunks)  # items per block of tokens
    offs_t = tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    if ok & (skip == 0):
        counts = peer_ptr(table_ptr, rank, counts_off, tl.int32)
        inv = peer_ptr(table_ptr, rank, inv_off, tl.int32)
        weights = peer_ptr(table_ptr, rank, weight_off, tl.float32)
        expert_rows = peer_ptr(table_ptr, rank, expert_row_off, tl.int32)
        for j in tl.static_range(WORLD):
            s = (pid + j) % WORLD  # sources in turn from a different one per program (see the module)
            back = peer_ptr(table_ptr, s, comb_off, DTYPE) + rank.to(tl.int64) * max_tokens * comb_elems
            src_tokens = tl.load(counts + s * counts_row)
            n = tl.cdiv(src_tokens, BLOCK_T) * n_items
            # Each item's receive rows are fetched one item ahead: their L2 round trip overlaps the
            # previous item's loads instead of adding to the chain (rows -> expert rows -> data).
            i_next = _recv_rows(inv + s * max_tokens, pid, n, n_items, src_tokens, offs_t, BLOCK_T)
            for item in range(pid, n, nprog):
                i = i_next
                i_next = _recv_rows(inv + s * max_tokens, item + nprog, n, n_items, src_tokens, offs_t, BLOCK_T)
                block = item // n_items
                t = block * BLOCK_T + offs_t
                c0 = (item - block * n_items) * item_chunks
                for c in range(c0, tl.minimum(c0 + item_chunks, n_chunks)):
                    cols = c * BLOCK_H + offs_h
                    m = (i >= 0)[:, None] & (cols < hidden)[None, :]
                    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
                    for k in tl.static_range(K):
                        row = tl.load(expert_rows + i * K + k, mask=i >= 0, other=-1)
                        w = tl.load(weights + i * K + k, mask=i >= 0, other=0.0)  # beside row, not after it
                        v = tl.load(expert_out_ptr + row.to(tl.int64)[:, None] * hidden + cols[None, :],
                                    mask=m & (row >= 0)[:, None], other=0.0)
                        acc += w[:, None] * v.to(tl.float32)
                    tl.store(back + t.to(tl.int64)[:, None] * comb_elems + cols[None, :], acc.to(DTYPE), mask=m)
    ok = peer_barrier(table_ptr, rank, 0, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)
    comb = peer_ptr(table_ptr, rank, comb_off, DTYPE)
    n = tl.cdiv(tokens, BLOCK_T) * n_items
    bits_next = _token_bits(mask_ptr, pid, n, n_items, tokens, offs_t, BLOCK_T)  # one item ahead, as above
    for item in range(pid, n, nprog):
        bits = bits_next
        bits_next = _token_bits(mask_ptr, item + nprog, n, n_items, tokens, offs_t, BLOCK_T)
        block = item // n_items
        t = block * BLOCK_T + offs_t
        c0 = (item - block * n_items) * item_chunks
        for c in range(c0, tl.minimum(c0 + item_chunks, n_chunks)):
            cols = c * BLOCK_H + offs_h
            m = (t < tokens)[:, None] & (cols < hidden)[None, :]
            if HAS_RESIDUAL:
                acc = tl.load(residual_ptr + t[:, None] * hidden + cols[None, :], mask=m, other=0.0).to(tl.float32)
            else:
                acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
            for r in tl.static_range(WORLD):
                got = ok & (((bits >> r) & 1) != 0)
                rows = (r * max_tokens + t).to(tl.int64)  # 64-bit offsets: the region may exceed 2**31 elements
                acc += tl.load(comb + rows[:, None] * comb_elems + cols[None, :], mask=m & got[:, None],
                               other=0.0).to(tl.float32)
            tl.store(out_ptr + t[:, None] * hidden + cols[None, :], tl.where(ok, acc, float("nan")).to(DTYPE), mask=m)
    finish_call(own, epoch)


_launch = CachedLauncher(moe_combine_kernel)


def launch_combine(expert_out: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor, mask: torch.Tensor,
                   table: torch.Tensor, error_record_addr: int, rank: int, world: int, sig: int, buffer_bytes: int,
                   timeout_iters: int, ws, skip: bool, programs: int, block_t: int, block_h: int, item_chunks: int,
                   num_warps: int) -> None:
    """Combine into ``out [T, hidden]``; ``ws``: the MoeWorkspace (see the module)."""
    tokens, hidden = out.shape
    consts = {"K": ws.topk, "WORLD": world, "WORLD_P2": triton.next_power_of_2(world), "BLOCK_T": block_t,
              "BLOCK_H": block_h, "HAS_RESIDUAL": residual is not None}
    ints = (hidden, ws.max_tokens, ws.counts_off, ws.counts_row, ws.inv_off, ws.weight_off, ws.expert_row_off,
            ws.comb_off, ws.comb_elems)
    res = residual if residual is not None else out
    key = (ptr_key(expert_out), ptr_key(res), ptr_key(out), int_keys(ints))
    _launch(key, programs, (expert_out, res, out, mask, table, error_record_addr, rank, sig, buffer_bytes,
                            timeout_iters, tokens, int(skip), item_chunks, *ints), consts, num_warps)
