"""Launch grids of the MoE kernels: one ``MoeLaunchConfig`` per dispatcher, a pure cached function of
its configuration (``moe_launch_config``), or given explicitly for tuning (bench/moe_tune.py).

Every rank must use the same grids: dispatch and combine programs wait for the same-numbered program
of every peer, and the combine's item map (which rows program p reduces and pushes) must be the
map its peers use. The call signatures include the grids, so ranks that differ fail at the first
barrier instead of producing garbage.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from ...memory.protocol import MAX_PROGRAMS
from .workspace import MIN_COMBINE_BLOCK_H, SCALE_GROUP


@dataclass(frozen=True)
class MoeLaunchConfig:
    """programs: dispatch and combine programs (at most one per SM: all must be resident at once).
    layout_block_t: tokens per layout block (the [block_t * K]^2 pair tile); layout_programs: the
    most layout programs (chunks of whole blocks; the counts launch scans one row per chunk).
    dispatch_*: a payload item is block_t tokens x item_chunks chunks of block_h channels, metadata
    in blocks of meta_t tokens. combine_*: an item is block_t tokens x item_chunks chunks of block_h
    channels (item_chunks: any int >= 1; more than a row has is a whole row); combine_pushers: its
    programs that push (the others sum), 0: the peers' share of the work, (W-1)/W of them, >= programs:
    every program pushes, then sums (no role split; combine.py); combine_stages: software-pipeline
    stages of the combine's chunk loops (1: none; 2: only the expert-row indices are fetched a chunk
    ahead, the expert tiles depend on them; 3: the next chunk's K expert tiles are fetched into shared
    memory while this chunk is reduced and stored, 2 * K * block_t * block_h * 2 bytes: block_h 512 at
    8 tokens and top-8 in bf16, 132 KiB, and 8 warps: 16 spilled at sm_90)."""

    programs: int
    layout_block_t: int
    layout_programs: int
    layout_warps: int
    dispatch_block_t: int
    dispatch_block_h: int
    meta_t: int
    dispatch_warps: int
    dispatch_item_chunks: int
    combine_block_t: int
    combine_block_h: int
    combine_warps: int
    combine_item_chunks: int
    combine_pushers: int = 0
    combine_stages: int = 1

    def check(self, fp8: bool) -> None:
        """ValueError naming the field that is out of range (an explicit config from a user)."""
        for name in ("programs", "layout_programs"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 1 <= v <= MAX_PROGRAMS:
                raise ValueError(f"MoeLaunchConfig: {name} must be in [1, {MAX_PROGRAMS}], got {v!r}")
        for name, v in asdict(self).items():
            if name == "programs":
                continue
            if name.endswith(("item_chunks", "pushers", "stages")):
                least = 0 if name.endswith("pushers") else 1
                if not isinstance(v, int) or v < least:
                    raise ValueError(f"MoeLaunchConfig: {name} must be an int >= {least}, got {v!r}")
                continue
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"MoeLaunchConfig: {name} must be a power of two >= 1, got {v!r}")
        if self.combine_block_h < MIN_COMBINE_BLOCK_H:
            raise ValueError(f"MoeLaunchConfig: combine_block_h must be >= {MIN_COMBINE_BLOCK_H}, got "
                             f"{self.combine_block_h}")
        if fp8 and self.dispatch_block_h % SCALE_GROUP:
            raise ValueError(f"MoeLaunchConfig: fp8 dispatch needs dispatch_block_h to be a multiple of {SCALE_GROUP}, "
                             f"got {self.dispatch_block_h}")

    def short(self) -> str:
        """A compact name for tables: P<programs> L<block_t>x<programs>w<warps> D<t>x<h>*<chunks>m<meta>w<w>
        C<t>x<h>*<chunks>w<w>p<pushers>[s<stages>, when not 1]."""
        return (f"P{self.programs} L{self.layout_block_t}x{self.layout_programs}w{self.layout_warps} "
                f"D{self.dispatch_block_t}x{self.dispatch_block_h}*{self.dispatch_item_chunks}m{self.meta_t}"
                f"w{self.dispatch_warps} C{self.combine_block_t}x{self.combine_block_h}*{self.combine_item_chunks}"
                f"w{self.combine_warps}p{self.combine_pushers}" + (f"s{self.combine_stages}" if self.combine_stages != 1
                                                                    else ""))


@functools.lru_cache(maxsize=256)
def moe_launch_config(max_tokens: int, hidden: int, element_size: int, fp8: bool, sm_count: int,
                      interpret: bool) -> MoeLaunchConfig:
    """The default grids (equal on every rank: a function of the dispatcher's configuration and the
    smallest SM count of the group).

    GPU: one program per SM. Chunks of 2 KiB of a row (1024 bf16 channels: 7168 = 7 chunks exactly)
    for 4 tokens, i.e. 8 KiB per chunk, 8 tokens from 2048 tokens on (more bytes in flight per SM,
    where there are items enough for every program: no register spills at sm_90 with these warps) and
    up to 256 tokens (a dispatch program's items per destination run one after another, each one
    dependent load of x: at 128 tokens 112 items of 8 tokens, at most one per program, instead of 224).
    A program's items run one after another and each first looks up its rows (a dependent L2 round
    trip, ~1 us), so when there are at least as many token blocks as programs an item is a whole row
    of its tokens (the lookup once per 7 chunks; e.g. 1024 tokens and up); with fewer, one chunk,
    so that 128 tokens still make 112 items per source. Metadata in blocks of 32 tokens (its
    dependent small loads cost the same per block whatever its size). The combine holds up to K
    expert tiles per chunk: 16 warps (one or two 16-byte loads per thread per tile; 8 warps spilled
    a few registers at sm_90), 8-token blocks at any size: each pushed item ends with a release of
    its flag (waiting ~1-2 us for the NVLink stores), so fewer, larger items. Up to 256 tokens every
    program pushes, then sums (combine_pushers = programs; at 128 tokens each program pushes and sums
    at most one item): the role split doubles each role's chain of items there, which costs more than
    the roles' overlap of NVLink and HBM gains (the 128-token regression of the split combine,
    docs/PERFORMANCE.md v11). From 257 tokens half
    its programs push (the peers' share at W = 2), half sum. The combine's chunk loops are not
    software-pipelined by default (combine_stages 1: a program has one HBM round trip per chunk, its
    loads landing in registers, 117 of 128 per thread at 16 warps); 3 stages of 512-channel chunks
    at 8 warps (cp.async into shared memory) are a candidate for 4096 tokens. The no-split combine, the
    pipelined loops and the small-T dispatch blocks are not GPU-measured yet
    (bench/results/moe_gpu_commands.txt, run 1).
    Layout: blocks of 8 tokens (a 64 x 64 pair tile at top-8), up to 64 chunks.
    Interpreter: two programs; 16 tokens x 128 channels in items of 1 chunk (2 from 64 tokens), so
    that the CPU tests' rows of 200 channels span two chunks and their 33 tokens three blocks; layout
    blocks of 4 tokens in up to 4 chunks (several blocks per chunk).
    """
    if interpret:
        chunks = 1 if max_tokens < 64 else 2
        return MoeLaunchConfig(programs=2, layout_block_t=4, layout_programs=4, layout_warps=1,
                               dispatch_block_t=16, dispatch_block_h=128, meta_t=16, dispatch_warps=1,
                               dispatch_item_chunks=chunks, combine_block_t=16, combine_block_h=128, combine_warps=1,
                               combine_item_chunks=chunks)
    programs = min(MAX_PROGRAMS, sm_count)
    pow2 = 1 << max(0, hidden - 1).bit_length()
    block_h = min(2048 // element_size, pow2)
    dispatch_h = max(SCALE_GROUP if fp8 else 16, block_h)
    combine_h = max(MIN_COMBINE_BLOCK_H, block_h)
    block_t = 8 if max_tokens >= 2048 or max_tokens <= 256 else 4

    def item_chunks(block_h: int, block_t: int) -> int:  # whole rows when there are as many blocks as programs
        return -(-hidden // block_h) if -(-max_tokens // block_t) >= programs else 1

    return MoeLaunchConfig(programs=programs, layout_block_t=8, layout_programs=64, layout_warps=4,
                           dispatch_block_t=block_t, dispatch_block_h=dispatch_h, meta_t=32, dispatch_warps=4,
                           dispatch_item_chunks=item_chunks(dispatch_h, block_t), combine_block_t=8,
                           combine_block_h=combine_h, combine_warps=16, combine_item_chunks=item_chunks(combine_h, 8),
                           combine_pushers=programs if max_tokens <= 256 else 0)
