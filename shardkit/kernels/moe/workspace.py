"""The MoE workspace: where each region lives in every rank's peer memory, and the MoE error codes.

The dispatcher owns its PeerMemory. The protocol's signal area (epoch, arrival flags, error record:
``shardkit/memory/protocol.py``) stays where it is; everything after it is laid out here as one
region (the staging / epoch-buffer split of the all-reduce does not apply: a dispatch + combine
round is ordered by its own barriers, see below). Offsets are equal on every rank, because peers
write into them; they are a pure function of the dispatcher's configuration.

Regions (bytes from the workspace base, each 128-byte aligned)::

    counts        int32[WORLD][counts_row]: row s is written by rank s in the counts launch:
                  [tokens, flags, 0, 0, tokens to rank 0..W-1, (token, k) pairs to expert 0..E-1]
    recv_x        [recv_rows][row_elems] received rows (x's dtype, or fp8 e4m3 bytes), rank-major:
                  rows of source 0 first, each source's rows in token order
    recv_scales   fp32[recv_rows][scale_groups] (fp8 only): one scale per 128 channels
    src_rank      int32[recv_rows]
    src_token     int32[recv_rows]
    local_expert  int32[recv_rows][K]: this rank's local index of each top-k slot's expert, -1 if elsewhere
    weight        fp32[recv_rows][K]: the top-k weights as the source passed them
    expert_row    int32[recv_rows][K]: the slot's row in the expert-major order, -1 if elsewhere
    inv           int32[WORLD][max_tokens]: receive row of (source, token), -1 if it was not sent here
    expert_index  int32[expert_rows]: expert-major row -> receive row, -1 for alignment padding
    comb          [WORLD][max_tokens][comb_elems] x's dtype: row (r, t) = rank r's sum for our token t
    comb_flag     int64[WORLD][flag_items]: word (r, j) = rank r pushed its rows of our combine item j
                  (the call's flag, combine.py); flag_items bounds the items of any grid (channel
                  chunks of >= MIN_COMBINE_BLOCK_H)

Why one buffer suffices (no epoch parity): every region written by a peer in round n+1 is written
after that peer passed the counts barrier of round n+1, which this rank reaches only after its
combine of round n has finished reading, except the counts region itself, which a peer writes before
that barrier: a fast peer whose combine of round n is done (it waits only for the items it sums) may
write its next counts row while this rank's combine still runs, so the combine reads the sources'
token counts from the round's local copy (``RoundBuffers.src_tokens``), never from the region. A
round must therefore be dispatch then combine, each dispatch's outputs valid until the next
dispatch (the dispatcher enforces the order).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...memory.protocol import SIGNAL_BYTES
from ..launch import int_key

# Error codes of the MoE launches (first word of the error record), beside the protocol's 0..4.
BAD_EXPERT_ID = 16   # an expert id outside [-1, experts) on the culprit ranks
BAD_INPUT = 17       # the culprit ranks' hosts rejected their input (they raised with the reason)
RECV_OVERFLOW = 18   # the culprit ranks would receive more rows than their capacity (slot = rows wanted)

# Flag bits a rank puts in its counts row.
FLAG_BAD_IDS = 1
FLAG_BAD_INPUT = 2

SCALE_GROUP = 128  # fp8 dispatch: channels per scale
MIN_COMBINE_BLOCK_H = 64  # the combine's smallest chunk of channels (bounds its items, hence comb_flag)
_ALIGN = 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class MoeWorkspace:
    """Byte offsets of the regions (see the module docstring) and the sizes that shape them."""

    world: int
    max_tokens: int
    hidden: int
    topk: int
    experts: int
    recv_rows: int
    expert_rows: int
    row_elems: int       # payload elements per receive row (hidden rounded up to 16 bytes)
    comb_elems: int      # x's-dtype elements per comb row
    scale_groups: int    # fp8 scales per row (0 without fp8)
    counts_row: int      # int32 words per counts row
    counts_off: int
    recv_x_off: int
    recv_scales_off: int
    src_rank_off: int
    src_token_off: int
    local_expert_off: int
    weight_off: int
    expert_row_off: int
    inv_off: int
    expert_index_off: int
    comb_off: int
    comb_flag_off: int
    flag_items: int      # comb_flag words per source rank
    nbytes: int          # end of the last region


def moe_workspace(world: int, max_tokens: int, hidden: int, topk: int, experts: int, recv_rows: int,
                  expert_rows: int, dtype: torch.dtype, fp8: bool) -> MoeWorkspace:
    """The workspace layout for a dispatcher configuration (equal on every rank)."""
    elt = torch.empty((), dtype=dtype).element_size()
    payload_elt = 1 if fp8 else elt
    row_elems = _round_up(hidden, 16 // payload_elt)
    comb_elems = _round_up(hidden, 16 // elt)
    scale_groups = -(-hidden // SCALE_GROUP) if fp8 else 0
    counts_row = _round_up(4 + world + experts, 4)
    sizes = [
        ("counts_off", world * counts_row * 4),
        ("recv_x_off", recv_rows * row_elems * payload_elt),
        ("recv_scales_off", recv_rows * scale_groups * 4),
        ("src_rank_off", recv_rows * 4),
        ("src_token_off", recv_rows * 4),
        ("local_expert_off", recv_rows * topk * 4),
        ("weight_off", recv_rows * topk * 4),
        ("expert_row_off", recv_rows * topk * 4),
        ("inv_off", world * max_tokens * 4),
        ("expert_index_off", expert_rows * 4),
        ("comb_off", world * max_tokens * comb_elems * elt),
        ("comb_flag_off", world * max_tokens * -(-hidden // MIN_COMBINE_BLOCK_H) * 8),
    ]
    offsets, at = {}, _round_up(SIGNAL_BYTES, _ALIGN)
    for name, size in sizes:
        offsets[name] = at
        at = _round_up(at + size, _ALIGN)
    return MoeWorkspace(world=world, max_tokens=max_tokens, hidden=hidden, topk=topk, experts=experts,
                        recv_rows=recv_rows, expert_rows=expert_rows, row_elems=row_elems, comb_elems=comb_elems,
                        scale_groups=scale_groups, counts_row=counts_row,
                        flag_items=max_tokens * -(-hidden // MIN_COMBINE_BLOCK_H), nbytes=at, **offsets)


@functools.lru_cache(maxsize=None)
def int_keys(ints: tuple[int, ...]) -> tuple:
    """The CachedLauncher key of integer arguments that are constant per dispatcher (offsets, sizes):
    computed once, not at every eager launch."""
    return tuple(int_key(v) for v in ints)


@dataclass
class RoundBuffers:
    """One rank's local (not peer-visible) state of a round, int32 device tensors made once per
    dispatcher: the placement, what the layout writes and what the counts exchange derives from it.

    expert_rank [E], expert_local [E], l2g [W, L_P2]   placement (l2g: global id of rank r's l-th
                                                         expert, -1 past its last)
    mask [T], chunk_pos [T, W], slot_pos [T, K], chunk_counts [C, W], chunk_experts [C, E],
    chunk_bad [C]                                        layout.py (C = the most layout programs)
    chunk_base [C, W], chunk_expert_base [C, E], send_base [W], expert_base [E], recv_counts [W],
    recv_offsets [W], expert_offsets [L_P2 + 1], expert_counts [L_P2], recv_info [2], src_tokens [W]
    (each source's token count, for the combine: the counts region itself may already hold a fast peer's
    next round while this rank's combine still runs)                                   counts.py
    """

    expert_rank: torch.Tensor
    expert_local: torch.Tensor
    l2g: torch.Tensor
    mask: torch.Tensor
    chunk_pos: torch.Tensor
    slot_pos: torch.Tensor
    chunk_counts: torch.Tensor
    chunk_experts: torch.Tensor
    chunk_bad: torch.Tensor
    chunk_base: torch.Tensor
    chunk_expert_base: torch.Tensor
    send_base: torch.Tensor
    expert_base: torch.Tensor
    recv_counts: torch.Tensor
    recv_offsets: torch.Tensor
    expert_offsets: torch.Tensor
    expert_counts: torch.Tensor
    recv_info: torch.Tensor
    src_tokens: torch.Tensor

    @classmethod
    def make(cls, expert_rank: list[int], expert_local: list[int], local_experts: list[list[int]], max_tokens: int,
             topk: int, max_chunks: int, device: torch.device) -> "RoundBuffers":
        world, experts = len(local_experts), len(expert_rank)
        l_p2 = 1 << max(0, max(len(e) for e in local_experts) - 1).bit_length()
        l2g = torch.full((world, l_p2), -1, dtype=torch.int32)
        for r, ids in enumerate(local_experts):
            l2g[r, :len(ids)] = torch.tensor(ids, dtype=torch.int32)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.int32, device=device)
        return cls(expert_rank=torch.tensor(expert_rank, dtype=torch.int32, device=device),
                   expert_local=torch.tensor(expert_local, dtype=torch.int32, device=device), l2g=l2g.to(device),
                   mask=zeros(max_tokens), chunk_pos=zeros(max_tokens, world), slot_pos=zeros(max_tokens, topk),
                   chunk_counts=zeros(max_chunks, world), chunk_experts=zeros(max_chunks, experts),
                   chunk_bad=zeros(max_chunks), chunk_base=zeros(max_chunks, world),
                   chunk_expert_base=zeros(max_chunks, experts), send_base=zeros(world), expert_base=zeros(experts),
                   recv_counts=zeros(world), recv_offsets=zeros(world), expert_offsets=zeros(l_p2 + 1),
                   expert_counts=zeros(l_p2), recv_info=zeros(2), src_tokens=zeros(world))
