"""The CUDA C++ DDA kernels (csrc/dda), loaded with ctypes from ``shardkit/_dda.so``.

Built by setup.py where nvcc is present. ``available()`` says whether the library loaded; the
launchers take the same arguments as the Triton launchers, so the Communicator can use either.
A ctypes call costs about a microsecond: in eager mode this path avoids Triton's Python launch cost.

Launch policy (``flat_config``, ``tree_config``, ``ll_config``, ``ll_rmsnorm_config``, ``grid``): C++ is its
one source of truth (csrc/dda/policy.h, where the measured rules are written down); these call it through the
library, and the torch binding (csrc/torch, the C++ host path of the Communicator) calls it directly.
"""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import torch

from ...errors import ShardkitError
from ...memory.protocol import DTYPE_CODES

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "_dda.so")
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
        lib.shardkit_ll_all_reduce.argtypes = common + [ctypes.c_void_p]
        lib.shardkit_ll_all_reduce.restype = ctypes.c_int
        lib.shardkit_flat_all_reduce.restype = lib.shardkit_tree_all_reduce.restype = ctypes.c_int
        lib.shardkit_ll_all_reduce_rmsnorm.argtypes = (
            [ctypes.c_void_p] * 5 + [ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_uint32, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p])
        lib.shardkit_ll_all_reduce_rmsnorm.restype = ctypes.c_int
        lib.shardkit_max_unroll.argtypes, lib.shardkit_max_unroll.restype = [ctypes.c_int], ctypes.c_int
        lib.shardkit_max_tree_threads.argtypes, lib.shardkit_max_tree_threads.restype = [], ctypes.c_int
        lib.shardkit_error_string.argtypes, lib.shardkit_error_string.restype = [ctypes.c_int], ctypes.c_char_p
        config = ctypes.POINTER(ctypes.c_int)
        lib.shardkit_flat_config.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, config]
        lib.shardkit_tree_config.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, config]
        lib.shardkit_ll_config.argtypes = lib.shardkit_flat_config.argtypes
        lib.shardkit_flat_config.restype = lib.shardkit_tree_config.restype = lib.shardkit_ll_config.restype = None
        lib.shardkit_ll_rmsnorm_config.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, config]
        lib.shardkit_ll_rmsnorm_config.restype = None
        lib.shardkit_ll_rmsnorm_grid.argtypes = lib.shardkit_ll_rmsnorm_config.argtypes[:4] + [ctypes.c_int, config]
        lib.shardkit_ll_rmsnorm_grid.restype = None
        lib.shardkit_ll_rmsnorm_max_rows.argtypes = [ctypes.c_int64, ctypes.c_int]
        lib.shardkit_ll_rmsnorm_max_rows.restype = ctypes.c_int64
        lib.shardkit_grid.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.shardkit_grid.restype = ctypes.c_int
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
    most ``max_programs`` (and the protocol's MAX_PROGRAMS)."""
    return _load().shardkit_grid(elements, element_size, threads, unroll, max_programs)


@dataclass(frozen=True)
class CudaConfig:
    """Launch grid of a CUDA kernel: ``programs`` blocks of ``threads`` threads, each thread moving
    ``unroll`` 16-byte packs per tile (all in flight before their stores)."""

    programs: int
    threads: int
    unroll: int


@functools.lru_cache(maxsize=1024)
def flat_config(numel: int, element_size: int, sm_count: int) -> CudaConfig:
    """The flat kernel's grid for ``numel`` elements per rank (pure: every rank gets the same)."""
    config = (ctypes.c_int * 3)()
    _load().shardkit_flat_config(numel, element_size, sm_count, config)
    return CudaConfig(*config)


@functools.lru_cache(maxsize=1024)
def tree_config(shard: int, element_size: int, world: int, sm_count: int) -> CudaConfig:
    """The tree kernel's grid for shards of ``shard`` elements (pure: every rank gets the same)."""
    config = (ctypes.c_int * 3)()
    _load().shardkit_tree_config(shard, element_size, world, sm_count, config)
    return CudaConfig(*config)


@functools.lru_cache(maxsize=1024)
def ll_config(numel: int, element_size: int, sm_count: int) -> CudaConfig:
    """The LL kernel's grid (csrc/dda/ll_all_reduce.cu) for ``numel`` elements per rank, at most
    ``LL_MAX_BYTES`` (policy.h: one 8-byte payload line per thread, 512 threads; ``config=`` takes
    others). Pure: every rank gets the same."""
    config = (ctypes.c_int * 3)()
    _load().shardkit_ll_config(numel, element_size, sm_count, config)
    return CudaConfig(*config)


@functools.lru_cache(maxsize=1024)
def ll_rmsnorm_config(tokens: int, hidden: int, element_size: int, sm_count: int) -> CudaConfig:
    """The LL fused all-reduce + residual + RMSNorm's grid (csrc/dda/ll_rmsnorm.cu) for one launch on ``tokens``
    rows of ``hidden`` elements (policy.h: up to 8 blocks per row, a cluster, while tokens x blocks fit the SMs;
    a thread per payload line of a block's range). Pure: every rank gets the same."""
    config = (ctypes.c_int * 3)()
    _load().shardkit_ll_rmsnorm_config(tokens, hidden, element_size, sm_count, config)
    return CudaConfig(*config)


@functools.lru_cache(maxsize=1024)
def ll_rmsnorm_grid(tokens: int, hidden: int, element_size: int, sm_count: int, segments: int) -> CudaConfig:
    """The LL fused kernel's grid with ``segments`` blocks per row (1: a block per row, up to one per SM; 2..8: a
    cluster per row, sm_90) and the policy's threads (policy.h ``ll_rmsnorm_grid``): other grids than the
    policy's, for tuning and tests."""
    config = (ctypes.c_int * 3)()
    _load().shardkit_ll_rmsnorm_grid(tokens, hidden, element_size, sm_count, segments, config)
    return CudaConfig(*config)


@functools.cache
def ll_rmsnorm_max_rows(hidden: int, element_size: int) -> int:
    """Rows of ``hidden`` elements one LL fused launch takes (one LL slot: ``protocol.LL_MAX_BYTES`` of rows
    padded to 8 bytes); 0 when a row is wider than one LL slot."""
    return _load().shardkit_ll_rmsnorm_max_rows(hidden, element_size)


class HostTable:
    """The workspace addresses as a C array, built once per PeerMemory (no per-call allocation)."""

    def __init__(self, addresses: list[int]) -> None:
        self.world = len(addresses)
        self.array = (ctypes.c_int64 * self.world)(*addresses)


def _check(code: int, what: str) -> None:
    if code != 0:
        raise ShardkitError(f"{what}: CUDA error {code} ({_lib.shardkit_error_string(code).decode()})")


def launch_flat_all_reduce(x: torch.Tensor, out: torch.Tensor, table: HostTable, error_record_addr: int, rank: int,
                           sig: int, x_offset: int, buffer_bytes: int, timeout_iters: int, zero_copy: bool,
                           config: CudaConfig) -> None:
    """Launch the CUDA flat all-reduce; arguments as the Triton launcher's; ``config.threads`` up to
    512 (kMaxFlatThreads), ``config.unroll`` 1."""
    stream = torch._C._cuda_getCurrentRawStream(x.device.index)
    _check(_lib.shardkit_flat_all_reduce(x.data_ptr(), out.data_ptr(), table.array, table.world, error_record_addr,
                                         x.numel(), rank, sig, x_offset, buffer_bytes, timeout_iters, int(zero_copy),
                                         config.programs, config.threads, config.unroll, DTYPE_CODES[x.dtype], stream),
           "flat all-reduce launch")


def launch_ll_all_reduce(x: torch.Tensor, out: torch.Tensor, table: HostTable, error_record_addr: int, rank: int,
                         sig: int, buffer_bytes: int, timeout_iters: int, config: CudaConfig) -> None:
    """Launch the CUDA LL all-reduce (one synchronisation: flags in the data) of x (at most
    ``protocol.LL_MAX_BYTES``, any alignment) into out (may be x); arguments as launch_flat_all_reduce,
    without zero-copy (x is read wherever it lives)."""
    stream = torch._C._cuda_getCurrentRawStream(x.device.index)
    _check(_lib.shardkit_ll_all_reduce(x.data_ptr(), out.data_ptr(), table.array, table.world, error_record_addr,
                                       x.numel(), rank, sig, 0, buffer_bytes, timeout_iters, 0, config.programs,
                                       config.threads, config.unroll, DTYPE_CODES[x.dtype], stream),
           "LL all-reduce launch")


def launch_tree_all_reduce(x: torch.Tensor, out: torch.Tensor, table: HostTable, error_record_addr: int, rank: int,
                           sig: int, x_offset: int, buffer_bytes: int, timeout_iters: int, zero_copy: bool,
                           shard: int, config: CudaConfig) -> None:
    """Launch the CUDA tree all-reduce; as launch_flat_all_reduce with up to ``max_tree_threads()``
    threads and ``max_unroll(world)`` packs per thread, over shards of ``shard`` elements."""
    stream = torch._C._cuda_getCurrentRawStream(x.device.index)
    _check(_lib.shardkit_tree_all_reduce(x.data_ptr(), out.data_ptr(), table.array, table.world, error_record_addr,
                                         x.numel(), rank, sig, x_offset, buffer_bytes, timeout_iters, int(zero_copy),
                                         config.programs, config.threads, config.unroll, DTYPE_CODES[x.dtype], shard, stream),
           "tree all-reduce launch")


def launch_ll_all_reduce_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                                 residual_out: torch.Tensor, table: HostTable, error_record_addr: int, rank: int,
                                 sig: int, eps: float, buffer_bytes: int, timeout_iters: int,
                                 config: CudaConfig) -> None:
    """Launch the CUDA LL fused all-reduce + residual + RMSNorm on contiguous [tokens, hidden] x, residual, out,
    residual_out and [hidden] weight (tokens <= ``ll_rmsnorm_max_rows``; out / residual_out may be x or
    residual); ``config`` from ``ll_rmsnorm_config``."""
    tokens, hidden = x.shape
    stream = torch._C._cuda_getCurrentRawStream(x.device.index)
    _check(_lib.shardkit_ll_all_reduce_rmsnorm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                               residual_out.data_ptr(), table.array, table.world, error_record_addr,
                                               tokens, hidden, eps, rank, sig, buffer_bytes, timeout_iters,
                                               config.programs, config.threads, DTYPE_CODES[x.dtype], stream),
           "LL all-reduce + RMSNorm launch")
