"""MoE dispatch: every token pushed once into each destination rank's receive rows (SM stores into
peer memory, the fastest way to write a peer measured here: 366 GB/s with both GPUs sending).

Program p of G (G equal on every rank) first sends the metadata of tokens p, p + G, ...: to each
rank r in the token's mask (layout.py), into row ``send_base[r] + chunk_base[chunk, r] +
chunk_pos[t, r]`` (counts.py): source rank and index, the top-k weights, and per top-k slot the
expert's local index on r and its expert-major row there (-1 where the expert lives elsewhere); the
expert-major index entry (that row -> receive row); and to every rank ``inv[rank][t]`` (the receive
row, or -1), which the combine follows back. Then the payload: a work item is one chunk of BLOCK_H
channels of one token, items p, p + G, ... One barrier at the end: when a rank's launch has
finished, every peer's program has pushed all its rows to it.

fp8 (DeepSeek-V3 style): each group of 128 channels is scaled by amax / 448 and rounded to e4m3;
the receiver gets the bytes and one fp32 scale per group (half the bytes of bf16 on the wire).
"""
import torch
import triton
import triton.language as tl

from ..launch import CachedLauncher, int_key, ptr_key
from ..peer_tiles import peer_ptr
from ..sync import finish_call, peer_barrier, start_call
from .workspace import SCALE_GROUP

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
def _rows(t, chunk, send_base_ptr, chunk_base_ptr, chunk_pos_ptr, ranks, is_rank, WORLD: tl.constexpr):
    """Token t's receive row on every rank (garbage where it is not sent)."""
    return (tl.load(send_base_ptr + ranks, mask=is_rank, other=0)
            + tl.load(chunk_base_ptr + (t // chunk) * WORLD + ranks, mask=is_rank, other=0)
            + tl.load(chunk_pos_ptr + t * WORLD + ranks, mask=is_rank, other=0))


@triton.jit(do_not_specialize=["error_record_addr", "rank", "sig", "buffer_bytes", "timeout_iters", "tokens", "chunk"])
def moe_dispatch_kernel(
    x_ptr,             # [T, hidden] this rank's tokens (row stride hidden)
    topk_ptr,          # [T, K] expert ids (row stride K)
    weights_ptr,       # [T, K] top-k weights (row stride K)
    expert_rank_ptr,   # int32[E]
    expert_local_ptr,  # int32[E]: index of each expert among its rank's experts
    mask_ptr, chunk_pos_ptr, slot_pos_ptr,  # from layout.py
    chunk_base_ptr, send_base_ptr, expert_base_ptr,  # from counts.py
    table_ptr, error_record_addr, rank, sig, buffer_bytes, timeout_iters,  # the protocol's
    tokens,            # T
    chunk,             # tokens per layout chunk
    hidden, experts, max_tokens,
    recv_x_off, row_elems, recv_scales_off, scale_groups,  # workspace layout (workspace.py)
    src_rank_off, src_token_off, local_expert_off, weight_off, expert_row_off, inv_off, expert_index_off,
    K: tl.constexpr, K_P2: tl.constexpr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr,
    BLOCK_H: tl.constexpr, FP8: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    GROUP: tl.constexpr = _SCALE_GROUP if FP8 else BLOCK_H
    GROUPS: tl.constexpr = BLOCK_H // GROUP
    PAYLOAD: tl.constexpr = tl.float8e4nv if FP8 else DTYPE
    own, epoch, flag, ok, _ = start_call(table_ptr, rank, sig, buffer_bytes)
    n_chunks = tl.cdiv(hidden, BLOCK_H)
    grid_cols = tl.arange(0, GROUPS)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GROUPS, GROUP]
    ranks = tl.arange(0, WORLD_P2)
    is_rank = ranks < WORLD
    ks = tl.arange(0, K_P2)
    is_k = ks < K
    if ok:
        # Metadata, once per token and destination.
        for t in range(pid, tokens, nprog):
            bits = tl.load(mask_ptr + t)
            rows = _rows(t, chunk, send_base_ptr, chunk_base_ptr, chunk_pos_ptr, ranks, is_rank, WORLD)
            ids = tl.load(topk_ptr + t * K + ks, mask=is_k, other=-1).to(tl.int32)
            valid = is_k & (ids >= 0) & (ids < experts)
            dest = tl.load(expert_rank_ptr + ids, mask=valid, other=-1)
            local = tl.load(expert_local_ptr + ids, mask=valid, other=-1)
            erow = (tl.load(expert_base_ptr + ids, mask=valid, other=0)
                    + tl.load(slot_pos_ptr + t * K + ks, mask=is_k, other=0))
            w = tl.load(weights_ptr + t * K + ks, mask=is_k, other=0.0).to(tl.float32)
            # inv[rank][t] on every rank: the row it got, or -1 (one vector store over the peers)
            bases = tl.load(table_ptr + ranks, mask=is_rank, other=0)
            inv = (bases + inv_off + (rank * max_tokens + t) * 4).to(tl.pointer_type(tl.int32))
            tl.store(inv, tl.where(((bits >> ranks) & 1) != 0, rows, -1), mask=is_rank)
            for r in tl.static_range(WORLD):
                if ((bits >> r) & 1) != 0:
                    row = tl.sum(tl.where(ranks == r, rows, 0), axis=0)
                    here = valid & (dest == r)
                    tl.store(peer_ptr(table_ptr, r, src_rank_off, tl.int32) + row, rank)
                    tl.store(peer_ptr(table_ptr, r, src_token_off, tl.int32) + row, t)
                    slots = row * K + ks
                    tl.store(peer_ptr(table_ptr, r, local_expert_off, tl.int32) + slots, tl.where(here, local, -1),
                             mask=is_k)
                    tl.store(peer_ptr(table_ptr, r, weight_off, tl.float32) + slots, w, mask=is_k)
                    tl.store(peer_ptr(table_ptr, r, expert_row_off, tl.int32) + slots, tl.where(here, erow, -1),
                             mask=is_k)
                    tl.store(peer_ptr(table_ptr, r, expert_index_off, tl.int32) + erow,
                             tl.zeros([K_P2], tl.int32) + row, mask=here)
        # Payload, one chunk of one token per item.
        for item in range(pid, tokens * n_chunks, nprog):
            t = item // n_chunks
            c = item - t * n_chunks
            bits = tl.load(mask_ptr + t)
            rows = _rows(t, chunk, send_base_ptr, chunk_base_ptr, chunk_pos_ptr, ranks, is_rank, WORLD)
            cols = c * BLOCK_H + grid_cols
            cmask = cols < hidden
            v = tl.load(x_ptr + t * hidden + cols, mask=cmask, other=0.0)
            if FP8:
                scale = tl.maximum(tl.max(tl.abs(v.to(tl.float32)), axis=1), 1e-12) / _E4M3_MAX
                payload = round_to_e4m3(v.to(tl.float32) / scale[:, None]).to(PAYLOAD)
                groups = c * GROUPS + tl.arange(0, GROUPS)
            else:
                payload = v
            for r in tl.static_range(WORLD):
                if ((bits >> r) & 1) != 0:
                    row = tl.sum(tl.where(ranks == r, rows, 0), axis=0)
                    dst = peer_ptr(table_ptr, r, recv_x_off, PAYLOAD) + row * row_elems
                    tl.store(dst + cols, payload, mask=cmask)
                    if FP8:
                        sdst = peer_ptr(table_ptr, r, recv_scales_off, tl.float32) + row * scale_groups
                        tl.store(sdst + groups, scale, mask=groups < scale_groups)
    ok = peer_barrier(table_ptr, rank, 0, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)
    finish_call(own, epoch)


_launch = CachedLauncher(moe_dispatch_kernel)


def row_chunk(hidden: int, element_size: int, fp8: bool, interpret: bool) -> tuple[int, int]:
    """(BLOCK_H, warps): the channels of one work item of the dispatch and combine kernels.

    GPU: 1024 channels (7168 = 7 chunks exactly), one 16-byte access per thread (4 warps in bf16), so
    that 128 tokens already give ~900 items for ~132 programs. Interpreter: 64 channels (128 with fp8,
    whole scale groups), so that the CPU tests' rows of 100 channels span two chunks.
    """
    if interpret:
        return (128 if fp8 else 64), 1
    block = max(SCALE_GROUP if fp8 else 16, min(1024, triton.next_power_of_2(hidden)))
    return block, max(1, min(8, block * element_size // 512))


def launch_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, expert_rank: torch.Tensor,
                    expert_local: torch.Tensor, mask: torch.Tensor, chunk_pos: torch.Tensor, slot_pos: torch.Tensor,
                    chunk_base: torch.Tensor, send_base: torch.Tensor, expert_base: torch.Tensor, table: torch.Tensor,
                    error_record_addr: int, rank: int, world: int, sig: int, buffer_bytes: int, timeout_iters: int,
                    chunk: int, ws, fp8: bool, programs: int, block_h: int, num_warps: int) -> None:
    """Push ``x [T, hidden]`` to the ranks its ``topk_idx`` select; ``ws``: the MoeWorkspace."""
    tokens, hidden = x.shape
    consts = {"K": ws.topk, "K_P2": triton.next_power_of_2(ws.topk), "WORLD": world,
              "WORLD_P2": triton.next_power_of_2(world), "BLOCK_H": block_h, "FP8": fp8}
    ints = (hidden, ws.experts, ws.max_tokens, ws.recv_x_off, ws.row_elems, ws.recv_scales_off, ws.scale_groups,
            ws.src_rank_off, ws.src_token_off, ws.local_expert_off, ws.weight_off, ws.expert_row_off, ws.inv_off,
            ws.expert_index_off)
    key = (ptr_key(x), ptr_key(topk_idx), ptr_key(topk_weights), *(int_key(v) for v in ints))
    _launch(key, programs,
            (x, topk_idx, topk_weights, expert_rank, expert_local, mask, chunk_pos, slot_pos, chunk_base, send_base,
             expert_base, table, error_record_addr, rank, sig, buffer_bytes, timeout_iters, tokens, chunk, *ints),
            consts, num_warps)
