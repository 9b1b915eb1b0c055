"""A cross-rank barrier as a kernel of its own: one program, one call of the workspace protocol.

Algorithms whose data moves outside Triton kernels (copy-engine transfers, torch ops: see
``shardkit/collectives/copy_engine.py``) still need the peers to agree that a buffer is ready or
free. This kernel is that agreement, enqueued on the current stream like any other work (so it is
captured into CUDA graphs and runs in the interpreter on CPU worlds):

  * ``start_call`` reads the call epoch, ``peer_barrier`` (stage 0, program 0) publishes this rank's
    arrival with the call's fingerprint and waits for every peer's, ``finish_call`` bumps the epoch;
  * everything enqueued before it on this stream has finished before the arrival is published (stream
    order), and everything enqueued after it starts after every peer arrived;
  * ranks that disagree about the call (the fingerprint ``sig``) or a peer that never arrives are
    recorded in the error record, exactly as in the all-reduce kernels (``kernels/sync.py``); the
    barrier then returns at once and the caller's later calls fail.

Each barrier is one call of the protocol, so the epoch-buffer rule holds across algorithms: after
a barrier returns, every peer has finished every earlier call on this workspace.
"""
import torch
import triton
import triton.language as tl

from .launch import CachedLauncher, int_key, ptr_key
from .sync import finish_call, peer_barrier, start_call


@triton.jit(do_not_specialize=["error_record_addr", "rank", "sig", "buffer_bytes", "timeout_iters"])
def barrier_kernel(table_ptr, error_record_addr, rank, sig, buffer_bytes, timeout_iters,
                   WORLD: tl.constexpr, WORLD_P2: tl.constexpr):
    """table_ptr: int64[WORLD] workspace addresses; sig: the 31-bit call fingerprint; the other
    arguments as in the all-reduce kernels. Launched with exactly one program."""
    own, epoch, flag, ok, buf = start_call(table_ptr, rank, sig, buffer_bytes)
    ok = peer_barrier(table_ptr, rank, 0, flag, ok, error_record_addr, timeout_iters, WORLD, WORLD_P2)
    finish_call(own, epoch)


_launch = CachedLauncher(barrier_kernel)


def launch_barrier(table: torch.Tensor, error_record_addr: int, rank: int, world: int, sig: int, buffer_bytes: int,
                   timeout_iters: int) -> None:
    """Enqueue one barrier of the ranks of ``table`` on the current stream (see the module)."""
    consts = {"WORLD": world, "WORLD_P2": triton.next_power_of_2(world)}
    # Unspecialised integers still compile as i32 or i64 by value: the key carries their range.
    key = (ptr_key(table), int_key(error_record_addr), int_key(buffer_bytes), int_key(timeout_iters))
    _launch(key, 1, (table, error_record_addr, rank, sig, buffer_bytes, timeout_iters), consts, 1)
