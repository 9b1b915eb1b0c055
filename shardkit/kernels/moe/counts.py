"""MoE layout + counts exchange: where each token goes (layout.py, one chunk per program), then the
dynamic-gating "size all-to-all" over peer memory, in one launch.

Program p lays out chunk p of the tokens; the last program of the launch to finish (an acq_rel
counter: it sees every chunk's outputs) does the exchange on behalf of the launch, with the peers'
last programs (a barrier at a fixed slot, whatever its program id). In the interpreter the last
program is p = G-1 on every rank, which runs after the others: nothing waits for a program of its
own launch. (The layout was a launch of its own before: one launch and a kernel gap fewer.)

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

from ..launch import CachedLauncher, ptr_key
from ..peer_tiles import peer_ptr
from ..sync import finish_call, launch_barrier, record_error, start_call
from .layout import layout_chunk
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


@triton.jit(do_not_specialize=["error_record_addr", "rank", "sig", "buffer_bytes", "timeout_iters", "tokens",
                               "chunk", "input_error"])
def moe_counts_kernel(
    table_ptr, error_record_addr, rank, sig, buffer_bytes, timeout_iters,  # the protocol's (see flat.py)
    topk_ptr,           # [T, K] int32/int64 expert ids, -1 = no expert (row stride K)
    expert_rank_ptr,    # int32[E]: rank holding each expert
    mask_ptr, chunk_pos_ptr, slot_pos_ptr,  # out: the layout's per-token outputs (layout.py)
    chunk_counts_ptr,   # out int32[n_chunks, WORLD]: the layout's per-chunk outputs (n_chunks = programs)
    chunk_bad_ptr,      # out int32[n_chunks]
    chunk_experts_ptr,  # out int32[n_chunks, E]
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
    src_tokens_ptr,     # out int32[WORLD]: each source's tokens (the combine's copy of the counts column)
    tokens, chunk, input_error,  # T, tokens per layout program, 1: this rank's host rejected its input
    experts, align, recv_rows, expert_rows,  # E, expert-major block alignment, capacities
    counts_off, counts_row, expert_index_off,  # workspace layout (bytes / int32 words)
    K: tl.constexpr, K_P2: tl.constexpr, BLOCK_T: tl.constexpr,
    WORLD: tl.constexpr, WORLD_P2: tl.constexpr, CHUNKS_P2: tl.constexpr, E_P2: tl.constexpr,
    L_P2: tl.constexpr, ALIGN_P2: tl.constexpr, CHUNK_BLOCK: tl.constexpr,
):
    own, epoch, flag, ok, _ = start_call(table_ptr, rank, sig, buffer_bytes)
    n_chunks = tl.num_programs(0)
    layout_chunk(topk_ptr, expert_rank_ptr, mask_ptr, chunk_pos_ptr, slot_pos_ptr, chunk_counts_ptr,
                 chunk_experts_ptr, chunk_bad_ptr, tl.program_id(0), tokens, chunk, experts, K, K_P2, WORLD, WORLD_P2,
                 E_P2, BLOCK_T)
    tl.debug_barrier()  # the whole block's layout stores before the counter's release
    if finish_call(own, epoch):
        _exchange(table_ptr, error_record_addr, rank, epoch, flag, ok, own, timeout_iters, chunk_counts_ptr,
                  chunk_bad_ptr, chunk_experts_ptr, l2g_ptr, chunk_base_ptr, chunk_expert_base_ptr, send_base_ptr,
                  expert_base_ptr, recv_counts_ptr, recv_offsets_ptr, expert_offsets_ptr, expert_counts_ptr,
                  recv_info_ptr, src_tokens_ptr, n_chunks, tokens, input_error, experts, align, recv_rows,
                  expert_rows, counts_off, counts_row, expert_index_off, WORLD, WORLD_P2, CHUNKS_P2, E_P2, L_P2,
                  ALIGN_P2, CHUNK_BLOCK)


@triton.jit
def _exchange(table_ptr, error_record_addr, rank, epoch, flag, ok, own, timeout_iters, chunk_counts_ptr,
              chunk_bad_ptr, chunk_experts_ptr, l2g_ptr, chunk_base_ptr, chunk_expert_base_ptr, send_base_ptr,
              expert_base_ptr, recv_counts_ptr, recv_offsets_ptr, expert_offsets_ptr, expert_counts_ptr, recv_info_ptr,
              src_tokens_ptr, n_chunks, tokens, input_error, experts, align, recv_rows, expert_rows, counts_off,
              counts_row, expert_index_off, WORLD: tl.constexpr, WORLD_P2: tl.constexpr, CHUNKS_P2: tl.constexpr,
              E_P2: tl.constexpr, L_P2: tl.constexpr, ALIGN_P2: tl.constexpr, CHUNK_BLOCK: tl.constexpr):
    """The exchange, by the launch's last program (see the module)."""
    ranks = tl.arange(0, WORLD_P2)
    is_rank = ranks < WORLD
    chunks = tl.arange(0, CHUNKS_P2)
    cmask = (chunks[:, None] < n_chunks) & is_rank[None, :]
    # Loads first, stores after them (the compiler keeps loads behind earlier stores it cannot tell apart).
    per_chunk = tl.load(chunk_counts_ptr + chunks[:, None] * WORLD + ranks[None, :], mask=cmask, other=0)
    bad_ids = tl.max(tl.load(chunk_bad_ptr + chunks, mask=chunks < n_chunks, other=0), axis=0)
    lx = tl.arange(0, L_P2)  # the placement's local -> global table: ours, loaded before the barrier
    gid = tl.load(l2g_ptr + ranks[:, None] * L_P2 + lx[None, :], mask=is_rank[:, None], other=-1)
    sent = tl.sum(per_chunk, axis=0)
    flags = tl.where(bad_ids != 0, _FLAG_BAD_IDS, 0) | tl.where(input_error != 0, _FLAG_BAD_INPUT, 0)
    ex = tl.arange(0, E_P2)
    pairs = tl.zeros([E_P2], tl.int32)  # ours to each expert, summed over the chunks in order
    # 3 stages: the next tile loads while this one is scanned (with 2, one shared-memory buffer, its copy
    # starts only after this tile is scanned and stored: sm_90 SASS)
    for c0 in tl.range(0, n_chunks, CHUNK_BLOCK, num_stages=3):
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
    tl.store(chunk_base_ptr + chunks[:, None] * WORLD + ranks[None, :], tl.cumsum(per_chunk, axis=0) - per_chunk,
             mask=cmask)
    ok = launch_barrier(table_ptr, rank, 0, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)

    counts = peer_ptr(table_ptr, rank, counts_off, tl.int32)
    src = ranks  # rows of the matrix are sources, columns destinations
    tok = tl.load(counts + src[:, None] * counts_row + 4 + ranks[None, :],
                  mask=is_rank[:, None] & is_rank[None, :], other=0)
    src_flags = tl.load(counts + src * counts_row + 1, mask=is_rank, other=0)
    tl.store(src_tokens_ptr + src, tl.load(counts + src * counts_row, mask=is_rank, other=0), mask=is_rank)
    wanted = tl.sum(tok, axis=0)  # rows each rank would receive

    # Expert-major blocks of every rank (each rank's experts in local order, padded to ``align``).
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


_launch = CachedLauncher(moe_counts_kernel)


def launch_counts(topk_idx: torch.Tensor, table: torch.Tensor, error_record_addr: int, rank: int, world: int,
                  sig: int, buffer_bytes: int, timeout_iters: int, b: RoundBuffers, programs: int, chunk: int,
                  block_t: int, input_error: int, align: int, ws, num_warps: int) -> None:
    """Layout of ``topk_idx [T, K]`` over ``programs`` chunks of ``chunk`` tokens (blocks of ``block_t``) and
    one counts exchange (see the module), into ``b``; ``ws``: the MoeWorkspace."""
    tokens, k = topk_idx.shape
    experts = b.expert_rank.numel()
    consts = {"K": k, "K_P2": triton.next_power_of_2(k), "BLOCK_T": block_t, "WORLD": world,
              "WORLD_P2": triton.next_power_of_2(world), "CHUNKS_P2": triton.next_power_of_2(b.chunk_counts.shape[0]),
              "E_P2": triton.next_power_of_2(experts), "L_P2": b.l2g.shape[1],
              "ALIGN_P2": triton.next_power_of_2(align), "CHUNK_BLOCK": 16}
    ints = (experts, align, ws.recv_rows, ws.expert_rows, ws.counts_off, ws.counts_row, ws.expert_index_off)
    _launch((ptr_key(topk_idx), int_keys(ints)), programs,
            (table, error_record_addr, rank, sig, buffer_bytes, timeout_iters, topk_idx, b.expert_rank, b.mask,
             b.chunk_pos, b.slot_pos, b.chunk_counts, b.chunk_bad, b.chunk_experts, b.l2g, b.chunk_base,
             b.chunk_expert_base, b.send_base, b.expert_base, b.recv_counts, b.recv_offsets, b.expert_offsets,
             b.expert_counts, b.recv_info, b.src_tokens, tokens, chunk, input_error, *ints), consts, num_warps)
