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
from .workspace import SCALE_GROUP


@dataclass(frozen=True)
class MoeLaunchConfig:
    """programs: dispatch and combine programs (at most one per SM: all must be resident at once).
    layout_block_t: tokens per layout block (the [block_t * K]^2 pair tile); layout_programs: the
    most layout programs (chunks of whole blocks; the counts launch scans one row per chunk).
    dispatch_*: a payload item is block_t tokens x block_h channels, metadata in blocks of meta_t
    tokens. combine_*: an item is block_t tokens x block_h channels."""

    programs: int
    layout_block_t: int
    layout_programs: int
    layout_warps: int
    dispatch_block_t: int
    dispatch_block_h: int
    meta_t: int
    dispatch_warps: int
    combine_block_t: int
    combine_block_h: int
    combine_warps: int

    def check(self, fp8: bool) -> None:
        """ValueError naming the field that is out of range (an explicit config from a user)."""
        if not 1 <= self.programs <= MAX_PROGRAMS:
            raise ValueError(f"MoeLaunchConfig: programs must be in [1, {MAX_PROGRAMS}], got {self.programs}")
        for name, v in asdict(self).items():
            if name == "programs":
                continue
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"MoeLaunchConfig: {name} must be a power of two >= 1, got {v!r}")
        if fp8 and self.dispatch_block_h % SCALE_GROUP:
            raise ValueError(f"MoeLaunchConfig: fp8 dispatch needs dispatch_block_h to be a multiple of {SCALE_GROUP}, "
                             f"got {self.dispatch_block_h}")

    def short(self) -> str:
        """A compact name for tables: P<programs> L<block_t>x<programs>w<warps> D<t>x<h>m<meta>w<w> C<t>x<h>w<w>."""
        return (f"P{self.programs} L{self.layout_block_t}x{self.layout_programs}w{self.layout_warps} "
                f"D{self.dispatch_block_t}x{self.dispatch_block_h}m{self.meta_t}w{self.dispatch_warps} "
                f"C{self.combine_block_t}x{self.combine_block_h}w{self.combine_warps}")


@functools.lru_cache(maxsize=256)
def moe_launch_config(hidden: int, element_size: int, fp8: bool, sm_count: int, interpret: bool) -> MoeLaunchConfig:
    """The default grids (equal on every rank: a function of the dispatcher's configuration and the
    smallest SM count of the group).

    GPU: one program per SM. Payload items of 2 KiB of a row (1024 bf16 channels: 7168 = 7 chunks
    exactly) for 4 tokens, i.e. 8 KiB per item: a program's items run one after another, each
    waiting for its loads (~1 us), so an item must carry enough bytes (NVLink's ~366 GB/s over 132
    SMs is ~2.8 GB/s per SM, ~5.6 KiB per 2-us item) while 128 tokens still make 224 items per
    destination, ~2 per program. Metadata in blocks of 32 tokens (its dependent small loads cost the
    same per block whatever its size). The combine holds up to K expert tiles per item: 8 warps.
    Layout: blocks of 8 tokens (a 64 x 64 pair tile at top-8), up to 64 chunks.
    Interpreter: two programs; 16 tokens x 128 channels (the CPU tests' rows of 200 channels span two
    chunks, their 33 tokens three blocks), layout blocks of 4 tokens in up to 4 chunks (several
    blocks per chunk).
    """
    if interpret:
        return MoeLaunchConfig(programs=2, layout_block_t=4, layout_programs=4, layout_warps=1,
                               dispatch_block_t=16, dispatch_block_h=128, meta_t=16, dispatch_warps=1,
                               combine_block_t=16, combine_block_h=128, combine_warps=1)
    pow2 = 1 << max(0, hidden - 1).bit_length()
    block_h = min(2048 // element_size, pow2)
    return MoeLaunchConfig(programs=min(MAX_PROGRAMS, sm_count), layout_block_t=8, layout_programs=64, layout_warps=4,
                           dispatch_block_t=4, dispatch_block_h=max(SCALE_GROUP if fp8 else 16, block_h), meta_t=32,
                           dispatch_warps=4, combine_block_t=4, combine_block_h=max(16, block_h), combine_warps=8)
