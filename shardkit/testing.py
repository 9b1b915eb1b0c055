"""A persistent group of worker processes for multi-rank tests and CPU runs.

``ProcessWorld(world_size, backend)`` starts one process per rank (spawned, so CUDA and the Triton
interpreter start clean), joins them in a torch.distributed group once, and then runs any number of
functions on all ranks: ``world.run(fn, *args)`` calls ``fn(*args)`` on every rank and returns the
per-rank results. Starting processes and importing torch costs seconds; a test suite reuses one
world per size. A function that hangs past ``timeout`` kills the world and raises, never hangs.
Workers exit when the process that started them dies, however it dies (``exit_with_parent``).
"""
from __future__ import annotations

import ctypes
import datetime
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent_pid: int, poll_s: float = 0.5, use_prctl: bool = True) -> None:
    """End this process when ``parent_pid`` (its parent) dies, even by SIGKILL.

    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG; it follows the
    parent *thread* that started us, so start worlds from a thread that outlives them, e.g. the
    main one). Where prctl is missing, a daemon thread checks every ``poll_s`` seconds that we still
    have that parent (also the fallback if the signal was lost). ``use_prctl=False``: the thread only.
    """
    if use_prctl and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog below still works

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    if os.getppid() != parent_pid:  # died before we got here
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, backend: str, port: int, tasks: mp.Queue, results: mp.Queue,
            parent_pid: int) -> None:
    exit_with_parent(parent_pid)
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120),
                            **({"device_id": torch.device("cuda", rank)} if backend == "nccl" else {}))
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, "ok", fn(*args)))
        except BaseException as e:  # report everything, including assertion failures, to the parent
            results.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))
    dist.destroy_process_group()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


class RankError(AssertionError):
    """Raised by ProcessWorld.run when a rank raised; ``errors`` maps rank -> (type name, message)."""

    def __init__(self, errors: dict[int, tuple[str, str, str]]) -> None:
        self.errors = {r: (t, m) for r, (t, m, _) in errors.items()}
        text = "\n".join(f"--- rank {r}: {tb}" for r, (_, _, tb) in sorted(errors.items()))
        super().__init__(f"{len(errors)} rank(s) raised:\n{text}")


class ProcessWorld:
    """``world_size`` worker processes in one process group ("gloo" or "nccl")."""

    def __init__(self, world_size: int, backend: str = "gloo", start_timeout: float = 180.0) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, world_size, backend, port, self._tasks[r], self._results, os.getpid()))
                       for r in range(world_size)]
        self._suspect = False  # a rank raised: its process group may be broken (e.g. a gloo timeout)
        for p in self._procs:
            p.start()
        self._collect(start_timeout, "start")

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids, in rank order."""
        return [p.pid for p in self._procs]

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def healthy(self) -> bool:
        """Alive and, if a rank raised since the last check, its process group still works (a
        barrier); a broken world (e.g. after a gloo timeout) is stopped, so that one failure does
        not fail every later user of a shared world."""
        if self.alive and self._suspect:
            self._suspect = False
            try:
                self.run(_barrier, timeout=60.0)
            except (RankError, TimeoutError):
                self.close(kill=True)
        return self.alive

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> list[Any]:
        """Run ``fn(*args)`` on every rank; return the results in rank order.

        ``fn`` must be importable (a module-level function). Raises RankError if any rank raised,
        TimeoutError (after killing the world) if a rank did not finish in ``timeout`` seconds.
        """
        for q in self._tasks:
            q.put((fn, args))
        return self._collect(timeout, getattr(fn, "__name__", str(fn)))

    def _collect(self, timeout: float, what: str) -> list[Any]:
        results: dict[int, Any] = {}
        errors: dict[int, tuple[str, str, str]] = {}
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < self.world_size:
            try:
                rank, status, payload = self._results.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close(kill=True)
                    why = f"rank(s) {dead} died" if dead else f"no answer within {timeout:g} s"
                    raise TimeoutError(f"ProcessWorld: {what}: {why}; the world was stopped") from None
                continue
            if status == "error":
                errors[rank] = payload
            else:
                results[rank] = payload
        if errors:
            self._suspect = True
            raise RankError(errors)
        return [results[r] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        for p, q in zip(self._procs, self._tasks):
            if kill:
                p.kill()
            elif p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        self._procs = []


def capture_graph(fn: Callable[[], Any], warmups: int = 1) -> tuple[Any, Any]:
    """``fn``'s work captured in a CUDA graph after ``warmups`` calls on a side stream (so the
    kernels are compiled and the allocator has its blocks outside the capture); returns the graph
    and what the captured call returned (tensors of the graph's memory pool)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def launch_ranks(world: int, launch: Callable[[int], Any]) -> list[Any]:
    """``launch(r)`` for every rank r of a group emulated on one GPU (``PeerMemory.on_one_device``), each
    with a stream of its own current, all ranks' launches before the host waits; returns their results
    after the device is done. Two things can stall a rank behind another's spinning kernel, and then the
    round times out: a kernel's first launch loads its module, which under CUDA's lazy loading can wait
    for the running kernels (run a warm-up round with a short timeout, its result ignored, before a
    checked one, with the same pointers' alignment and sizes); and streams of different ranks sharing a
    hardware queue (set ``CUDA_DEVICE_MAX_CONNECTIONS=32`` before CUDA starts, as tests/conftest.py does)."""
    import torch

    streams = [torch.cuda.Stream() for _ in range(world)]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    results = []
    for r, s in enumerate(streams):
        with torch.cuda.stream(s):
            results.append(launch(r))
    torch.cuda.synchronize()
    return results
