"""MoE combine: each received token's local experts reduced once on the expert side, one row per
(token, source rank) pushed back, and the source's sum over ranks in rank order, in one launch with
no barrier: the source sums each item as soon as its peers' rows for it have landed.

Work items: ``item_chunks`` consecutive chunks of BLOCK_H channels of a block of BLOCK_T tokens,
numbered ``block * n_items + i`` (every rank numbers a source's items alike). The G programs have
two roles (``pushers`` of them push, the rest sum), so that NVLink pushes and the HBM-bound sums run
at the same time on different SMs (a program's stores cannot run ahead of the fabric: within one
program the two kinds of work would only take turns):

  pushers (programs 0 .. P-1): for every peer s (in turn from a different one per program) and s's
    items q, q + P, ...: for the tokens sent here (``inv[s][t] >= 0``, row i), ``sum over k in
    order of weight[i, k] * expert_out[expert_row[i, k]]`` in fp32 over the slots whose expert
    lives here, pushed in x's dtype to row (rank, t) of s's ``comb`` region; then the call's flag
    into word (rank, item) of s's ``comb_flag`` (a release: the rows land first).
  summers (programs G - S .. G-1, S = G - P): for this rank's own items q, q + S, ...: per chunk
    ``residual + sum over ranks r in mask[t], in order 0..W-1, of partial_r[t]`` (fp32) into ``out``
    in x's dtype, where partial_rank is computed here as the pushers compute theirs (rounded to x's
    dtype as a pushed row is) and the others are the peers' ``comb`` rows, read once every peer's
    flag for the item has come (the item's first own partial is computed before that wait).

With P = G (``pushers == programs``) the roles are not split: every program pushes its items, then
sums its own items q = pid, pid + G, ... (S = G). With few tokens (a program has one or two items)
that halves the chain of items a program runs one after another, which costs more there than the
overlap of the two kinds of work gains (at 128 tokens a round is a few microseconds of data).

Pushers never wait, and a summer waits only for other ranks' pushers of lower or equal program id
(split: the pushers are the lower ids; P = G: item q's pusher is program q, which pushed before it
waits): in the interpreter, whose programs run one after another, nothing waits for a program that
cannot run. A rank that rejected its combine input (``skip``) pushes nothing but still flags every
item, with its other signature: its peers' summers see the mismatch and fail the round instead of
waiting.
An item's receive rows (or token masks) are loaded one item ahead (their L2 round trip overlaps the
previous item); expert rows and weights, per chunk, are L1 hits after the first chunk. With STAGES > 1
the chunk loops are software-pipelined (Triton's ``tl.range(num_stages=)``, cp.async into shared
memory; the expert tiles depend on the expert-row indices, so 2 stages fetch only the indices a chunk
ahead and 3 the tiles too, more bytes in flight per SM); a summer then waits for the item's flag
before its chunk loop (the pipeline's first loads, of the peers' rows too, are issued where the loop
starts), with STAGES = 1 after its first own partial.
Every rank reduces in a fixed order whatever the arrival order, so the output is bitwise the same
from run to run. A token with no expert gets the residual (or zeros). NaN where the round failed.
"""
import torch
import triton
import triton.language as tl

from ..launch import CachedLauncher, ptr_key
from ..peer_tiles import peer_ptr
from ...memory.protocol import MAX_PROGRAMS
from ..sync import finish_call, start_call, wait_flags
from .workspace import int_keys

_ITEM_WAIT_SLOT = tl.constexpr(2 * MAX_PROGRAMS)  # + program id: the error record's slot of an item wait


@triton.jit
def _item_tokens(base_ptr, item, n, n_items, tokens, bound, offs_t, other, BLOCK_T: tl.constexpr):
    """``base_ptr[t]`` for item ``item`` (>= 0)'s tokens (``other`` past the last token or item). The
    load is masked by ``bound`` (the array's length) alone, so it need not wait for ``tokens`` or ``n``
    (loaded values, which only select the result)."""
    t = (item // n_items) * BLOCK_T + offs_t
    v = tl.load(base_ptr + t, mask=t < bound, other=other)
    return tl.where((t < tokens) & (item < n), v, other)


@triton.jit
def _partial(expert_out_ptr, expert_rows, weights, i, cols, hidden, K: tl.constexpr, BLOCK_T: tl.constexpr,
             BLOCK_H: tl.constexpr):
    """fp32 ``sum over k in order of weight[i, k] * expert_out[expert_row[i, k], cols]`` for receive rows
    ``i`` (-1: none), over the slots whose expert lives here (expert row >= 0)."""
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    m = (i >= 0)[:, None] & (cols < hidden)[None, :]
    for k in tl.static_range(K):
        row = tl.load(expert_rows + i * K + k, mask=i >= 0, other=-1)
        w = tl.load(weights + i * K + k, mask=i >= 0, other=0.0)  # beside row, not after it
        v = tl.load(expert_out_ptr + row.to(tl.int64)[:, None] * hidden + cols[None, :],
                    mask=m & (row >= 0)[:, None], other=0.0)
        acc += w[:, None] * v.to(tl.float32)
    return acc


@triton.jit(do_not_specialize=["error_record_addr", "rank", "sig", "buffer_bytes", "timeout_iters", "tokens",
                               "skip", "item_chunks", "pushers"])
def moe_combine_kernel(
    expert_out_ptr,   # [rows, hidden] expert outputs in this rank's expert-major order (row stride hidden)
    residual_ptr,     # [T, hidden] added to the output (read only when HAS_RESIDUAL)
    out_ptr,          # out [T, hidden]
    mask_ptr,         # int32[T] from this round's layout
    src_tokens_ptr,   # int32[WORLD]: each source's tokens, from this round's counts exchange
    table_ptr, error_record_addr, rank, sig, buffer_bytes, timeout_iters,  # the protocol's
    tokens,           # T (this rank's)
    skip,             # 1: push nothing, only flag (this rank rejected its input; see ``sig``)
    item_chunks,      # chunks of BLOCK_H channels per item
    pushers,          # programs that push: >= 1, < programs (the rest sum), or == programs (all push, then sum)
    hidden, max_tokens,
    inv_off, weight_off, expert_row_off, comb_off, comb_elems, comb_flag_off,
    flag_items,       # workspace.py
    K: tl.constexpr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    own, epoch, flag, ok, _ = start_call(table_ptr, rank, sig, buffer_bytes)
    n_chunks = tl.cdiv(hidden, BLOCK_H)
    n_items = tl.cdiv(n_chunks, item_chunks)  # items per block of tokens
    offs_t = tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    inv = peer_ptr(table_ptr, rank, inv_off, tl.int32)
    weights = peer_ptr(table_ptr, rank, weight_off, tl.float32)
    expert_rows = peer_ptr(table_ptr, rank, expert_row_off, tl.int32)
    summers = tl.where(pushers >= nprog, nprog, nprog - pushers)
    q = pid - (nprog - summers)
    n_own = tl.cdiv(tokens, BLOCK_T) * n_items
    # The first summed item's token masks and rows, loaded beside start_call's loads (and, with no role
    # split, in flight during the pushes).
    bits_next = _item_tokens(mask_ptr, tl.maximum(q, 0), n_own, n_items, tokens, max_tokens, offs_t, 0, BLOCK_T)
    i_next = _item_tokens(inv + rank * max_tokens, tl.maximum(q, 0), n_own, n_items, tokens, max_tokens, offs_t, -1,
                          BLOCK_T)
    if pid < pushers:
        for j in tl.static_range(WORLD - 1):
            s = (rank + 1 + (pid + j) % (WORLD - 1)) % WORLD  # the peers in turn, from one per program
            back = peer_ptr(table_ptr, s, comb_off, DTYPE) + rank.to(tl.int64) * max_tokens * comb_elems
            flags = peer_ptr(table_ptr, s, comb_flag_off, tl.int64) + rank * flag_items
            src_tokens = tl.load(src_tokens_ptr + s)
            n = tl.cdiv(src_tokens, BLOCK_T) * n_items
            # Issued before the ``ok`` test: the first item's rows need not wait for start_call's loads.
            p_next = _item_tokens(inv + s * max_tokens, pid, n, n_items, src_tokens, max_tokens, offs_t, -1, BLOCK_T)
            if ok:
                for item in range(pid, n, pushers):
                    i = tl.where(skip == 0, p_next, -1)
                    p_next = _item_tokens(inv + s * max_tokens, item + pushers, n, n_items, src_tokens, max_tokens,
                                          offs_t, -1, BLOCK_T)
                    block = item // n_items
                    t = block * BLOCK_T + offs_t
                    c0 = (item - block * n_items) * item_chunks
                    for c in tl.range(c0, tl.minimum(c0 + item_chunks, n_chunks), num_stages=STAGES):
                        cols = c * BLOCK_H + offs_h
                        acc = _partial(expert_out_ptr, expert_rows, weights, i, cols, hidden, K, BLOCK_T, BLOCK_H)
                        tl.store(back + t.to(tl.int64)[:, None] * comb_elems + cols[None, :], acc.to(DTYPE),
                                 mask=(i >= 0)[:, None] & (cols < hidden)[None, :])
                    tl.debug_barrier()  # the whole block's rows before the flag's release
                    tl.atomic_xchg(flags + item, flag, sem="release", scope="sys")
    if q >= 0:
        ranks = tl.arange(0, WORLD_P2)
        is_peer = (ranks < WORLD) & (ranks != rank)
        comb = peer_ptr(table_ptr, rank, comb_off, DTYPE)
        my_flags = peer_ptr(table_ptr, rank, comb_flag_off, tl.int64) + ranks * flag_items
        for item in range(q, n_own, summers):
            bits, i = bits_next, i_next
            bits_next = _item_tokens(mask_ptr, item + summers, n_own, n_items, tokens, max_tokens, offs_t, 0, BLOCK_T)
            i_next = _item_tokens(inv + rank * max_tokens, item + summers, n_own, n_items, tokens, max_tokens, offs_t,
                                  -1, BLOCK_T)
            block = item // n_items
            t = block * BLOCK_T + offs_t
            c0 = (item - block * n_items) * item_chunks
            if STAGES > 1:  # every peer's rows of this item, before the pipeline's first loads
                if ok:
                    ok = wait_flags(my_flags + item, is_peer, flag, own, error_record_addr, timeout_iters,
                                    pid + _ITEM_WAIT_SLOT, WORLD_P2)
            for c in tl.range(c0, tl.minimum(c0 + item_chunks, n_chunks), num_stages=STAGES):
                cols = c * BLOCK_H + offs_h
                m = (t < tokens)[:, None] & (cols < hidden)[None, :]
                # Own partial first: on the item's first chunk it is computed while the peers' rows travel.
                mine = _partial(expert_out_ptr, expert_rows, weights, tl.where(ok, i, -1), cols, hidden, K, BLOCK_T,
                                BLOCK_H).to(DTYPE).to(tl.float32)  # rounded as a pushed row is
                if STAGES == 1:
                    if ok & (c == c0):  # every peer's rows of this item
                        ok = wait_flags(my_flags + item, is_peer, flag, own, error_record_addr, timeout_iters,
                                        pid + _ITEM_WAIT_SLOT, WORLD_P2)
                if HAS_RESIDUAL:
                    acc = tl.load(residual_ptr + t[:, None] * hidden + cols[None, :], mask=m, other=0.0).to(tl.float32)
                else:
                    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
                for r in tl.static_range(WORLD):
                    got = ((bits >> r) & 1) != 0
                    if r == rank:
                        acc += tl.where(got[:, None], mine, 0.0)
                    else:
                        rows = (r * max_tokens + t).to(tl.int64)  # 64-bit offsets: the region may exceed 2**31
                        acc += tl.load(comb + rows[:, None] * comb_elems + cols[None, :],
                                       mask=m & (ok & got)[:, None], other=0.0).to(tl.float32)
                tl.store(out_ptr + t[:, None] * hidden + cols[None, :], tl.where(ok, acc, float("nan")).to(DTYPE),
                         mask=m)
    finish_call(own, epoch)


_launch = CachedLauncher(moe_combine_kernel)


def combine_pushers(programs: int, world: int, pushers: int) -> tuple[int, int]:
    """(grid, pushing programs) of the combine: ``pushers`` of ``programs`` (0: the peers' share of the
    work, (W-1)/W), at least one of each role (two programs when ``programs`` is 1); ``pushers >=
    programs``: every program pushes, then sums (``(programs, programs)``)."""
    if pushers >= programs:
        return programs, programs
    grid = max(2, programs)
    if pushers <= 0:
        pushers = grid * (world - 1) // world
    return grid, max(1, min(grid - 1, pushers))


def launch_combine(expert_out: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor, mask: torch.Tensor,
                   src_tokens: torch.Tensor, table: torch.Tensor, error_record_addr: int, rank: int, world: int,
                   sig: int, buffer_bytes: int, timeout_iters: int, ws, skip: bool, programs: int, pushers: int,
                   block_t: int, block_h: int, item_chunks: int, num_warps: int, stages: int) -> None:
    """Combine into ``out [T, hidden]``; ``ws``: the MoeWorkspace (see the module); ``programs`` and
    ``pushers`` from ``combine_pushers``; ``stages``: the chunk loops' pipeline stages."""
    tokens, hidden = out.shape
    consts = {"K": ws.topk, "WORLD": world, "WORLD_P2": triton.next_power_of_2(world), "BLOCK_T": block_t,
              "BLOCK_H": block_h, "HAS_RESIDUAL": residual is not None, "STAGES": stages}
    ints = (hidden, ws.max_tokens, ws.inv_off, ws.weight_off, ws.expert_row_off,
            ws.comb_off, ws.comb_elems, ws.comb_flag_off, ws.flag_items)
    res = residual if residual is not None else out
    key = (ptr_key(expert_out), ptr_key(res), ptr_key(out), int_keys(ints))
    _launch(key, programs, (expert_out, res, out, mask, src_tokens, table, error_record_addr, rank, sig, buffer_bytes,
                            timeout_iters, tokens, int(skip), item_chunks, pushers, *ints), consts, num_warps)
