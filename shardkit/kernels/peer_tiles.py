"""Tile helpers shared by the peer-memory kernels: copy flat tiles (staging, all-gather), stage rows, and sum one tile over all ranks in a fixed rank order (so every rank computes bitwise the same
result)."""
import triton
import triton.language as tl


@triton.jit
def peer_ptr(table_ptr, r, byte_offset, DTYPE: tl.constexpr):
    """Typed pointer to ``byte_offset`` inside rank ``r``'s workspace.

    Addresses loaded from the int64 table carry no alignment facts; every workspace offset we use is
    a multiple of 16 bytes, and saying so lets Triton emit 16-byte loads instead of 2-byte ones.
    """
    addr = tl.load(table_ptr + r) + byte_offset
    return tl.multiple_of(addr.to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def copy_tiles(src_ptr, dst_ptr, start, stop, pid, nprog, ok, BLOCK: tl.constexpr):
    """Copy elements [start, stop) of src to the same indices of dst (NaN where ``ok`` is False:
    the call failed); program pid takes every nprog-th tile of BLOCK elements."""
    for t in range(pid, tl.cdiv(stop - start, BLOCK), nprog):
        offs = start + t * BLOCK + tl.arange(0, BLOCK)
        m = offs < stop
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=m & ok, other=float("nan")), mask=m)


@triton.jit
def sum_tile(table_ptr, byte_offset, offs, m, WORLD: tl.constexpr, DTYPE: tl.constexpr):
    """fp32 sum over ranks 0..WORLD-1, in that order, of elements ``offs`` at ``byte_offset`` of
    each rank's workspace. All peer loads are issued before the adds consume them."""
    acc = tl.zeros(offs.shape, tl.float32)
    for r in tl.static_range(WORLD):
        acc += tl.load(peer_ptr(table_ptr, r, byte_offset, DTYPE) + offs, mask=m, other=0.0).to(tl.float32)
    return acc


@triton.jit
def stage_rows(src_ptr, dst_ptr, row_lo, row_hi, src_stride, dst_stride, cols, cmask, pid, nprog):
    """Copy rows [row_lo, row_hi) of src (row stride ``src_stride`` elements) to the same rows of dst
    (row stride ``dst_stride``); program pid takes rows row_lo + pid, row_lo + pid + nprog, ...
    ``cols`` are the column offsets of one row, ``cmask`` their bound. An empty range copies nothing."""
    for j in range(pid, row_hi - row_lo, nprog):
        row = row_lo + j
        v = tl.load(src_ptr + row * src_stride + cols, mask=cmask)
        tl.store(dst_ptr + row * dst_stride + cols, v, mask=cmask)
