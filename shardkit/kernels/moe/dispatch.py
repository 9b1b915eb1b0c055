"""MoE dispatch: every token pushed once into each destination rank's receive rows (SM stores into
peer memory, the fastest way to write a peer measured here: 366 GB/s with both GPUs sending).

Program p of G (G equal on every rank) serves the destinations in turn, starting at rank p mod W
(so that the local copy and the pushes to the peers overlap across programs). For destination r it
first writes the payload: a work item is ``item_chunks`` chunks of BLOCK_H channels of BLOCK_T tokens
(their rows looked up once), items p, p + G, ..., each token into row ``send_base[r] + chunk_base[chunk,
r] + chunk_pos[t, r]`` of r's receive rows (layout.py, counts.py). Then the metadata of its blocks of
META_T tokens (block G-1-p, 2G-1-p, ...: the last programs, which get fewer payload items) that go to r,
into the same rows: source rank and index, the top-k weights, and per top-k slot the expert's local index
on r and its expert-major row there (-1 where the expert lives elsewhere), plus the expert-major index
entry (that row -> receive row) and ``inv[rank][t]`` (the receive row, or -1 for tokens not sent to r),
which the combine follows back.
One barrier at the end: when a rank's launch has finished, every peer's program has pushed all its
rows to it.

fp8 (DeepSeek-V3 style): each group of 128 channels is scaled by amax / 448 and rounded to e4m3;
the receiver gets the bytes and one fp32 scale per group (half the bytes of bf16 on the wire).
"""
import torch
import triton
import triton.language as tl

from ..launch import CachedLauncher, ptr_key
from ..peer_tiles import peer_ptr
from ..sync import finish_call, peer_barrier, start_call
from .workspace import SCALE_GROUP, RoundBuffers, int_keys

E4M3_MAX = 448.0
_E4M3_MAX = tl.constexpr(E4M3_MAX)
_SCALE_GROUP = tl.constexpr(SCALE_GROUP)


@triton.jit
def round_to_e4m3(v):
    """``v`` (fp32) clamped to +-448 and rounded to the nearest e4m3 value (ties to even), still fp32.

    Converting an e4m3 value to fp8 is then exact. The interpreter's own fp32 -> fp8 conversion gets
    ties and carries into the next binade wrong (31.4 -> 16); the GPU's cvt.rn gives the same
    result as this, so the kernel takes one path everywhere.
    """
    v = tl.minimum(tl.maximum(v, -_E4M3_MAX), _E4M3_MAX)
    bits = v.to(tl.int32, bitcast=True)
    # Normal numbers: keep 3 of fp32's 23 mantissa bits, rounding to nearest even.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Below 2**-6 e4m3 is subnormal: multiples of 2**-9; the 1.5 * 2**23 trick rounds to even.
    sub = ((tl.abs(v) * 512.0 + 12582912.0) - 12582912.0) / 512.0
    return tl.where(tl.abs(v) < 0.015625, tl.where(v < 0, -sub, sub), normal)


@triton.jit
def _rows(t, r, tokens, chunk, base, mask_ptr, chunk_base_ptr, chunk_pos_ptr, WORLD: tl.constexpr):
    """For tokens ``t`` (a block): whether each goes to rank r, and its receive row there (all three
    loads at once: the row's parts are in bounds for every token, used only where it is sent)."""
    live = t < tokens
    sent = live & (((tl.load(mask_ptr + t, mask=live, other=0) >> r) & 1) != 0)
    row = (base + tl.load(chunk_base_ptr + (t // chunk) * WORLD + r, mask=live, other=0)
           + tl.load(chunk_pos_ptr + t * WORLD + r, mask=live, other=0))
    return sent, row


@triton.jit(do_not_specialize=["error_record_addr", "rank", "sig", "buffer_bytes", "timeout_iters", "tokens", "chunk",
                               "item_chunks"])
def moe_dispatch_kernel(
    x_ptr,             # [T, hidden] this rank's tokens (row stride hidden)
    topk_ptr,          # [T, K] expert ids (row stride K)
    weights_ptr,       # [T, K] top-k weights (row stride K)
    expert_rank_ptr,   # int32[E]
    expert_local_ptr,  # int32[E]: index of each expert among its rank's experts
    mask_ptr, chunk_pos_ptr, slot_pos_ptr,  # from layout.py
    chunk_base_ptr, chunk_expert_base_ptr, send_base_ptr, expert_base_ptr,  # from counts.py
    table_ptr, error_record_addr, rank, sig, buffer_bytes, timeout_iters,  # the protocol's
    tokens,            # T
    chunk,             # tokens per layout chunk
    item_chunks,       # chunks of BLOCK_H channels per payload item
    hidden, experts, max_tokens,
    recv_x_off, row_elems, recv_scales_off, scale_groups,  # workspace layout (workspace.py)
    src_rank_off, src_token_off, local_expert_off, weight_off, expert_row_off, inv_off, expert_index_off,
    K: tl.constexpr, K_P2: tl.constexpr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, META_T: tl.constexpr, FP8: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    GROUP: tl.constexpr = _SCALE_GROUP if FP8 else BLOCK_H
    GROUPS: tl.constexpr = BLOCK_H // GROUP
    PAYLOAD: tl.constexpr = tl.float8e4nv if FP8 else DTYPE
    own, epoch, flag, ok, _ = start_call(table_ptr, rank, sig, buffer_bytes)
    n_chunks = tl.cdiv(hidden, BLOCK_H)
    n_items = tl.cdiv(n_chunks, item_chunks)  # items per block of tokens
    n_blocks = tl.cdiv(tokens, BLOCK_T)
    n_meta = tl.cdiv(tokens, META_T)
    # A chunk of BLOCK_H channels as [GROUPS, GROUP] (one fp8 scale per group), for BLOCK_T tokens.
    grid_cols = tl.arange(0, GROUPS)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    offs_t = tl.arange(0, BLOCK_T)
    offs_m = tl.arange(0, META_T)
    ks = tl.arange(0, K_P2)
    # Destinations in turn, starting at a different one in each program, so that the local copy and the
    # pushes to every peer overlap across programs.
    for j in tl.static_range(WORLD):
        r = (pid + j) % WORLD
        base = tl.load(send_base_ptr + r)
        if ok:
            # Payload first (its rows' lookup then waits for no metadata stores): item_chunks chunks of
            # BLOCK_H channels of BLOCK_T tokens per item. Each item's rows are looked up one item ahead
            # (an L2 round trip), overlapping the previous item's payload.
            n = n_blocks * n_items
            t_next = (pid // n_items) * BLOCK_T + offs_t
            sent_next, row_next = _rows(t_next, r, tl.where(pid < n, tokens, 0), chunk, base, mask_ptr, chunk_base_ptr,
                                        chunk_pos_ptr, WORLD)
            recv = peer_ptr(table_ptr, r, recv_x_off, PAYLOAD)
            if FP8:
                scales = peer_ptr(table_ptr, r, recv_scales_off, tl.float32)
            for item in range(pid, n, nprog):
                block = item // n_items
                t = block * BLOCK_T + offs_t
                sent, row = sent_next, row_next
                t_next = ((item + nprog) // n_items) * BLOCK_T + offs_t
                sent_next, row_next = _rows(t_next, r, tl.where(item + nprog < n, tokens, 0), chunk, base, mask_ptr,
                                            chunk_base_ptr, chunk_pos_ptr, WORLD)
                c0 = (item - block * n_items) * item_chunks
                c1 = tl.minimum(c0 + item_chunks, n_chunks)
                # Each chunk is loaded one chunk ahead: a load in flight while the previous chunk is stored.
                cols_next = c0 * BLOCK_H + grid_cols
                v_next = tl.load(x_ptr + t[:, None, None] * hidden + cols_next[None, :, :],
                                 mask=sent[:, None, None] & (cols_next < hidden)[None, :, :], other=0.0)
                for c in range(c0, c1):
                    cols = c * BLOCK_H + grid_cols
                    m = sent[:, None, None] & (cols < hidden)[None, :, :]
                    v = v_next
                    cols_next = cols + BLOCK_H
                    v_next = tl.load(x_ptr + t[:, None, None] * hidden + cols_next[None, :, :],
                                     mask=(sent & (c + 1 < c1))[:, None, None] & (cols_next < hidden)[None, :, :],
                                     other=0.0)
                    if FP8:
                        # IEEE divisions (Triton's ``/`` is approximate on GPUs): the same bits as quantize_e4m3
                        scale = tl.div_rn(tl.maximum(tl.max(tl.abs(v.to(tl.float32)), axis=2), 1e-12), _E4M3_MAX)
                        v = round_to_e4m3(tl.div_rn(v.to(tl.float32), scale[:, :, None]))
                        groups = c * GROUPS + tl.arange(0, GROUPS)
                        tl.store(scales + row[:, None] * scale_groups + groups[None, :], scale,
                                 mask=sent[:, None] & (groups < scale_groups)[None, :])
                    tl.store(recv + row.to(tl.int64)[:, None, None] * row_elems + cols[None, :, :], v.to(PAYLOAD),
                             mask=m)
            # Then the metadata of blocks of META_T tokens, from the last program down (the first ones get the
            # extra payload items); inv[rank][t] = the row, or -1 if not sent.
            inv = peer_ptr(table_ptr, r, inv_off, tl.int32) + rank * max_tokens
            src_ranks = peer_ptr(table_ptr, r, src_rank_off, tl.int32)
            src_tokens = peer_ptr(table_ptr, r, src_token_off, tl.int32)
            locals_ = peer_ptr(table_ptr, r, local_expert_off, tl.int32)
            weights = peer_ptr(table_ptr, r, weight_off, tl.float32)
            expert_rows = peer_ptr(table_ptr, r, expert_row_off, tl.int32)
            index = peer_ptr(table_ptr, r, expert_index_off, tl.int32)
            for block in range(nprog - 1 - pid, n_meta, nprog):
                # Every load below depends on the token indices or on the ids alone (two levels of
                # round trips): a valid id's tables are in bounds whether or not the token goes to r,
                # and an expert on r implies that the token is sent to r.
                t = block * META_T + offs_m
                pair = (t < tokens)[:, None] & (ks[None, :] < K)
                ids = tl.load(topk_ptr + t[:, None] * K + ks[None, :], mask=pair, other=-1).to(tl.int32)
                w = tl.load(weights_ptr + t[:, None] * K + ks[None, :], mask=pair, other=0.0)
                sent, row = _rows(t, r, tokens, chunk, base, mask_ptr, chunk_base_ptr, chunk_pos_ptr, WORLD)
                valid = pair & (ids >= 0) & (ids < experts)
                here = valid & (tl.load(expert_rank_ptr + ids, mask=valid, other=-1) == r)
                local = tl.load(expert_local_ptr + ids, mask=valid, other=-1)
                erow = (tl.load(expert_base_ptr + ids, mask=valid, other=0)
                        + tl.load(chunk_expert_base_ptr + (t // chunk)[:, None] * experts + ids, mask=valid, other=0)
                        + tl.load(slot_pos_ptr + t[:, None] * K + ks[None, :], mask=valid, other=0))
                tl.store(inv + t, tl.where(sent, row, -1), mask=t < tokens)
                tl.store(src_ranks + row, tl.zeros([META_T], tl.int32) + rank, mask=sent)
                tl.store(src_tokens + row, t, mask=sent)
                slot = sent[:, None] & (ks[None, :] < K)
                slots = row[:, None] * K + ks[None, :]
                tl.store(locals_ + slots, tl.where(here, local, -1), mask=slot)
                tl.store(weights + slots, w.to(tl.float32), mask=slot)
                tl.store(expert_rows + slots, tl.where(here, erow, -1), mask=slot)
                tl.store(index + erow, row[:, None] + tl.zeros([META_T, K_P2], tl.int32), mask=here)
    ok = peer_barrier(table_ptr, rank, 0, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)
    finish_call(own, epoch)


_launch = CachedLauncher(moe_dispatch_kernel)


def launch_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, b: RoundBuffers,
                    table: torch.Tensor, error_record_addr: int, rank: int, world: int, sig: int, buffer_bytes: int,
                    timeout_iters: int, chunk: int, ws, fp8: bool, programs: int, block_t: int, block_h: int,
                    meta_t: int, item_chunks: int, num_warps: int) -> None:
    """Push ``x [T, hidden]`` to the ranks its ``topk_idx`` select, with the round's layout and offsets
    in ``b``; ``ws``: the MoeWorkspace."""
    tokens, hidden = x.shape
    consts = {"K": ws.topk, "K_P2": triton.next_power_of_2(ws.topk), "WORLD": world,
              "WORLD_P2": triton.next_power_of_2(world), "BLOCK_T": block_t, "BLOCK_H": block_h, "META_T": meta_t,
              "FP8": fp8}
    ints = (hidden, ws.experts, ws.max_tokens, ws.recv_x_off, ws.row_elems, ws.recv_scales_off, ws.scale_groups,
            ws.src_rank_off, ws.src_token_off, ws.local_expert_off, ws.weight_off, ws.expert_row_off, ws.inv_off,
            ws.expert_index_off)
    key = (ptr_key(x), ptr_key(topk_idx), ptr_key(topk_weights), int_keys(ints))
    _launch(key, programs,
            (x, topk_idx, topk_weights, b.expert_rank, b.expert_local, b.mask, b.chunk_pos, b.slot_pos, b.chunk_base,
             b.chunk_expert_base, b.send_base, b.expert_base, table, error_record_addr, rank, sig, buffer_bytes,
             timeout_iters, tokens, chunk, item_chunks, *ints), consts, num_warps)
