"""MoE counts exchange: the dynamic-gating "size all-to-all" over peer memory (one program per rank).

Huang et al. 2024 replace a static expert capacity with a small exchange of counts, so that nothing
is padded. Here every rank writes its counts row (tokens, flags, tokens to each rank, (token, k)
pairs to each expert) into row ``rank`` of every rank's counts region, passes one barrier, and then
holds the whole matrix locally. From it, each rank computes by itself (all in device memory, so a
CUDA graph replays it with new routings):

    chunk_base[p, r], chunk_expert_base[p, e]   exclusive scans of its layout's chunk counts (the
                      order of its own rows to each rank and of its own pairs to each expert)
    send_base[r]      its first row in rank r's receive rows: tokens that ranks < rank send to r
    expert_base[e]    its first row in e's expert-major block on e's rank: that rank's earlier
                      experts (each padded to ``align`` rows) + pairs that ranks < rank send to e
    recv_counts[s], recv_offsets[s]   rows this rank receives from source s, and where they start
    expert_offsets[l], expert_counts[l]   this rank's expert-major blocks (offsets[L_P2] = end)
    recv_info         [rows received, expert-major rows (padded)]

and fills the padding rows of its expert-major index with -1. All ranks check the same matrix, so
they agree on a failure: an id outside [-1, E) on some rank (BAD_EXPERT_ID), input its host rejected
(BAD_INPUT: that rank takes part with no tokens, so nobody waits for it), or a receive capacity
exceeded (RECV_OVERFLOW); the error is recorded on every rank and the later launches of the round
skip their work (their outputs are NaN).
"""
import torch
import triton
import triton.language as tl

from ..launch import CachedLauncher
from ..peer_tiles import peer_ptr
from ..sync import finish_call, peer_barrier, record_error, start_call
from .workspace import BAD_EXPERT_ID, BAD_INPUT, FLAG_BAD_IDS, FLAG_BAD_INPUT, RECV_OVERFLOW, RoundBuffers, int_keys

_FLAG_BAD_IDS = tl.constexpr(FLAG_BAD_IDS)
_FLAG_BAD_INPUT = tl.constexpr(FLAG_BAD_INPUT)
_BAD_EXPERT_ID = tl.constexpr(BAD_EXPERT_ID)
_BAD_INPUT = tl.constexpr(BAD_INPUT)
_RECV_OVERFLOW = tl.constexpr(RECV_OVERFLOW)


@triton.jit
def _rank_bits(cond, ranks):
    """Bitmask of the ranks where ``cond`` holds."""
    return tl.sum(tl.where(cond, 1 << ranks, 0), axis=0)


@triton.jit(do_not_specialize=["error_record_addr", "rank", "sig", "buffer_bytes", "timeout_iters", "n_chunks",
                               "tokens", "input_error"])
def moe_counts_kernel(
    table_ptr, error_record_addr, rank, sig, buffer_bytes, timeout_iters,  # the protocol's (see flat.py)
    chunk_counts_ptr,   # int32[n_chunks, WORLD] from the layout launch
    chunk_bad_ptr,      # int32[n_chunks]
    chunk_experts_ptr,  # int32[n_chunks, E]: pairs per chunk and expert, from the layout launch
    l2g_ptr,            # int32[WORLD, L_P2]: global id of rank r's local expert l, -1 past its last
    chunk_base_ptr,     # out int32[n_chunks, WORLD]
    chunk_expert_base_ptr,  # out int32[n_chunks, E]
    send_base_ptr,      # out int32[WORLD]
    expert_base_ptr,    # out int32[E]
    recv_counts_ptr,    # out int32[WORLD]
    recv_offsets_ptr,   # out int32[WORLD]
    expert_offsets_ptr,  # out int32[L_P2 + 1]
    expert_counts_ptr,  # out int32[L_P2]
    recv_info_ptr,      # out int32[2]
    n_chunks, tokens, input_error,
    experts, align, recv_rows, expert_rows,  # E, expert-major block alignment, capacities
    counts_off, counts_row, expert_index_off,  # workspace layout (bytes / int32 words)
    WORLD: tl.constexpr, WORLD_P2: tl.constexpr, CHUNKS_P2: tl.constexpr, E_P2: tl.constexpr,
    L_P2: tl.constexpr, ALIGN_P2: tl.constexpr, CHUNK_BLOCK: tl.constexpr,
):
    own, epoch, flag, ok, _ = start_call(table_ptr, rank, sig, buffer_bytes)
    ranks = tl.arange(0, WORLD_P2)
    is_rank = ranks < WORLD
    chunks = tl.arange(0, CHUNKS_P2)
    cmask = (chunks[:, None] < n_chunks) & is_rank[None, :]
    per_chunk = tl.load(chunk_counts_ptr + chunks[:, None] * WORLD + ranks[None, :], mask=cmask, other=0)
    tl.store(chunk_base_ptr + chunks[:, None] * WORLD + ranks[None, :], tl.cumsum(per_chunk, axis=0) - per_chunk,
             mask=cmask)
    sent = tl.sum(per_chunk, axis=0)
    bad_ids = tl.max(tl.load(chunk_bad_ptr + chunks, mask=chunks < n_chunks, other=0), axis=0)
    flags = tl.where(bad_ids != 0, _FLAG_BAD_IDS, 0) | tl.where(input_error != 0, _FLAG_BAD_INPUT, 0)
    ex = tl.arange(0, E_P2)
    pairs = tl.zeros([E_P2], tl.int32)  # ours to each expert, summed over the chunks in order
    for c0 in range(0, n_chunks, CHUNK_BLOCK):
        cs = c0 + tl.arange(0, CHUNK_BLOCK)
        m = (cs < n_chunks)[:, None] & (ex < experts)[None, :]
        tile = tl.load(chunk_experts_ptr + cs[:, None] * experts + ex[None, :], mask=m, other=0)
        tl.store(chunk_expert_base_ptr + cs[:, None] * experts + ex[None, :],
                 tl.cumsum(tile, axis=0) - tile + pairs[None, :], mask=m)
        pairs += tl.sum(tile, axis=0)

    if ok:  # our counts row into every rank's counts region
        for r in tl.static_range(WORLD):
            row = peer_ptr(table_ptr, r, counts_off, tl.int32) + rank * counts_row
            tl.store(row, tokens)
            tl.store(row + 1, flags)
            tl.store(row + 4 + ranks, sent, mask=is_rank)
            tl.store(row + 4 + WORLD + ex, pairs, mask=ex < experts)
    ok = peer_barrier(table_ptr, rank, 0, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)

    counts = peer_ptr(table_ptr, rank, counts_off, tl.int32)
    src = ranks  # rows of the matrix are sources, columns destinations
    tok = tl.load(counts + src[:, None] * counts_row + 4 + ranks[None, :],
                  mask=is_rank[:, None] & is_rank[None, :], other=0)
    src_flags = tl.load(counts + src * counts_row + 1, mask=is_rank, other=0)
    wanted = tl.sum(tok, axis=0)  # rows each rank would receive

    # Expert-major blocks of every rank (each rank's experts in local order, padded to ``align``).
    lx = tl.arange(0, L_P2)
    gid = tl.load(l2g_ptr + ranks[:, None] * L_P2 + lx[None, :], mask=is_rank[:, None], other=-1)
    has = gid >= 0
    total = tl.zeros([WORLD_P2, L_P2], tl.int32)
    earlier = tl.zeros([WORLD_P2, L_P2], tl.int32)  # pairs from sources before us
    for s in tl.static_range(WORLD):
        c = tl.load(counts + s * counts_row + 4 + WORLD + gid, mask=has, other=0)
        total += c
        earlier += tl.where(s < rank, c, 0)
    padded = (total + align - 1) // align * align
    start = tl.cumsum(padded, axis=1) - padded
    expert_rows_wanted = tl.sum(padded, axis=1)

    bad_input = _rank_bits((src_flags & _FLAG_BAD_INPUT) != 0, src)
    bad_id = _rank_bits((src_flags & _FLAG_BAD_IDS) != 0, src)
    overflow = _rank_bits(is_rank & ((wanted > recv_rows) | (expert_rows_wanted > expert_rows)), ranks)
    code = tl.where(bad_input != 0, _BAD_INPUT, tl.where(bad_id != 0, _BAD_EXPERT_ID,
                                                          tl.where(overflow != 0, _RECV_OVERFLOW, 0)))
    if ok & (code != 0):
        culprits = tl.where(bad_input != 0, bad_input, tl.where(bad_id != 0, bad_id, overflow))
        record_error(own, error_record_addr, code, tl.max(tl.where(is_rank, wanted, 0), axis=0), culprits, epoch)
    ok = ok & (code == 0)

    tl.store(send_base_ptr + ranks, tl.sum(tl.where(src[:, None] < rank, tok, 0), axis=0), mask=is_rank)
    mine = tl.sum(tl.where(ranks[None, :] == rank, tok, 0), axis=1)  # rows from each source
    tl.store(recv_counts_ptr + src, mine, mask=is_rank)
    tl.store(recv_offsets_ptr + src, tl.cumsum(mine, axis=0) - mine, mask=is_rank)
    tl.store(expert_base_ptr + gid, start + earlier, mask=has)
    here = ranks[:, None] == rank
    my_start = tl.sum(tl.where(here, start, 0), axis=0)
    my_total = tl.sum(tl.where(here, total, 0), axis=0)
    my_end = tl.sum(tl.where(ranks == rank, expert_rows_wanted, 0), axis=0)
    tl.store(expert_offsets_ptr + lx, my_start)
    tl.store(expert_offsets_ptr + L_P2, my_end)
    tl.store(expert_counts_ptr + lx, my_total)
    tl.store(recv_info_ptr, tl.sum(mine, axis=0))
    tl.store(recv_info_ptr + 1, my_end)
    if ok & (align > 1):  # padding rows of our expert-major index: -1 (no receive row)
        pad = tl.arange(0, ALIGN_P2)
        my_padded = tl.sum(tl.where(here, padded, 0), axis=0)
        where = my_start[:, None] + my_total[:, None] + pad[None, :]
        index = peer_ptr(table_ptr, rank, expert_index_off, tl.int32)
        tl.store(index + where, tl.full([L_P2, ALIGN_P2], -1, tl.int32),
                 mask=pad[None, :] < (my_padded - my_total)[:, None])
    finish_call(own, epoch)


_launch = CachedLauncher(moe_counts_kernel)


def launch_counts(table: torch.Tensor, error_record_addr: int, rank: int, world: int, sig: int, buffer_bytes: int,
                  timeout_iters: int, b: RoundBuffers, n_chunks: int, tokens: int, input_error: int, align: int, ws,
                  num_warps: int) -> None:
    """One counts exchange (see the module) from the layout's outputs in ``b`` into ``b``; ``ws``: the
    MoeWorkspace."""
    experts = b.expert_rank.numel()
    consts = {"WORLD": world, "WORLD_P2": triton.next_power_of_2(world),
              "CHUNKS_P2": triton.next_power_of_2(b.chunk_counts.shape[0]), "E_P2": triton.next_power_of_2(experts),
              "L_P2": b.l2g.shape[1], "ALIGN_P2": triton.next_power_of_2(align), "CHUNK_BLOCK": 16}
    ints = (experts, align, ws.recv_rows, ws.expert_rows, ws.counts_off, ws.counts_row, ws.expert_index_off)
    _launch(int_keys(ints), 1,
            (table, error_record_addr, rank, sig, buffer_bytes, timeout_iters, b.chunk_counts, b.chunk_bad,
             b.chunk_experts, b.l2g, b.chunk_base, b.chunk_expert_base, b.send_base, b.expert_base, b.recv_counts,
             b.recv_offsets, b.expert_offsets, b.expert_counts, b.recv_info, n_chunks, tokens, input_error, *ints),
            consts, num_warps)
