"""Test set-up: the Triton interpreter without CUDA, shared multi-process worlds, leak checks."""
import os
import uuid

import torch

# Ranks emulated on one GPU (PeerMemory.on_one_device) each use several streams; with the default 8
# hardware queues, streams of different ranks share one, and a rank's spinning kernel then blocks
# another rank's launch behind it (the one-GPU copy-engine test timed out so on one H200; with 32 it
# passed). Read when the CUDA context is created, so it is set before any test touches the GPU.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first import of triton: every kernel then runs on CPU tensors.
    os.environ["TRITON_INTERPRET"] = "1"

# One shared-memory session per test run (inherited by the worker processes): the leak check below
# sees only this run's segments, so two runs on one machine do not fail each other.
os.environ["SHARDKIT_SESSION"] = "pytest" + uuid.uuid4().hex[:12]

import pytest  # noqa: E402

from shardkit.memory.shm import session_segments  # noqa: E402
from shardkit.testing import ProcessWorld  # noqa: E402


def gpu_count() -> int:
    return torch.cuda.device_count() if HAS_CUDA else 0


@pytest.fixture(scope="session")
def worlds():
    """``worlds(n, backend)`` -> a live ProcessWorld, started once and reused across tests."""
    cache: dict = {}

    def get(n: int, backend: str = "gloo") -> ProcessWorld:
        w = cache.get((n, backend))
        if w is None or not w.healthy():
            w = cache[(n, backend)] = ProcessWorld(n, backend)
        return w

    yield get
    for w in cache.values():
        w.close()


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Every test must leave this run's part of /dev/shm as it found it, whatever its ranks did."""
    before = set(session_segments())
    yield
    leaked = set(session_segments()) - before
    assert not leaked, f"leaked shared-memory segments: {sorted(leaked)}"
