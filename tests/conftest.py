"""Test set-up: the Triton interpreter without CUDA, shared multi-process worlds, leak checks."""
import glob
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first import of triton: every kernel then runs on CPU tensors.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from shardkit.memory.shm import PREFIX, SHM_DIR  # noqa: E402
from shardkit.testing import ProcessWorld  # noqa: E402


def gpu_count() -> int:
    return torch.cuda.device_count() if HAS_CUDA else 0


@pytest.fixture(scope="session")
def worlds():
    """``worlds(n, backend)`` -> a live ProcessWorld, started once and reused across tests."""
    cache: dict = {}

    def get(n: int, backend: str = "gloo") -> ProcessWorld:
        w = cache.get((n, backend))
        if w is None or not w.alive:
            w = cache[(n, backend)] = ProcessWorld(n, backend)
        return w

    yield get
    for w in cache.values():
        w.close()


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Every test must leave /dev/shm as it found it, whatever its ranks did."""
    before = set(glob.glob(os.path.join(SHM_DIR, PREFIX + "*")))
    yield
    leaked = set(glob.glob(os.path.join(SHM_DIR, PREFIX + "*"))) - before
    assert not leaked, f"leaked shared-memory segments: {sorted(leaked)}"
