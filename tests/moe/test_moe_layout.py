"""The layout alone (one process, no peers: layout.py's device function in a one-line kernel; the
counts launch runs it before its exchange) against a plain-torch loop: every output poisoned first,
token counts that are not multiples of the block or the chunk, several blocks per chunk, duplicate
ids, -1 slots, ids outside [-1, E) (reported, never read), any placement."""
import pytest
import torch
import triton
import triton.language as tl

from shardkit.kernels.moe.layout import layout_chunk, layout_programs
from shardkit.kernels.moe.workspace import RoundBuffers

POISON = -7


@triton.jit
def layout_kernel(topk_ptr, expert_rank_ptr, mask_ptr, chunk_pos_ptr, slot_pos_ptr, chunk_counts_ptr, chunk_experts_ptr,
                  chunk_bad_ptr, tokens, chunk, experts, K: tl.constexpr, K_P2: tl.constexpr, WORLD: tl.constexpr,
                  WORLD_P2: tl.constexpr, E_P2: tl.constexpr, BLOCK_T: tl.constexpr):
    layout_chunk(topk_ptr, expert_rank_ptr, mask_ptr, chunk_pos_ptr, slot_pos_ptr, chunk_counts_ptr, chunk_experts_ptr,
                 chunk_bad_ptr, tl.program_id(0), tokens, chunk, experts, K, K_P2, WORLD, WORLD_P2, E_P2, BLOCK_T)


def reference(idx: torch.Tensor, expert_rank: list[int], world: int, chunk: int, programs: int) -> dict:
    """The layout's outputs by a loop over chunks, tokens and slots."""
    tokens, k = idx.shape
    experts = len(expert_rank)
    out = {"mask": torch.zeros(tokens, dtype=torch.int32),
           "chunk_pos": torch.full((tokens, world), -1, dtype=torch.int32),
           "slot_pos": torch.full((tokens, k), -1, dtype=torch.int32),
           "chunk_counts": torch.zeros(programs, world, dtype=torch.int32),
           "chunk_experts": torch.zeros(programs, experts, dtype=torch.int32),
           "chunk_bad": torch.zeros(programs, dtype=torch.int32)}
    for p in range(programs):
        for t in range(p * chunk, min((p + 1) * chunk, tokens)):
            ranks = set()
            for j in range(k):
                e = int(idx[t, j])
                if e < -1 or e >= experts:
                    out["chunk_bad"][p] = 1
                elif e >= 0:
                    ranks.add(expert_rank[e])
                    out["slot_pos"][t, j] = out["chunk_experts"][p, e]
                    out["chunk_experts"][p, e] += 1
            for r in sorted(ranks):
                out["mask"][t] |= 1 << r
                out["chunk_pos"][t, r] = out["chunk_counts"][p, r]
                out["chunk_counts"][p, r] += 1
    return out


@pytest.mark.parametrize("tokens,block_t,max_programs,world,experts,topk", [
    (37, 4, 3, 2, 6, 3),     # 3 chunks of 3 blocks (the last partial), K not a power of two
    (5, 8, 4, 3, 5, 2),      # one partial block
    (64, 2, 64, 4, 16, 4),   # one block per chunk, 32 chunks
    (0, 4, 4, 2, 6, 3),      # no tokens: one empty program
])
def test_layout_matches_loop(tokens, block_t, max_programs, world, experts, topk):
    gen = torch.Generator().manual_seed(tokens * 31 + experts)
    expert_rank = torch.randint(world, (experts,), generator=gen).tolist()  # any placement
    idx = torch.randint(-1, experts, (tokens, topk), generator=gen)
    if tokens:
        idx[::3, 1] = idx[::3, 0]                         # duplicate ids within a token
        idx[1::7, 0] = experts + 3                        # out of range above
        idx[2::11, topk - 1] = -5                         # out of range below
    local = [[e for e in range(experts) if expert_rank[e] == r] or [0] for r in range(world)]
    programs, chunk = layout_programs(tokens, block_t, max_programs)
    b = RoundBuffers.make(expert_rank, [0] * experts, local, max(tokens, 1), topk, max_programs, torch.device("cpu"))
    for name in ("mask", "chunk_pos", "slot_pos", "chunk_counts", "chunk_experts", "chunk_bad"):
        getattr(b, name).fill_(POISON)
    layout_kernel[(programs,)](idx, b.expert_rank, b.mask, b.chunk_pos, b.slot_pos, b.chunk_counts, b.chunk_experts,
                               b.chunk_bad, tokens, chunk, experts, K=topk, K_P2=triton.next_power_of_2(topk),
                               WORLD=world, WORLD_P2=triton.next_power_of_2(world),
                               E_P2=triton.next_power_of_2(experts), BLOCK_T=block_t)
    want = reference(idx, expert_rank, world, chunk, programs)
    for name, ref in want.items():
        got = getattr(b, name)[:ref.shape[0]]
        assert torch.equal(got, ref), f"{name} (tokens={tokens}, chunk={chunk}):\n{got}\nexpected\n{ref}"
