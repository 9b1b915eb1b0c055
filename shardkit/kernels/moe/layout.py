"""MoE layout: where each token goes, once per destination rank (local, no communication).

From ``topk_idx [T, K]`` (expert ids, -1 = no expert) and the placement ``expert_rank [E]`` (any
map expert -> rank), program p takes the tokens of chunk p, ``[p*chunk, min((p+1)*chunk, T))``, in
blocks of BLOCK_T tokens and writes:

    mask[t]          bit r set when one of t's experts lives on rank r: t travels to r once (dedup)
    chunk_pos[t, r]  t's position among chunk p's tokens to rank r (token order), -1 if not sent
    chunk_counts[p, r], chunk_bad[p]   tokens of chunk p to rank r; 1 if an id is outside [-1, E)
    slot_pos[t, k]   (t, k)'s position among chunk p's (token, k) pairs to its expert, in (token, k)
                     order, -1 for none
    chunk_experts[p, e]   chunk p's pairs to expert e

The counts launch scans the chunks: a token's row in rank r is ``send_base[r] + chunk_base[p, r] +
chunk_pos[t, r]`` and a pair's expert-major row ``expert_base[e] + chunk_expert_base[p, e] +
slot_pos[t, k]``, so both orders are fixed by the routing alone (rank-major rows by source, then
token; expert-major rows by expert, source, token, k), however the programs run. Per block, the pairs
per (token, expert) are a [BLOCK_T, E] tile whose prefix sum over the tokens gives the positions (a
counting sort without atomics). Ids outside [-1, E) are reported through ``chunk_bad`` and
otherwise ignored: nothing is read or written out of bounds.
"""
import torch
import triton
import triton.language as tl

from ..launch import CachedLauncher, int_key, ptr_key
from .workspace import RoundBuffers


@triton.jit(do_not_specialize=["tokens", "chunk"])
def moe_layout_kernel(
    topk_ptr,           # [T, K] int32/int64 expert ids, -1 = no expert (row stride K)
    expert_rank_ptr,    # int32[E]: rank holding each expert
    mask_ptr,           # out int32[T]
    chunk_pos_ptr,      # out int32[T, WORLD]
    slot_pos_ptr,       # out int32[T, K]
    chunk_counts_ptr,   # out int32[programs, WORLD]
    chunk_experts_ptr,  # out int32[programs, E]
    chunk_bad_ptr,      # out int32[programs]
    tokens,             # T
    chunk,              # tokens per program
    experts,            # E
    K: tl.constexpr, K_P2: tl.constexpr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr, E_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    lo = pid * chunk
    hi = tl.minimum(lo + chunk, tokens)
    ks = tl.arange(0, K_P2)
    ranks = tl.arange(0, WORLD_P2)
    ex = tl.arange(0, E_P2)
    carry = tl.zeros([WORLD_P2], tl.int32)   # chunk's tokens so far, per destination rank
    seen = tl.zeros([E_P2], tl.int32)        # chunk's pairs so far, per expert
    bad = tl.zeros([BLOCK_T, K_P2], tl.int32)
    for start in range(lo, hi, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        pair = (t[:, None] < hi) & (ks[None, :] < K)
        ids = tl.load(topk_ptr + t[:, None] * K + ks[None, :], mask=pair, other=-1).to(tl.int32)
        valid = pair & (ids >= 0) & (ids < experts)
        bad |= (pair & ((ids < -1) | (ids >= experts))).to(tl.int32)
        ids = tl.where(valid, ids, -1)
        dest = tl.load(expert_rank_ptr + ids, mask=valid, other=-1)
        # [BLOCK_T, WORLD_P2]: 1 where the token has an expert on that rank (any number of them).
        goes = tl.max((dest[:, :, None] == ranks[None, None, :]).to(tl.int32), axis=1)
        before = tl.cumsum(goes, axis=0) - goes + carry[None, :]
        in_block = t < hi
        tl.store(chunk_pos_ptr + t[:, None] * WORLD + ranks[None, :], tl.where(goes > 0, before, -1),
                 mask=in_block[:, None] & (ranks[None, :] < WORLD))
        tl.store(mask_ptr + t, tl.sum(goes << ranks[None, :], axis=1), mask=in_block)
        carry += tl.sum(goes, axis=0)
        # [BLOCK_T, E_P2]: pairs of each token to each expert; exclusive prefix over the tokens.
        hits = tl.zeros([BLOCK_T, E_P2], tl.int32)
        for k in tl.static_range(K):
            col = tl.sum(tl.where(ks[None, :] == k, ids, 0), axis=1)
            hits += (col[:, None] == ex[None, :]).to(tl.int32)
        earlier = tl.cumsum(hits, axis=0) - hits + seen[None, :]
        for k in tl.static_range(K):
            col = tl.sum(tl.where(ks[None, :] == k, ids, 0), axis=1)
            pos = tl.sum(tl.where(col[:, None] == ex[None, :], earlier, 0), axis=1)
            # The token's own earlier slots with the same expert (duplicate ids) come first.
            dup = tl.sum(((ids == col[:, None]) & (ks[None, :] < k)).to(tl.int32), axis=1)
            tl.store(slot_pos_ptr + t * K + k, tl.where(col >= 0, pos + dup, -1), mask=in_block)
        seen += tl.sum(hits, axis=0)
    tl.store(chunk_counts_ptr + pid * WORLD + ranks, carry, mask=ranks < WORLD)
    tl.store(chunk_experts_ptr + pid * experts + ex, seen, mask=ex < experts)
    tl.store(chunk_bad_ptr + pid, tl.max(tl.max(bad, axis=1), axis=0))


_launch = CachedLauncher(moe_layout_kernel)


def layout_programs(tokens: int, min_chunk: int, max_programs: int) -> tuple[int, int]:
    """(programs, tokens per program) for T tokens: chunks of at least ``min_chunk`` tokens, at most
    ``max_programs`` of them, one (empty) program when T is 0."""
    programs = max(1, min(max_programs, -(-tokens // min_chunk)))
    return programs, max(1, -(-tokens // programs))


def layout_block(experts: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_T, warps) of the layout: a [BLOCK_T, E] tile of pair counts per block, 8K elements on
    GPUs (32 tokens at 256 experts) over 8 warps: no register spills at sm_90 (16K spilled); 8 tokens
    in the interpreter."""
    if interpret:
        return 8, 1
    return max(1, min(64, 8192 // triton.next_power_of_2(experts))), 8


def launch_layout(topk_idx: torch.Tensor, b: RoundBuffers, world: int, programs: int, chunk: int, block_t: int,
                  num_warps: int) -> None:
    """Layout of ``topk_idx [T, K]`` over ``programs`` chunks of ``chunk`` tokens into ``b`` (see the module)."""
    tokens, k = topk_idx.shape
    experts = b.expert_rank.numel()
    consts = {"K": k, "K_P2": triton.next_power_of_2(k), "WORLD": world, "WORLD_P2": triton.next_power_of_2(world),
              "E_P2": triton.next_power_of_2(experts), "BLOCK_T": block_t}
    key = (ptr_key(topk_idx), int_key(experts))
    _launch(key, programs, (topk_idx, b.expert_rank, b.mask, b.chunk_pos, b.slot_pos, b.chunk_counts, b.chunk_experts,
                            b.chunk_bad, tokens, chunk, experts), consts, num_warps)
