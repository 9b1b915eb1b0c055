"""The workspace protocol shared by every peer-memory kernel: the one owner of its numbers.

This is the Python twin of ``csrc/dda/layout.h``; ``tests/kernels/test_cuda_layout.py`` checks that
every constant here, the dtype codes and the epoch-buffer rule agree with the header (and the Triton
side, ``shardkit/kernels/sync.py``, imports them from here).

Every rank's workspace (bytes)::

    [0, SIGNAL_BYTES)                               signal area (below)
    [SIGNAL_BYTES, +buffer_bytes)                   staging: zero-copy inputs written by the user
    [SIGNAL_BYTES + buffer_bytes, +buffer_bytes)    epoch buffer 0 (calls with an even epoch)
    [SIGNAL_BYTES + 2*buffer_bytes, +buffer_bytes)  epoch buffer 1 (odd epochs)
    [ll_offset(buffer_bytes), +ll_region_bytes(world)) LL slots (below), written only by the LL kernel

Signal area::

    [0, 8)            int64  epoch: calls completed on this rank, modulo 2**32 (local only)
    [8, 12)           int32  done: programs of the running call that finished (local only)
    [16, 32)          int32  error record, device copy (local only)
    [32, 40)          int64  LL calls completed on this rank, modulo 2**32 (local only)
    [SLOTS_OFF, ...)  int64  slots[NUM_STAGES * MAX_PROGRAMS][MAX_WORLD]: arrival flags, written by peers

A call stages its data in the epoch buffer of its epoch's parity: call n+2 reuses call n's buffer
only after every peer has signalled in call n+1, i.e. after every peer's call-n kernel finished
(``epoch_buffer_offset``). The error record is ``(code, slot, culprit-rank bitmask, epoch)``:
``describe_failure`` turns it into the message users see. Call fingerprints (``call_signature``)
travel in the arrival flags, so ranks that disagree about a call fail at its first barrier.

LL region (the one-synchronisation all-reduce, ``csrc/dda/ll_all_reduce.cu``, whose comment argues
why it is safe): ``2 parities x world sources`` slots of ``LL_SLOT_BYTES``; the slot of LL call ``k``'s
parity ``k % 2`` and source ``s`` on rank ``q`` holds what ``s`` pushed to ``q``: a 16-byte header
``{sig, flag, sig, flag}`` and then lines of 16 bytes ``{data, flag, data, flag}`` (8 payload bytes
each), every flag = ``k`` modulo 2**32 (the LL call counter at ``LL_CALLS_OFF``, not the epoch). The
region is zeroed at allocation; LL calls with ``k % LL_CLEAN_PERIOD < 2`` push whole slots, so no
line is older than ``LL_CLEAN_PERIOD + 2`` LL calls and a stale flag never equals a current one.
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
LL_CALLS_OFF = 32
LL_MAX_BYTES = 256 * 1024  # payload of one LL call per rank; larger calls go in chunks
LL_HEADER_BYTES = 16
LL_SLOT_BYTES = LL_HEADER_BYTES + 2 * LL_MAX_BYTES  # lines of 8 payload + 8 flag bytes
LL_CLEAN_PERIOD = 1 << 20  # LL calls; a power of two below 2**31 (divides 2**32)

# Error codes in the first word of a rank's error record.
OK = 0
ARRIVED = 1
MISMATCH = 2
TIMEOUT = 3
ABORTED = 4  # another program of this rank failed first

# Error-record slot of a wait among the programs of one launch (sync.wait_tagged), past the barrier slots.
LOCAL_WAIT_SLOT = NUM_STAGES * MAX_PROGRAMS

assert SLOTS_OFF + NUM_STAGES * MAX_PROGRAMS * MAX_WORLD * 8 <= SIGNAL_BYTES
assert ERROR_OFF + 16 <= LL_CALLS_OFF and LL_CALLS_OFF + 8 <= SLOTS_OFF

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
    "all_reduce_ll_cuda": 7,  # the one-synchronisation (LL) kernel: its call signature travels in the slot header
    "rmsnorm_ll_cuda": 8,  # the LL fused all-reduce + residual + RMSNorm (csrc/dda/ll_rmsnorm.cu): slot header too
    "all_reduce_copy": 11,  # collectives/copy_engine.py: the barriers of one copy-engine call
    "moe_counts": 21,    # shardkit/kernels/moe: the counts exchange, dispatch and combine launches
    "moe_dispatch": 22,
    "moe_combine": 23,
}


def workspace_bytes(buffer_bytes: int, world: int) -> int:
    """Bytes of one rank's workspace: the signal area, staging, the two epoch buffers, the LL slots."""
    return ll_offset(buffer_bytes) + ll_region_bytes(world)


def ll_offset(buffer_bytes: int) -> int:
    """Byte offset of the LL region in every workspace (after the epoch buffers)."""
    return SIGNAL_BYTES + 3 * buffer_bytes


def ll_region_bytes(world: int) -> int:
    """Bytes of the LL region of a ``world``-rank group: a slot per parity and source rank."""
    return 2 * world * LL_SLOT_BYTES


def ll_slot_offset(calls: int, source: int, world: int, buffer_bytes: int) -> int:
    """Byte offset of the slot that LL call ``calls`` (1, 2, ...) of rank ``source`` pushes into
    (``layout.h``'s ``ll_slot_offset`` computes the same)."""
    return ll_offset(buffer_bytes) + ((calls % 2) * world + source) * LL_SLOT_BYTES


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
