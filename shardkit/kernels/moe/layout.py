"""MoE layout: where each token goes, once per destination rank (local, no communication).

Device code called by the counts launch (counts.py), whose program p lays out chunk p first.
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
token; expert-major rows by expert, source, token, k), however the programs run. Ids outside
[-1, E) are reported through ``chunk_bad`` and otherwise ignored: nothing is read or written out of
bounds.

Per block, the BLOCK_T * K (token, k) pairs are compared with each other (a [P, P] tile, P = BLOCK_T
* K_P2: a pair's position among the block's pairs to its expert is the number of earlier pairs with
the same id), and the chunk's pairs so far per expert are a [E] vector in registers, read with
``tl.gather`` and advanced with ``tl.histogram``. An earlier version kept a [BLOCK_T, E] tile of
pair counts and scanned it (~17 passes over 8K elements per 32 tokens): ~10 us per block on an
H200, 21 us for 128 tokens; the pair tile of 8 tokens and top-8 is 4K elements in one pass.
"""
import triton
import triton.language as tl


@triton.jit
def layout_chunk(
    topk_ptr,           # [T, K] int32/int64 expert ids, -1 = no expert (row stride K)
    expert_rank_ptr,    # int32[E]: rank holding each expert
    mask_ptr,           # out int32[T]
    chunk_pos_ptr,      # out int32[T, WORLD]
    slot_pos_ptr,       # out int32[T, K]
    chunk_counts_ptr,   # out int32[programs, WORLD]
    chunk_experts_ptr,  # out int32[programs, E]
    chunk_bad_ptr,      # out int32[programs]
    pid,                # the chunk
    tokens,             # T
    chunk,              # tokens per program (a multiple of BLOCK_T)
    experts,            # E
    K: tl.constexpr, K_P2: tl.constexpr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr, E_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Layout of chunk ``pid`` (see the module)."""
    P: tl.constexpr = BLOCK_T * K_P2
    lo = pid * chunk
    hi = tl.minimum(lo + chunk, tokens)
    ranks = tl.arange(0, WORLD_P2)
    ex = tl.arange(0, E_P2)
    owner = tl.load(expert_rank_ptr + ex, mask=ex < experts, other=-1)  # the placement, in registers
    pair_i = tl.arange(0, P)            # pair i = (token i // K_P2 of the block, slot i % K_P2)
    pair_t = pair_i // K_P2
    pair_k = pair_i % K_P2
    offs_t = tl.arange(0, BLOCK_T)
    earlier_pair = pair_i[None, :] < pair_i[:, None]   # [P, P]: column j comes before row i
    carry = tl.zeros([WORLD_P2], tl.int32)   # chunk's tokens so far, per destination rank
    seen = tl.zeros([E_P2], tl.int32)        # chunk's pairs so far, per expert
    bad = tl.zeros([P], tl.int32)
    # Each block's ids are loaded one block ahead (the loop's only global load that the rest waits for).
    ids_next = tl.load(topk_ptr + (lo + pair_t) * K + pair_k, mask=(lo + pair_t < hi) & (pair_k < K), other=-1)
    for start in range(lo, hi, BLOCK_T):
        t = start + pair_t
        pair = (t < hi) & (pair_k < K)
        ids = ids_next.to(tl.int32)
        t_next = t + BLOCK_T
        ids_next = tl.load(topk_ptr + t_next * K + pair_k, mask=(t_next < hi) & (pair_k < K), other=-1)
        valid = pair & (ids >= 0) & (ids < experts)
        bad |= (pair & ((ids < -1) | (ids >= experts))).to(tl.int32)
        e = tl.where(valid, ids, 0)
        dest = tl.where(valid, tl.gather(owner, e, 0), -1)
        # [BLOCK_T, WORLD_P2]: 1 where the token has an expert on that rank (any number of them).
        dest_tk = tl.reshape(dest, (BLOCK_T, K_P2))
        goes = tl.max((dest_tk[:, :, None] == ranks[None, None, :]).to(tl.int32), axis=1)
        before = tl.cumsum(goes, axis=0) - goes + carry[None, :]
        tok = start + offs_t
        in_block = tok < hi
        tl.store(chunk_pos_ptr + tok[:, None] * WORLD + ranks[None, :], tl.where(goes > 0, before, -1),
                 mask=in_block[:, None] & (ranks[None, :] < WORLD))
        tl.store(mask_ptr + tok, tl.sum(goes << ranks[None, :], axis=1), mask=in_block)
        carry += tl.sum(goes, axis=0)
        # Earlier pairs of the block with the same expert (duplicate ids of one token included: the
        # (token, k) order) plus the chunk's earlier blocks' pairs to it.
        same = earlier_pair & (e[:, None] == e[None, :]) & valid[None, :]
        pos = tl.gather(seen, e, 0) + tl.sum(same.to(tl.int32), axis=1)
        tl.store(slot_pos_ptr + t * K + pair_k, tl.where(valid, pos, -1), mask=pair)
        seen += tl.histogram(e, E_P2, mask=valid)
    tl.store(chunk_counts_ptr + pid * WORLD + ranks, carry, mask=ranks < WORLD)
    tl.store(chunk_experts_ptr + pid * experts + ex, seen, mask=ex < experts)
    tl.store(chunk_bad_ptr + pid, tl.max(bad, axis=0))


def layout_programs(tokens: int, block_t: int, max_programs: int) -> tuple[int, int]:
    """(programs, tokens per program) for T tokens: chunks of whole blocks of ``block_t`` tokens, at
    most ``max_programs`` of them, one (empty) program when T is 0."""
    blocks = -(-tokens // block_t)
    programs = max(1, min(max_programs, blocks))
    return programs, max(1, -(-blocks // programs)) * block_t
