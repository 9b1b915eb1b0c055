"""MoE layout: where each token goes, once per destination rank (local, no communication).

From ``topk_idx [T, K]`` (expert ids, -1 = no expert) and the placement ``expert_rank [E]`` (any
map expert -> rank), program p takes the tokens of chunk p, ``[p*chunk, min((p+1)*chunk, T))``, in
blocks of BLOCK_T tokens and writes:

    mask[t]          bit r set when one of t's experts lives on rank r: t travels to r once (dedup)
    chunk_pos[t, r]  t's position among chunk p's tokens to rank r (token order), -1 if not sent
    chunk_counts[p, r], chunk_bad[p]   tokens of chunk p to rank r; 1 if an id is outside [-1, E)
    slot_pos[t, k]   (t, k)'s position among this rank's (token, k) pairs to its expert, -1 for none
    cursor[e]        += pairs to expert e (zero on entry; the counts launch reads and re-zeroes it)

A token's final row in rank r is ``send_base[r] + chunk_base[p, r] + chunk_pos[t, r]`` once the
counts launch has scanned the chunks, so rank-major rows come out in token order on every run.
``slot_pos`` comes from atomic counters: unique and dense, but its order within an expert depends on
timing (the expert-major order of a row never changes a result: the combine reduces in k order).
Ids outside [-1, E) are reported through ``chunk_bad`` and otherwise ignored: nothing is read or
written out of bounds.
"""
import torch
import triton
import triton.language as tl

from ..launch import CachedLauncher, int_key, ptr_key


@triton.jit(do_not_specialize=["tokens", "chunk"])
def moe_layout_kernel(
    topk_ptr,          # [T, K] int32/int64 expert ids, -1 = no expert (row stride K)
    expert_rank_ptr,   # int32[E]: rank holding each expert
    mask_ptr,          # out int32[T]
    chunk_pos_ptr,     # out int32[T, WORLD]
    slot_pos_ptr,      # out int32[T, K]
    cursor_ptr,        # int32[E] per-expert pair counters
    chunk_counts_ptr,  # out int32[programs, WORLD]
    chunk_bad_ptr,     # out int32[programs]
    tokens,            # T
    chunk,             # tokens per program
    experts,           # E
    K: tl.constexpr, K_P2: tl.constexpr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    lo = pid * chunk
    hi = tl.minimum(lo + chunk, tokens)
    ks = tl.arange(0, K_P2)
    ranks = tl.arange(0, WORLD_P2)
    carry = tl.zeros([WORLD_P2], tl.int32)
    bad = tl.zeros([BLOCK_T, K_P2], tl.int32)
    for start in range(lo, hi, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        pair = (t[:, None] < hi) & (ks[None, :] < K)
        ids = tl.load(topk_ptr + t[:, None] * K + ks[None, :], mask=pair, other=-1).to(tl.int32)
        valid = pair & (ids >= 0) & (ids < experts)
        bad |= (pair & ((ids < -1) | (ids >= experts))).to(tl.int32)
        dest = tl.load(expert_rank_ptr + ids, mask=valid, other=-1)
        pos = tl.atomic_add(cursor_ptr + ids, 1, mask=valid, sem="relaxed", scope="gpu")
        tl.store(slot_pos_ptr + t[:, None] * K + ks[None, :], tl.where(valid, pos, -1), mask=pair)
        # [BLOCK_T, WORLD_P2]: 1 where the token has an expert on that rank (any number of them).
        goes = tl.max((dest[:, :, None] == ranks[None, None, :]).to(tl.int32), axis=1)
        before = tl.cumsum(goes, axis=0) - goes + carry[None, :]
        in_block = t < hi
        tl.store(chunk_pos_ptr + t[:, None] * WORLD + ranks[None, :], tl.where(goes > 0, before, -1),
                 mask=in_block[:, None] & (ranks[None, :] < WORLD))
        tl.store(mask_ptr + t, tl.sum(goes << ranks[None, :], axis=1), mask=in_block)
        carry += tl.sum(goes, axis=0)
    tl.store(chunk_counts_ptr + pid * WORLD + ranks, carry, mask=ranks < WORLD)
    tl.store(chunk_bad_ptr + pid, tl.max(tl.max(bad, axis=1), axis=0))


_launch = CachedLauncher(moe_layout_kernel)


def layout_programs(tokens: int, min_chunk: int, max_programs: int) -> tuple[int, int]:
    """(programs, tokens per program) for T tokens: chunks of at least ``min_chunk`` tokens, at most
    ``max_programs`` of them, one (empty) program when T is 0."""
    programs = max(1, min(max_programs, -(-tokens // min_chunk)))
    return programs, max(1, -(-tokens // programs))


def launch_layout(topk_idx: torch.Tensor, expert_rank: torch.Tensor, mask: torch.Tensor, chunk_pos: torch.Tensor,
                  slot_pos: torch.Tensor, cursor: torch.Tensor, chunk_counts: torch.Tensor, chunk_bad: torch.Tensor,
                  world: int, programs: int, chunk: int, block_t: int, num_warps: int) -> None:
    """Layout of ``topk_idx [T, K]`` over ``programs`` chunks of ``chunk`` tokens (see the module)."""
    tokens, k = topk_idx.shape
    consts = {"K": k, "K_P2": triton.next_power_of_2(k), "WORLD": world, "WORLD_P2": triton.next_power_of_2(world),
              "BLOCK_T": block_t}
    key = (ptr_key(topk_idx), int_key(expert_rank.numel()))
    _launch(key, programs, (topk_idx, expert_rank, mask, chunk_pos, slot_pos, cursor, chunk_counts, chunk_bad,
                            tokens, chunk, expert_rank.numel()), consts, num_warps)
