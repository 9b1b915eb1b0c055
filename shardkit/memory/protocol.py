"""The workspace protocol shared by every peer-memory kernel: the one owner of its numbers.

This is the Python twin of ``csrc/dda/layout.h``; ``tests/kernels/test_cuda_layout.py`` checks that
every constant here, the dtype codes and the epoch-buffer rule agree with the header (and the Triton
side, ``shardkit/kernels/sync.py``, imports them from here).

Every rank's workspace (bytes)::

    [0, SIGNAL_BYTES)                               signal area (below)
    [SIGNAL_BYTES, +buffer_bytes)                   staging: zero-copy inputs written by the user
    [SIGNAL_BYTES + buffer_bytes, +buffer_bytes)    epoch buffer 0 (calls with an even epoch)
    [SIGNAL_BYTES + 2*buffer_bytes, +buffer_bytes)  epoch buffer 1 (odd epochs)

Signal area::

    [0, 8)            int64  epoch: calls completed on this rank, modulo 2**32 (local only)
    [8, 12)           int32  done: programs of the running call that finished (local only)
    [16, 32)          int32  error record, device copy (local only)
    [SLOTS_OFF, ...)  int64  slots[NUM_STAGES * MAX_PROGRAMS][MAX_WORLD]: arrival flags, written by peers

A call stages its data in the epoch buffer of its epoch's parity: call n+2 reuses call n's buffer
only after every peer has signalled in call n+1, i.e. after every peer's call-n kernel finished
(``epoch_buffer_offset``). The error record is ``(code, slot, culprit-rank bitmask, epoch)``:
``describe_failure`` turns it into the message users see. Call fingerprints (``call_signature``)
travel in the arrival flags, so ranks that disagree about a call fail at its first barrier.
"""
from __future__ import annotations

import struct

import torch

MAX_WORLD = 8
MAX_PROGRAMS = 256
NUM_STAGES = 3
EPOCH_OFF = 0
DONE_OFF = 8
ERROR_OFF = 16
SLOTS_OFF = 128
SIGNAL_BYTES = 64 * 1024
EPOCH_MOD = 1 << 32

# Error codes in the first word of a rank's error record.
OK = 0
ARRIVED = 1
MISMATCH = 2
TIMEOUT = 3
ABORTED = 4  # another program of this rank failed first

# Error-record slot of a wait among the programs of one launch (sync.wait_tagged), past the barrier slots.
LOCAL_WAIT_SLOT = NUM_STAGES * MAX_PROGRAMS

assert SLOTS_OFF + NUM_STAGES * MAX_PROGRAMS * MAX_WORLD * 8 <= SIGNAL_BYTES

# dtype codes crossing the FFI into csrc (layout.h ``enum class DType``).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# One op code per kind of call, for every fingerprint: distinct codes keep any two kinds of call
# (and the two kernel families, which map work to programs differently) from looking alike.
OP_CODES = {
    "all_reduce_flat_triton": 1,
    "all_reduce_tree_triton": 2,
    "all_reduce_flat_cuda": 3,
    "all_reduce_tree_cuda": 4,
    "rmsnorm_flat": 5,
    "rmsnorm_tree": 6,
    "all_reduce_copy": 11,  # collectives/copy_engine.py: the barriers of one copy-engine call
    "moe_counts": 21,    # shardkit/kernels/moe: the counts exchange, dispatch and combine launches
    "moe_dispatch": 22,
    "moe_combine": 23,
}


def workspace_bytes(buffer_bytes: int) -> int:
    """Bytes of one rank's workspace: the signal area, staging, and the two epoch buffers."""
    return SIGNAL_BYTES + 3 * buffer_bytes


def staging_offset() -> int:
    """Byte offset of the zero-copy staging area in every workspace."""
    return SIGNAL_BYTES


def epoch_buffer_offset(epoch: int, buffer_bytes: int) -> int:
    """Byte offset of the epoch buffer a call of ``epoch`` stages into (``sync.start_call`` and
    ``layout.h``'s ``epoch_buffer_offset`` compute the same)."""
    return SIGNAL_BYTES + buffer_bytes * (1 + epoch % 2)


def float_bits(x: float) -> int:
    """The IEEE-754 double bits of ``x`` as an int (to put a float in a fingerprint exactly)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def call_signature(op: str, *fields: int) -> int:
    """31-bit fingerprint of a call: the op code and every integer that shapes the call's work and
    result on all ranks (counts, dtype code, chunk index and count, offsets, float bits, ...).
    Ranks compare it at the first barrier; equal calls give equal values on every rank."""
    h = OP_CODES[op] * 1_000_003
    for f in fields:
        # Mix each field in turn (multiply-xor with large primes): an order-sensitive hash.
        h = ((h ^ (int(f) & 0xFFFFFFFFFFFFFFFF)) * 1_000_000_007 + 2_147_483_629) % (1 << 61)
    return h % 2_147_483_647


def describe_failure(record, rank: int, world: int, timeout_s: float) -> str:
    """The message for a rank's error record ``(code, slot, culprit bitmask, epoch)``."""
    code, slot, culprits, epoch = (int(v) for v in record)
    ranks = [r for r in range(world) if culprits >> r & 1]
    where = f"barrier {slot // MAX_PROGRAMS} of call {epoch}"
    if slot == LOCAL_WAIT_SLOT and code == TIMEOUT:
        what = (f"the programs of this rank's own launch did not all run within {timeout_s:g} s (call "
                f"{epoch}; they wait for each other, so they must all fit on the GPU at once: is other "
                f"work holding its SMs?)")
    elif code == MISMATCH:
        what = (f"rank(s) {ranks} called with a different element count, dtype, algorithm, option or "
                f"buffer than this rank ({where}); every rank must make the same calls")
    elif code == TIMEOUT:
        what = f"rank(s) {ranks} did not arrive within {timeout_s:g} s ({where})"
    else:
        what = f"error code {code} at {where}"
    return (f"shardkit collective failed on rank {rank}: {what}. This communicator is unusable "
            f"now; its outputs from this call on are NaN. Create a new Communicator.")
