"""The CUDA C++ DDA kernels (csrc/dda), loaded with ctypes from ``shardkit/_dda.so``.

Built by setup.py where nvcc is present. ``available()`` says whether the library loaded; the
launchers take the same arguments as the Triton launchers, so the Communicator can use either.
A ctypes call costs about a microsecond: in eager mode this path avoids Triton's Python launch cost.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

from ...errors import ShardkitError

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "_dda.so")
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_lib = None


def _load():
    global _lib
    if _lib is None and os.path.exists(_PATH):
        lib = ctypes.CDLL(_PATH)
        common = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_void_p,
                  ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.shardkit_flat_all_reduce.argtypes = common + [ctypes.c_void_p]
        lib.shardkit_tree_all_reduce.argtypes = common + [ctypes.c_int64, ctypes.c_void_p]
        lib.shardkit_flat_all_reduce.restype = lib.shardkit_tree_all_reduce.restype = ctypes.c_int
        lib.shardkit_max_unroll.argtypes, lib.shardkit_max_unroll.restype = [ctypes.c_int], ctypes.c_int
        lib.shardkit_max_tree_threads.argtypes, lib.shardkit_max_tree_threads.restype = [], ctypes.c_int
        lib.shardkit_error_string.argtypes, lib.shardkit_error_string.restype = [ctypes.c_int], ctypes.c_char_p
        _lib = lib
    return _lib


def available() -> bool:
    """True when the CUDA library was built and loads."""
    try:
        return _load() is not None
    except OSError:
        return False


@functools.cache
def max_unroll(world: int) -> int:
    """Largest ``unroll`` (16-byte packs per thread per tile) of the tree kernel for ``world`` ranks
    (the flat kernel takes 1)."""
    return _load().shardkit_max_unroll(world)


@functools.cache
def max_tree_threads() -> int:
    """Largest block of the tree kernel (its registers hold unroll * world packs per thread)."""
    return _load().shardkit_max_tree_threads()


def grid(elements: int, element_size: int, threads: int, unroll: int, max_programs: int) -> int:
    """Programs for ``elements`` in tiles of ``threads * unroll`` 16-byte packs: one per tile, at
    most ``max_programs``."""
    return max(1, min(max_programs, -(-elements // (threads * (16 // element_size) * unroll))))


class HostTable:
    """The workspace addresses as a C array, built once per PeerMemory (no per-call allocation)."""

    def __init__(self, addresses: list[int]) -> None:
        self.world = len(addresses)
        self.array = (ctypes.c_int64 * self.world)(*addresses)


def _check(code: int, what: str) -> None:
    if code != 0:
        raise ShardkitError(f"{what}: CUDA error {code} ({_lib.shardkit_error_string(code).decode()})")


def launch_flat_all_reduce(x: torch.Tensor, out: torch.Tensor, table: HostTable, status_addr: int, rank: int,
                           sig: int, x_offset: int, half_bytes: int, timeout_iters: int, zero_copy: bool,
                           programs: int, threads: int, unroll: int) -> None:
    """Launch the CUDA flat all-reduce; arguments as the Triton launcher's, with ``threads`` per
    program (up to 1024) and ``unroll`` 16-byte packs per thread per tile (1)."""
    stream = torch._C._cuda_getCurrentRawStream(x.device.index)
    _check(_lib.shardkit_flat_all_reduce(x.data_ptr(), out.data_ptr(), table.array, table.world, status_addr,
                                         x.numel(), rank, sig, x_offset, half_bytes, timeout_iters, int(zero_copy),
                                         programs, threads, unroll, _DTYPES[x.dtype], stream), "flat all-reduce launch")


def launch_tree_all_reduce(x: torch.Tensor, out: torch.Tensor, table: HostTable, status_addr: int, rank: int,
                           sig: int, x_offset: int, half_bytes: int, timeout_iters: int, zero_copy: bool,
                           programs: int, threads: int, unroll: int, shard: int) -> None:
    """Launch the CUDA tree all-reduce; as launch_flat_all_reduce but up to ``max_tree_threads()``
    threads and ``max_unroll(world)`` packs per thread, plus ``shard`` elements per rank."""
    stream = torch._C._cuda_getCurrentRawStream(x.device.index)
    _check(_lib.shardkit_tree_all_reduce(x.data_ptr(), out.data_ptr(), table.array, table.world, status_addr,
                                         x.numel(), rank, sig, x_offset, half_bytes, timeout_iters, int(zero_copy),
                                         programs, threads, unroll, _DTYPES[x.dtype], shard, stream), "tree all-reduce launch")
