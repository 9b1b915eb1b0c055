"""Ranks whose calls differ anywhere in the whole call must fail on every rank, not mix data.

Before the fingerprint covered the whole call, a rank reducing 3 workspace chunks and a rank
reducing 2 passed the barriers of the first two chunks (each chunk alike) and returned garbage;
ranks passing different ``eps`` to the fused RMSNorm got different outputs without noticing.
"""
import pytest
import torch
import torch.distributed as dist

from shardkit import CollectiveError, Communicator

BUFFER = 4096  # bytes: 1024 fp32 elements per chunk


def _outcome(fn) -> str:
    try:
        fn()
    except CollectiveError as e:
        return "error: " + str(e)
    return "returned"


def chunk_counts_differ(algo: str) -> str:
    """Rank 0 reduces 2 whole chunks, the others 3: same chunk shapes, different calls."""
    rank = dist.get_rank()
    comm = Communicator(buffer_bytes=BUFFER, timeout_s=5)
    try:
        x = torch.randn((2 if rank == 0 else 3) * 1024)
        return _outcome(lambda: comm.all_reduce(x, algo=algo))
    finally:
        comm.close()


def eps_differs(algo: str) -> str:
    rank = dist.get_rank()
    comm = Communicator(timeout_s=5)
    try:
        x, r, w = torch.randn(3, 40), torch.randn(3, 40), torch.ones(40)
        return _outcome(lambda: comm.all_reduce_residual_rmsnorm(x, r, w, eps=1e-6 * (1 + rank), algo=algo))
    finally:
        comm.close()


def token_chunks_differ(algo: str) -> str:
    """The fused op's rows in workspace chunks: rank 0 sends 2 chunks' worth of rows, others 3."""
    rank = dist.get_rank()
    comm = Communicator(buffer_bytes=BUFFER, timeout_s=5)  # 16 rows of 64 fp32 (flat) per chunk
    try:
        rows = 16 if algo == "flat" else 8
        n = (2 if rank == 0 else 3) * rows
        x, r, w = torch.randn(n, 64), torch.randn(n, 64), torch.ones(64)
        return _outcome(lambda: comm.all_reduce_residual_rmsnorm(x, r, w, algo=algo))
    finally:
        comm.close()


@pytest.mark.parametrize("algo", ["flat", "tree"])
def test_all_reduce_chunk_count_mismatch_fails_everywhere(worlds, algo):
    outcomes = worlds(2).run(chunk_counts_differ, algo)
    assert all(o.startswith("error:") and "different" in o for o in outcomes), outcomes


@pytest.mark.parametrize("algo", ["flat", "tree"])
def test_rmsnorm_eps_mismatch_fails_everywhere(worlds, algo):
    outcomes = worlds(2).run(eps_differs, algo)
    assert all(o.startswith("error:") for o in outcomes), outcomes


def test_rmsnorm_row_chunk_mismatch_fails_everywhere(worlds):
    outcomes = worlds(2).run(token_chunks_differ, "flat")
    assert all(o.startswith("error:") for o in outcomes), outcomes
