"""Shared-memory hygiene of the cpu backend: named per session and creator, dead creators swept,
mappings that outlive close() while a tensor uses them, workers that die with their parent."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
import torch.distributed as dist

from shardkit import PeerMemory
from shardkit.memory.shm import PREFIX, SHM_DIR, session_id, session_segments, sweep_dead_segments
from shardkit.testing import ProcessWorld, RankError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _segment_path(session: str, pid: int) -> str:
    return os.path.join(SHM_DIR, f"{PREFIX}{session}-{pid}-{uuid.uuid4().hex}-r0")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _touch(path: str) -> None:
    with open(path, "wb"):
        pass


def mapped_segments() -> list[str]:
    """This process's mappings of this session's segments (unlinked, so listed as '(deleted)')."""
    with open("/proc/self/maps") as f:
        return [word for line in f for word in line.split() if f"{PREFIX}{session_id()}-" in word]


def staging_after_close() -> tuple[float, list[str], int]:
    """Write a staging buffer, close the memory, read it back; then drop it."""
    mem = PeerMemory()
    stage = mem.staging(1000, torch.float32)
    stage.fill_(dist.get_rank() + 1)
    names = mapped_segments()
    dist.barrier()
    mem.close()
    total = stage.sum().item()  # used to read unmapped memory: a segfault
    del stage, mem
    return total, names, len(mapped_segments())


def test_staging_buffer_readable_after_close_then_unmapped(worlds):
    world = worlds(2)
    results = world.run(staging_after_close)
    creators = set()
    for rank, (total, names, left) in enumerate(results):
        assert total == 1000.0 * (rank + 1)
        assert left == 0, "the mappings outlived every tensor over them"
        assert len(names) == 2, names
        for name in names:  # shardkit-<session>-<creator pid>-<random>-r<rank>
            session, pid = os.path.basename(name).split("-")[1:3]
            assert session == session_id(), name
            creators.add(int(pid))
    assert creators == set(world.pids)


def test_sweep_removes_only_dead_creators_segments():
    dead = _segment_path(session_id(), _dead_pid())
    foreign_dead = _segment_path("othersession", _dead_pid())
    alive = _segment_path("othersession", os.getpid())
    for path in (dead, foreign_dead, alive):
        _touch(path)
    try:
        removed = sweep_dead_segments()
        assert dead in removed and foreign_dead in removed and alive not in removed
        assert not os.path.exists(dead) and not os.path.exists(foreign_dead) and os.path.exists(alive)
    finally:
        for path in (dead, foreign_dead, alive):
            if os.path.exists(path):
                os.unlink(path)


def make_peer_memory() -> None:
    PeerMemory().close()


def test_new_segments_sweep_a_dead_creators_segment(worlds):
    dead = _segment_path(session_id(), _dead_pid())
    _touch(dead)
    try:
        worlds(2).run(make_peer_memory)
        assert not os.path.exists(dead)
    finally:
        if os.path.exists(dead):
            os.unlink(dead)


def test_sessions_do_not_see_each_other():
    ours = _segment_path(session_id(), os.getpid())
    theirs = _segment_path("othersession", os.getpid())
    for path in (ours, theirs):
        _touch(path)
    try:
        assert ours in session_segments() and theirs not in session_segments()
        assert session_segments("othersession") == [theirs]
    finally:
        for path in (ours, theirs):
            os.unlink(path)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie left for a reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


WORLD_THEN_SLEEP = """
import sys, time
from shardkit.testing import ProcessWorld
world = ProcessWorld(2)
print(*world.pids, flush=True)
time.sleep(600)
"""


def test_workers_exit_when_their_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", WORLD_THEN_SLEEP], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and not any(_gone(p) for p in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10.0
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if not _gone(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived their SIGKILLed parent by 10 s"


WATCHED_CHILD = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import os, sys, time; sys.path.insert(0, {root!r}); "
                  "from shardkit.testing import exit_with_parent; "
                  "exit_with_parent(os.getppid(), poll_s=0.1, use_prctl=False); "
                  "print(os.getpid(), flush=True); time.sleep(600)"]).wait()
"""


def test_watchdog_alone_ends_an_orphan():
    """The fallback without prctl: the parent-pid watchdog thread."""
    parent = subprocess.Popen([sys.executable, "-c", WATCHED_CHILD.format(root=ROOT)], stdout=subprocess.PIPE,
                              text=True)
    pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5.0
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _gone(pid):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the orphan outlived its parent by 5 s")


def fail_on_rank_1(leave_group: bool) -> None:
    if dist.get_rank() == 1:
        if leave_group:
            dist.destroy_process_group()
        raise RuntimeError("rank 1 fails")


def test_a_world_whose_group_broke_is_not_reused():
    """A rank error leaves a shared world usable only if its process group still works."""
    world = ProcessWorld(2)
    try:
        pids = world.pids
        with pytest.raises(RankError):
            world.run(fail_on_rank_1, False)
        assert world.healthy() and world.pids == pids
        with pytest.raises(RankError):
            world.run(fail_on_rank_1, True)
        assert not world.healthy() and not world.alive
    finally:
        world.close(kill=True)
