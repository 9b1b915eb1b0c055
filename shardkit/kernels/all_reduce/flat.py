"""DDA flat (one-shot) all-reduce: every rank reads every peer's copy and reduces locally.

Meta's DDA "flat" algorithm (NCCLX) for small messages: one round of direct peer reads, so its
latency is one barrier plus WORLD reads of the message, with no intermediate hops.

Per call, on each rank (program p handles tiles p, p + G, p + 2G, ... of BLOCK elements):
  1. stage the input into this call's epoch buffer (skipped when the input already lives in the
     workspace: zero-copy),
  2. barrier with the peers' program p,
  3. out[tile] = sum over ranks r = 0..W-1 (fixed order) of rank r's staged tile, in fp32,
  4. zero-copy only: a second barrier, so no peer is still reading our buffer when we return.
The two epoch buffers make the end barrier unnecessary in the staged case: call n+2 reuses call n's
buffer only after every peer signalled call n+1, which it does after its call-n kernel finished.

Launch policy (``flat_config``), measured on 4xH200 (bench/tune_all_reduce.py, docs/PERFORMANCE.md):
the copies are latency bound, so the best grid gives every program about one tile of 2048 elements
and spreads over all SMs.
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
def flat_all_reduce_kernel(
    x_ptr,              # [numel] this rank's input (read only in the staged case)
    out_ptr,            # [numel] this rank's output; may alias x_ptr when staged
    table_ptr,          # int64[WORLD]: every rank's workspace base address, in this process
    error_record_addr,  # int64: address of this rank's int32[4] error record (memory/protocol.py)
    numel,              # elements to reduce
    rank,               # this rank
    sig,                # 31-bit call signature, equal on all ranks for a well-formed call
    x_offset,           # zero-copy: byte offset of the input inside every rank's workspace
    buffer_bytes,       # bytes of one epoch buffer
    timeout_iters,      # barrier polls before giving up
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
            copy_tiles(x_ptr, peer_ptr(table_ptr, rank, buf, DTYPE), 0, numel, pid, nprog, True, BLOCK)
    ok = peer_barrier(table_ptr, rank, 0, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)
    for t in range(pid, tl.cdiv(numel, BLOCK), nprog):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        acc = sum_tile(table_ptr, src, offs, m & ok, WORLD, DTYPE)
        tl.store(out_ptr + offs, tl.where(ok, acc, float("nan")).to(DTYPE), mask=m)
    if ZERO_COPY:
        ok = peer_barrier(table_ptr, rank, 1, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)
    finish_call(own, epoch)


@dataclass(frozen=True)
class FlatConfig:
    """Launch grid of the Triton flat kernel: tiles of ``block`` elements, ``programs`` programs
    (each takes every programs-th tile), ``warps`` warps per program."""

    block: int
    programs: int
    warps: int


@functools.lru_cache(maxsize=1024)
def flat_config(numel: int, element_size: int, sm_count: int, interpret: bool = False) -> FlatConfig:
    """The grid for ``numel`` elements per rank: a pure function of the shape and the GPU's SM count,
    so every rank reaches the same answer. At most one program per SM (all programs of a launch
    must be resident at once: they wait for their peers). The interpreter runs programs one after
    another: two large ones are fastest there."""
    if interpret:
        block, warps, most = 512, 1, 2
    else:
        block, warps, most = 2048, 8 if numel <= (1 << 17) else 16, sm_count
    return FlatConfig(block, max(1, min(most, MAX_PROGRAMS, -(-numel // block))), warps)


_launch = CachedLauncher(flat_all_reduce_kernel)


def launch_flat_all_reduce(x: torch.Tensor, out: torch.Tensor, table: torch.Tensor, error_record_addr: int,
                           rank: int, world: int, sig: int, x_offset: int, buffer_bytes: int,
                           timeout_iters: int, zero_copy: bool, config: FlatConfig) -> None:
    """Launch one flat all-reduce over ``x.numel()`` elements (at most ``buffer_bytes`` of them)."""
    numel = x.numel()
    consts = {"WORLD": world, "WORLD_P2": triton.next_power_of_2(world), "BLOCK": config.block,
              "ZERO_COPY": zero_copy}
    key = (ptr_key(x), ptr_key(out), int_key(numel), int_key(timeout_iters), int_key(buffer_bytes),
           int_key(error_record_addr))
    _launch(key, config.programs, (x, out, table, error_record_addr, numel, rank, sig, x_offset, buffer_bytes,
                                   timeout_iters), consts, config.warps)
