"""PeerMemory: a symmetric workspace on every rank of a process group, plus its pointer table.

The workspace layout (signal area, staging, two epoch buffers) is the protocol's
(``shardkit/memory/protocol.py``). Kernels get ``table`` (int64[world] of workspace addresses,
valid in this process, on the workspace's device) and ``error_record_addr`` (this rank's int32[4]
error record in host memory, device-visible pinned memory on CUDA), and never learn which backend
made the memory.

Backends:
  * ``cuda``: ``torch.distributed._symmetric_memory`` (NVLink P2P mappings of one allocation per rank).
  * ``cpu``: POSIX shared memory mapped by every rank process; with ``TRITON_INTERPRET=1`` the same
    Triton kernels run on the CPU and their atomics really synchronise the processes.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import ShardkitError
from .protocol import MAX_WORLD, SIGNAL_BYTES, ll_offset, staging_offset, workspace_bytes
from .shm import SharedSegments

DEFAULT_BUFFER_BYTES = {"cuda": 32 << 20, "cpu": 256 << 10}
_ALIGN = 4096


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


class PeerMemory:
    """Symmetric workspace on every rank of ``group``.

    Args:
        group: the process group (default: the world). All its ranks must construct it together.
        buffer_bytes: capacity of one call (one epoch buffer), in bytes (rounded up to 4 KiB). Larger inputs are
            processed in chunks of this size. Default 32 MiB on cuda, 256 KiB on cpu.
        backend: "cuda" or "cpu"; default: "cuda" when the group's backend is NCCL, else "cpu".
        device: the CUDA device of this rank (default: the current device).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, buffer_bytes: int | None = None,
                 backend: str | None = None, device: torch.device | None = None) -> None:
        if not dist.is_initialized():
            raise ShardkitError("PeerMemory needs an initialised torch.distributed process group")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if backend is None:
            backend = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        if backend not in ("cuda", "cpu"):
            raise ValueError(f"PeerMemory: backend must be 'cuda' or 'cpu', got {backend!r}")
        if not 1 <= self.world_size <= MAX_WORLD:
            raise ShardkitError(f"PeerMemory supports 1..{MAX_WORLD} ranks, the group has {self.world_size}")
        self.backend = backend
        size = DEFAULT_BUFFER_BYTES[backend] if buffer_bytes is None else int(buffer_bytes)
        if size <= 0:
            raise ValueError(f"PeerMemory: buffer_bytes must be positive, got {buffer_bytes}")
        self.buffer_bytes = -(-size // _ALIGN) * _ALIGN
        self.nbytes = workspace_bytes(self.buffer_bytes, self.world_size)
        self._closed = False
        if backend == "cpu":
            self.device = torch.device("cpu")
            self._segments = SharedSegments(self.group, self.nbytes)
            self.buffer = self._segments.tensors[self.rank]
            addresses = self._segments.addresses
            self._peer_bytes = self._segments.tensors
            record = torch.zeros(4, dtype=torch.int32)
        else:
            self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
            addresses = self._alloc_symmetric()
            record = torch.zeros(4, dtype=torch.int32, pin_memory=True)
        self._set_table(addresses, record)

    def _set_table(self, addresses: list[int], record: torch.Tensor) -> None:
        self.table = torch.tensor(addresses, dtype=torch.int64, device=self.device)
        self._error_record_tensor = record
        self.error_record_addr = record.data_ptr()
        # The error record (code, slot, culprit bitmask, epoch) is read on every call: a numpy view
        # reads it without torch's per-op overhead.
        self.error_record = record.numpy()

    @classmethod
    def on_one_device(cls, world: int, buffer_bytes: int, device: torch.device | str) -> list["PeerMemory"]:
        """Every rank's workspace of a ``world``-rank group on one CUDA device, in this process, without a
        process group: element r is rank r's PeerMemory (``table``, ``peer_view`` and the rest as usual).

        For tests of GPU-only code where one GPU is at hand. The caller launches each rank's work on its
        own stream, all ranks' launches of a phase before the host waits for any, with grids small
        enough for every rank's programs to be resident at once (a program spinning at a barrier holds
        its SM). A peer access is then an access to local HBM: times measured so are not NVLink's.
        """
        if not 1 <= world <= MAX_WORLD:
            raise ValueError(f"PeerMemory.on_one_device: world must be in 1..{MAX_WORLD}, got {world}")
        if buffer_bytes <= 0:
            raise ValueError(f"PeerMemory.on_one_device: buffer_bytes must be positive, got {buffer_bytes}")
        size = -(-int(buffer_bytes) // _ALIGN) * _ALIGN
        nbytes = workspace_bytes(size, world)
        device = torch.device(device)
        if device.index is None:  # tensors report their device with its index
            device = torch.device(device.type, torch.cuda.current_device())
        buffers = [torch.zeros(nbytes, dtype=torch.uint8, device=device) for _ in range(world)]
        ranks = []
        for r in range(world):
            m = cls.__new__(cls)
            m.group, m.rank, m.world_size, m.backend, m.device = None, r, world, "cuda", device
            m.buffer_bytes, m.nbytes, m._closed = size, nbytes, False
            m.buffer, m._peer_bytes, m._handle = buffers[r], buffers, None
            m._set_table([b.data_ptr() for b in buffers], torch.zeros(4, dtype=torch.int32, pin_memory=True))
            ranks.append(m)
        return ranks

    def _alloc_symmetric(self) -> list[int]:
        import torch.distributed._symmetric_memory as symm_mem

        with torch.cuda.device(self.device):
            if _torch_version() < (2, 11):
                symm_mem.enable_symm_mem_for_group(self.group.group_name)
            self.buffer = symm_mem.empty(self.nbytes, dtype=torch.uint8, device=self.device)
            self._handle = symm_mem.rendezvous(self.buffer, self.group.group_name)
            self.buffer[:SIGNAL_BYTES].zero_()
            # The LL kernel's flags live in its data: no stale flag may equal a future one (protocol.py).
            self.buffer[ll_offset(self.buffer_bytes):].zero_()
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)  # nobody signals into a pad (or LL slot) that is not zeroed yet
        self._peer_bytes = None  # peer_view's tensors, made on first use
        return list(self._handle.buffer_ptrs)

    @property
    def staging_offset(self) -> int:
        """Byte offset of the zero-copy staging area inside every rank's workspace."""
        return staging_offset()

    def staging(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of ``numel`` elements at the start of this rank's staging area.

        Write an input here and pass it to a collective to skip the copy into the workspace. The same
        area is handed out again by the next call: its content is only yours until then.
        """
        self._check_open()
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes > self.buffer_bytes:
            raise ValueError(f"staging: {nbytes} bytes requested, the staging area holds {self.buffer_bytes}")
        lo = staging_offset()
        return self.buffer[lo:lo + nbytes].view(dtype)

    def holds(self, t: torch.Tensor) -> int | None:
        """Byte offset of ``t`` inside the staging area of this rank's workspace, or None."""
        if t.device != self.device:
            return None
        offset = t.data_ptr() - self.buffer.data_ptr()
        nbytes = t.numel() * t.element_size()
        if staging_offset() <= offset and offset + nbytes <= staging_offset() + self.buffer_bytes:
            return offset
        return None

    def peer_view(self, rank: int, byte_offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """``numel`` elements of ``dtype`` at ``byte_offset`` of rank ``rank``'s workspace, as a flat
        tensor on this rank's device (cuda: the P2P mapping, so ``dst.copy_(src)`` with a peer view on
        one side is a copy-engine transfer over NVLink; cpu: the shared-memory mapping).

        The view aliases the peer's memory: the caller synchronises (barriers) before reading what a
        peer writes. ``byte_offset`` must be a multiple of the element size.
        """
        self._check_open()
        if self._peer_bytes is None:  # cuda: every rank's whole workspace as a uint8 tensor on this device
            views = [self._handle.get_buffer(r, (self.nbytes,), torch.uint8) for r in range(self.world_size)]
            if [v.data_ptr() for v in views] != list(self._handle.buffer_ptrs):  # the table's addresses
                raise ShardkitError("peer_view: torch's symmetric-memory buffers do not start at the pointer table's "
                                    "addresses")
            self._peer_bytes = views
        size = dtype.itemsize
        if not 0 <= rank < self.world_size:
            raise ValueError(f"peer_view: rank must be in 0..{self.world_size - 1}, got {rank}")
        if byte_offset < 0 or numel < 0 or byte_offset % size or byte_offset + numel * size > self.nbytes:
            raise ValueError(f"peer_view: {numel} x {dtype} at byte {byte_offset} is not an aligned range of the "
                             f"{self.nbytes}-byte workspace")
        return self._peer_bytes[rank][byte_offset:byte_offset + numel * size].view(dtype)

    def _check_open(self) -> None:
        if self._closed:
            raise ShardkitError("PeerMemory is closed")

    def close(self) -> None:
        """Release the workspace (idempotent). Every rank should close before destroying the group."""
        if self._closed:
            return
        self._closed = True
        self._peer_bytes = None
        if self.backend == "cpu":
            self.buffer = None
            self._segments.close()
        else:
            self._handle = None
            self.buffer = None

    def __enter__(self) -> "PeerMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def in_interpreter() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
