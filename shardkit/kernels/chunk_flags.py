"""Per-chunk flags inside one call of the workspace protocol: signal "chunk k is ready" to the peers,
or wait until every peer said so, as a one-program kernel of its own.

The copy-engine all-reduce's "flags" schedule (``shardkit/collectives/copy_engine.py``) moves data
with copy-engine transfers on side streams and needs, per chunk, one-way notices instead of full
barriers: "my pieces of chunk k are in your workspace" and "my reduced chunk k is ready". A full
barrier (``kernels/barrier.py``) makes every rank wait for every other and is a protocol call of its
own (it bumps the epoch); a flag is written by one side and awaited by the other, on any stream,
between a call's start and end barriers:

  * the call's epoch is the one the start barrier published (read, never bumped here: the end
    barrier is the next protocol call), so every flag of the call carries the same epoch, and a
    slot's value from an earlier call (any algorithm's, older epoch) is never mistaken for it;
  * a flag word is ``sig * 2**32 + epoch`` in the signal area's slots (``memory/protocol.py``), in the
    sender's column of the slot, written to every peer with one vector exchange (release, system
    scope) after everything enqueued before it on its stream (stream order: a copy-engine transfer
    before it has landed);
  * the waiter polls its own slot's peer columns with ``sync.wait_flags`` (volatile loads, one
    acquire after the loop, as the barrier); a flag of this epoch with another ``sig`` (the peers
    disagree about the call) or no flag within ``timeout_iters`` polls is recorded in the error
    record, and a kernel that finds a recorded error returns at once: no hang.

One program, so a waiting flag kernel never keeps another kernel from the SMs (a spinning sum kernel
of many programs could, and the peer's notice would then never be sent).
"""
import torch
import triton
import triton.language as tl

from ..memory.protocol import EPOCH_MOD, EPOCH_OFF, ERROR_OFF, MAX_WORLD, SLOTS_OFF
from .launch import CachedLauncher, int_key, ptr_key
from .sync import wait_flags

_EPOCH_MOD = tl.constexpr(EPOCH_MOD)
_EPOCH_OFF = tl.constexpr(EPOCH_OFF)
_ERROR_OFF = tl.constexpr(ERROR_OFF)
_SLOTS_OFF = tl.constexpr(SLOTS_OFF)
_MAX_WORLD = tl.constexpr(MAX_WORLD)


@triton.jit(do_not_specialize=["error_record_addr", "rank", "signal_slot", "signal_sig", "wait_slot", "wait_sig",
                               "timeout_iters"])
def chunk_flags_kernel(table_ptr, error_record_addr, rank, signal_slot, signal_sig, wait_slot, wait_sig, timeout_iters,
                       SIGNAL: tl.constexpr, WAIT: tl.constexpr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr):
    """table_ptr: int64[WORLD] workspace addresses. SIGNAL: write ``signal_sig``'s flag into slot
    ``signal_slot`` of every peer; then WAIT: until slot ``wait_slot`` holds ``wait_sig``'s flag from
    every peer. Slots index the protocol's slot rows; sigs are 31-bit fingerprints. One program."""
    own = tl.load(table_ptr + rank)
    epoch = tl.load((own + _EPOCH_OFF).to(tl.pointer_type(tl.int64)), volatile=True) % _EPOCH_MOD
    error_ptr = (own + _ERROR_OFF).to(tl.pointer_type(tl.int32))
    peers = tl.arange(0, WORLD_P2)
    is_peer = (peers < WORLD) & (peers != rank)
    if tl.load(error_ptr, volatile=True) == 0:  # an earlier failure: the call is lost, skip (no hang)
        if SIGNAL:
            bases = tl.load(table_ptr + peers, mask=is_peer, other=0)
            dst = (bases + _SLOTS_OFF + (signal_slot * _MAX_WORLD + rank) * 8).to(tl.pointer_type(tl.int64))
            flag = signal_sig.to(tl.int64) * _EPOCH_MOD + epoch
            tl.atomic_xchg(dst, tl.zeros([WORLD_P2], tl.int64) + flag, mask=is_peer, sem="release", scope="sys")
        if WAIT:
            mine = (own + _SLOTS_OFF + (wait_slot * _MAX_WORLD + peers) * 8).to(tl.pointer_type(tl.int64))
            want = wait_sig.to(tl.int64) * _EPOCH_MOD + epoch
            # A peer's flag can carry no later epoch here: its next call needs our end barrier first.
            wait_flags(mine, is_peer, want, own, error_record_addr, timeout_iters, wait_slot, WORLD_P2)


_launch = CachedLauncher(chunk_flags_kernel)


def launch_chunk_flags(table: torch.Tensor, error_record_addr: int, rank: int, world: int, timeout_iters: int, *,
                       signal: tuple[int, int] | None = None, wait: tuple[int, int] | None = None) -> None:
    """Enqueue one flag kernel on the current stream: ``signal=(slot, sig)`` to every peer, then
    ``wait=(slot, sig)`` for every peer's (see the module). At least one of the two."""
    if signal is None and wait is None:
        raise ValueError("launch_chunk_flags: signal or wait (or both) must be given")
    s_slot, s_sig = signal or (0, 0)
    w_slot, w_sig = wait or (0, 0)
    consts = {"SIGNAL": signal is not None, "WAIT": wait is not None, "WORLD": world,
              "WORLD_P2": triton.next_power_of_2(world)}
    key = (ptr_key(table), int_key(error_record_addr), int_key(timeout_iters))
    _launch(key, 1, (table, error_record_addr, rank, s_slot, s_sig, w_slot, w_sig, timeout_iters), consts, 1)
