"""DDA tree (two-shot) all-reduce: reduce-scatter, then all-gather, both by direct peer access.

Meta's DDA "tree" algorithm for mid-sized messages: each rank reads only 1/W of every peer's data
to reduce its own shard, then reads the W-1 reduced shards of the peers, so each rank moves about
2(W-1)/W of the message instead of the flat algorithm's (W-1).

Per call, on each rank r (shards of ``shard`` elements, the last ones possibly short or empty;
program p handles tiles p, p + G, ... of each shard):
  1. stage the whole input into this call's epoch buffer (skipped for zero-copy inputs),
  2. barrier (stage 0) with the peers' program p,
  3. reduce shard r over all ranks in fixed rank order (fp32) into out and into our epoch buffer,
  4. barrier (stage 1): every shard is reduced, and no peer still reads our input,
  5. copy the W-1 other reduced shards from the peers' halves into out.
The reduced shard always goes to the epoch buffer, never into a zero-copy input, so the input is
never modified; in-place calls are safe because step 5 writes a shard only after its owner read it.

Launch policy (``tree_config``), measured on 4xH200 (bench/tune_all_reduce.py): the tile grows with
the shard so that about 64 programs suffice; shards of a multiple of 16 elements keep every shard
start 16-byte aligned (vector loads).
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...memory.protocol import MAX_PROGRAMS
from ..launch import CachedLauncher, int_key, ptr_key
from ..peer_tiles import copy_tiles, peer_ptr, sum_tile
from ..sync import finish_call, peer_barrier, start_call


@triton.jit(do_not_specialize=["error_record_addr", "rank", "sig", "x_offset", "buffer_bytes", "timeout_iters"])
def tree_all_reduce_kernel(
    x_ptr, out_ptr, table_ptr, error_record_addr, numel,  # as in flat_all_reduce_kernel (out may alias x)
    shard,          # elements per shard (a multiple of 16), shard s = [s*shard, (s+1)*shard)
    rank, sig, x_offset, buffer_bytes, timeout_iters,  # as in flat_all_reduce_kernel
    WORLD: tl.constexpr, WORLD_P2: tl.constexpr, BLOCK: tl.constexpr, ZERO_COPY: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    own, epoch, flag, ok, buf = start_call(table_ptr, rank, sig, buffer_bytes)
    if ZERO_COPY:
        src = x_offset
    else:
        src = buf
        if ok:
            # Stage shard by shard with the tile-to-program map of the reduction below: the barrier
            # pairs our program p only with the peers' program p, so p must read what p staged.
            staged = peer_ptr(table_ptr, rank, buf, DTYPE)
            for s in tl.static_range(WORLD):
                copy_tiles(x_ptr, staged, s * shard, tl.minimum((s + 1) * shard, numel), pid, nprog, True, BLOCK)
    ok = peer_barrier(table_ptr, rank, 0, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)

    # Reduce-scatter: our shard, summed over all ranks.
    lo = tl.multiple_of(rank * shard, 16)
    hi = tl.minimum(lo + shard, numel)
    reduced = peer_ptr(table_ptr, rank, buf, DTYPE)
    for t in range(pid, tl.cdiv(hi - lo, BLOCK), nprog):
        offs = lo + t * BLOCK + tl.arange(0, BLOCK)
        m = offs < hi
        acc = tl.where(ok, sum_tile(table_ptr, src, offs, m & ok, WORLD, DTYPE), float("nan")).to(DTYPE)
        tl.store(out_ptr + offs, acc, mask=m)
        tl.store(reduced + offs, acc, mask=m & ok)
    ok = peer_barrier(table_ptr, rank, 1, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)

    # All-gather: the peers' reduced shards.
    for i in tl.static_range(1, WORLD):
        s = (rank + i) % WORLD
        s_lo = tl.multiple_of(s * shard, 16)
        copy_tiles(peer_ptr(table_ptr, s, buf, DTYPE), out_ptr, s_lo, tl.minimum(s_lo + shard, numel), pid, nprog,
                   ok, BLOCK)
    finish_call(own, epoch)


def shard_elements(numel: int, world: int) -> int:
    """Elements per shard of a tree call: numel / world rounded up to a multiple of 16."""
    return -(-numel // (16 * world)) * 16


@dataclass(frozen=True)
class TreeConfig:
    """Launch grid of the Triton tree kernel: tiles of ``block`` elements of each shard,
    ``programs`` programs, ``warps`` warps per program."""

    block: int
    programs: int
    warps: int


@functools.lru_cache(maxsize=1024)
def tree_config(shard: int, element_size: int, sm_count: int, interpret: bool = False) -> TreeConfig:
    """The grid for shards of ``shard`` elements: a pure function of the shape and the SM count
    (every rank reaches the same answer), at most one program per SM."""
    if interpret:
        block, warps, most = 512, 1, 2
    else:
        block = min(8192, max(1024, triton.next_power_of_2(-(-shard // 64))))
        warps, most = 8 if shard <= 4096 else 4, sm_count
    return TreeConfig(block, max(1, min(most, MAX_PROGRAMS, -(-shard // block))), warps)


_launch = CachedLauncher(tree_all_reduce_kernel)


def launch_tree_all_reduce(x: torch.Tensor, out: torch.Tensor, table: torch.Tensor, error_record_addr: int,
                           rank: int, world: int, sig: int, x_offset: int, buffer_bytes: int,
                           timeout_iters: int, zero_copy: bool, shard: int, config: TreeConfig) -> None:
    """Launch one tree all-reduce over ``x.numel()`` elements (at most ``buffer_bytes`` of them) in
    shards of ``shard`` elements (``shard_elements``)."""
    numel = x.numel()
    consts = {"WORLD": world, "WORLD_P2": triton.next_power_of_2(world), "BLOCK": config.block,
              "ZERO_COPY": zero_copy}
    key = (ptr_key(x), ptr_key(out), int_key(numel), int_key(shard), int_key(timeout_iters), int_key(buffer_bytes),
           int_key(error_record_addr))
    _launch(key, config.programs, (x, out, table, error_record_addr, numel, shard, rank, sig, x_offset,
                                   buffer_bytes, timeout_iters), consts, config.warps)
