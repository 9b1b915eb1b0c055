"""One chunk of the copy-engine all-reduce's reduction: sum W pieces in rank order, write the result
to this rank's output, and optionally to a second local buffer and into every peer's workspace.

The copy-engine all-reduce (``shardkit/collectives/copy_engine.py``, "flags" schedule) lands the
peers' pieces of chunk k of this rank's shard in its workspace (T) by copy-engine transfers; this
kernel reduces them with this rank's own piece (in the caller's input) in one pass:

  * the sum is ranks 0..W-1 in that order, accumulated in fp32 from rank 0's value and rounded once
    to the dtype: the same bits as ``torch.add`` (W = 2) and the fp32 accumulator of
    ``copy_engine.sum_in_rank_order`` (W > 2), so every schedule gives the same result;
  * ``out`` gets the result; COPY also writes it to ``copy_addr`` (this rank's reduced shard R, which
    the peers pull), so the own chunk needs no second pass over HBM;
  * PUSH stores it at byte ``push_offset`` of every peer's workspace (SM stores over NVLink: the
    all-gather issued by the sum itself, so it leaves the copy engines' queue).

Pieces: the own one at ``own_addr``; peer q's at ``pieces_addr + i * piece_stride`` bytes with
i = (q - rank - 1) mod W (the T layout). Addresses are int64; ALIGNED says all are 16-byte
aligned (then Triton emits 16-byte accesses; shared/DESIGN.md: an int64 address carries no
alignment facts).
"""
import torch
import triton
import triton.language as tl

from ..launch import CachedLauncher, int_key, ptr_key

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _typed(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit(do_not_specialize=["own_addr", "pieces_addr", "piece_stride", "out_addr", "copy_addr", "push_offset",
                               "rank"])
def chunk_sum_kernel(table_ptr, own_addr, pieces_addr, piece_stride, out_addr, copy_addr, push_offset, n, rank,
                     DTYPE: tl.constexpr, WORLD: tl.constexpr, COPY: tl.constexpr, PUSH: tl.constexpr,
                     ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """n elements of DTYPE per piece; program i takes elements [i*BLOCK, (i+1)*BLOCK)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    acc = tl.zeros([BLOCK], tl.float32)
    for q in tl.static_range(WORLD):
        i = ((q + WORLD - 1 - rank) % WORLD).to(tl.int64)
        addr = tl.where(rank == q, own_addr, pieces_addr + i * piece_stride)
        v = tl.load(_typed(addr, DTYPE, ALIGNED) + offs, mask=m).to(tl.float32)
        if q == 0:
            acc = v  # not 0 + v: keeps the sign of -0.0, as torch.add does
        else:
            acc += v
    res = acc.to(DTYPE)
    tl.store(_typed(out_addr, DTYPE, ALIGNED) + offs, res, mask=m)
    if COPY:
        tl.store(_typed(copy_addr, DTYPE, ALIGNED) + offs, res, mask=m)
    if PUSH:
        for p in tl.static_range(WORLD):
            peer = tl.load(table_ptr + p) + push_offset
            tl.store(_typed(peer, DTYPE, ALIGNED) + offs, res, mask=m & (rank != p))


_launch = CachedLauncher(chunk_sum_kernel)


def chunk_sum_block(interpret: bool) -> int:
    """Elements per program: 4096 on GPUs (16-32 bytes per thread with 8 warps), 1024 in the
    interpreter (test chunks are a few KiB)."""
    return 1024 if interpret else 4096


def launch_chunk_sum(table: torch.Tensor, rank: int, world: int, dtype: torch.dtype, n: int, own_addr: int,
                     pieces_addr: int, piece_stride: int, out_addr: int, copy_addr: int | None = None,
                     push_offset: int | None = None, interpret: bool = False) -> None:
    """Enqueue the chunk sum on the current stream (see the module); n > 0 elements per piece."""
    addrs = [own_addr, pieces_addr, piece_stride, out_addr, copy_addr or 0, push_offset or 0]
    block = chunk_sum_block(interpret)
    consts = {"DTYPE": _TL_DTYPES[dtype], "WORLD": world, "COPY": copy_addr is not None,
              "PUSH": push_offset is not None, "ALIGNED": all(a % 16 == 0 for a in addrs), "BLOCK": block}
    key = (ptr_key(table), *(int_key(a) for a in addrs), int_key(n))
    _launch(key, triton.cdiv(n, block), (table, own_addr, pieces_addr, piece_stride, out_addr, copy_addr or 0,
                                         push_offset or 0, n, rank), consts, 8 if not interpret else 1)
