"""POSIX shared memory for the cpu backend: each rank maps every rank's segment.

Each rank creates one segment, the names travel over the (gloo) process group, every rank maps all
of them, and after a barrier each rank unlinks its own name. From then on the memory lives only in
the mappings: nothing is left under /dev/shm, however the processes end.

Names are ``shardkit-<session>-<pid>-<random>-r<rank>``: ``session`` is ``$SHARDKIT_SESSION`` (the
test suite sets one per run, so that its leak check sees only its own segments) or ``default``, and
``pid`` is the creating process. A process killed between creating its segment and the unlink
leaves the name behind; the next ``SharedSegments`` on the machine removes every segment whose
creator no longer exists (``sweep_dead_segments``).

Lifetime: ``close()`` drops shardkit's references to the mappings. A mapping is unmapped when the
last tensor over it is gone, so a staging buffer handed out earlier stays readable (it no longer
takes part in any collective) instead of pointing at unmapped memory.
"""
from __future__ import annotations

import glob
import mmap
import os
import re
import uuid

import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
PREFIX = "shardkit-"
SESSION_ENV = "SHARDKIT_SESSION"
_NAME = re.compile(re.escape(PREFIX) + r"(?P<session>[A-Za-z0-9]+)-(?P<pid>[0-9]+)-[0-9a-f]+-r[0-9]+")


def session_id() -> str:
    """This process's session: ``$SHARDKIT_SESSION`` reduced to letters and digits, else ``default``."""
    session = re.sub(r"[^A-Za-z0-9]", "", os.environ.get(SESSION_ENV, ""))[:32]
    return session or "default"


def session_segments(session: str | None = None) -> list[str]:
    """Paths of the segments of ``session`` (default: this process's) present under /dev/shm."""
    session = session_id() if session is None else session
    return sorted(p for p in glob.glob(os.path.join(SHM_DIR, f"{PREFIX}{session}-*"))
                  if _NAME.fullmatch(os.path.basename(p)))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_dead_segments() -> list[str]:
    """Remove the shardkit segments (of any session) whose creating process is gone; returns their paths.

    A live creator's segment is left alone, whatever its session. Names without a pid (older
    shardkit versions) are not touched. Assumes that the processes sharing /dev/shm share one pid
    namespace (as the ranks of one host do).
    """
    removed = []
    for path in glob.glob(os.path.join(SHM_DIR, PREFIX + "*")):
        match = _NAME.fullmatch(os.path.basename(path))
        if match is None or _process_exists(int(match["pid"])):
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:  # another process swept it first
            continue
        removed.append(path)
    return removed


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
        sweep_dead_segments()
        own_path = os.path.join(SHM_DIR, f"{PREFIX}{session_id()}-{os.getpid()}-{uuid.uuid4().hex}-r{rank}")
        own = _map(own_path, nbytes, create=True)
        try:
            paths: list[str | None] = [None] * world
            dist.all_gather_object(paths, own_path, group=group)
            maps = [own if r == rank else _map(p, nbytes, create=False) for r, p in enumerate(paths)]
            dist.barrier(group=group)  # every rank holds every mapping: the names can go
        finally:
            os.unlink(own_path)
        # torch.frombuffer keeps a reference to its mmap (but no buffer export): the mapping lives as
        # long as any tensor over it, and nothing may call mmap.close() while one does.
        self.tensors = [torch.frombuffer(m, dtype=torch.uint8) for m in maps]
        self.addresses = [t.data_ptr() for t in self.tensors]

    def close(self) -> None:
        """Drop shardkit's references; each mapping is unmapped once no tensor over it is left."""
        self.tensors = []
