"""POSIX shared memory for the cpu backend: each rank maps every rank's segment.

Each rank creates one segment, the names travel over the (gloo) process group, every rank maps all
of them, and after a barrier each rank unlinks its own name. From then on the memory lives only in
the mappings: nothing is left under /dev/shm, however the processes end.
"""
from __future__ import annotations

import mmap
import os
import uuid

import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
PREFIX = "shardkit-"


def _map(path: str, nbytes: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


class SharedSegments:
    """Every rank's segment of ``nbytes``, mapped into this process.

    ``tensors[r]`` is a uint8 CPU tensor over rank r's segment; ``addresses[r]`` its address here.
    """

    def __init__(self, group: dist.ProcessGroup, nbytes: int) -> None:
        rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        own_path = os.path.join(SHM_DIR, f"{PREFIX}{uuid.uuid4().hex}-r{rank}")
        own = _map(own_path, nbytes, create=True)
        try:
            paths: list[str | None] = [None] * world
            dist.all_gather_object(paths, own_path, group=group)
            self._maps = [own if r == rank else _map(p, nbytes, create=False) for r, p in enumerate(paths)]
            dist.barrier(group=group)  # every rank holds every mapping: the names can go
        finally:
            os.unlink(own_path)
        self.tensors = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self.addresses = [t.data_ptr() for t in self.tensors]

    def close(self) -> None:
        self.tensors = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view handed to the user is still alive; the GC unmaps it later
                pass
        self._maps = []
