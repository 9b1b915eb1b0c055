"""A persistent group of worker processes for multi-rank tests and CPU runs.

``ProcessWorld(world_size, backend)`` starts one process per rank (spawned, so CUDA and the Triton
interpreter start clean), joins them in a torch.distributed group once, and then runs any number of
functions on all ranks: ``world.run(fn, *args)`` calls ``fn(*args)`` on every rank and returns the
per-rank results. Starting processes and importing torch costs seconds; a test suite reuses one
world per size. A function that hangs past ``timeout`` kills the world and raises, never hangs.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import queue
import socket
import time
import traceback
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, backend: str, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
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
        self._procs = [ctx.Process(target=_worker, args=(r, world_size, backend, port, self._tasks[r], self._results),
                                   daemon=True) for r in range(world_size)]
        for p in self._procs:
            p.start()
        self._collect(start_timeout, "start")

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

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

