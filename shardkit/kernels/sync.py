"""Cross-rank synchronisation inside Triton kernels: a barrier, the call epoch and the error record.

The workspace layout, the codes and the epoch-buffer rule are owned by ``shardkit/memory/protocol.py``
(the twin of ``csrc/dda/layout.h``); this file is their device side.

A call's epoch is read by each program at its start and bumped by the last program to finish
(``finish_call``): state that changes per call lives in device memory, so a captured CUDA graph
replays correctly and nothing is reset from the host.

Arrival flags carry ``sig * 2**32 + epoch``. ``sig`` is a 31-bit fingerprint of the call
(``protocol.call_signature``: op, counts, dtype, chunk, options) computed on the host, so a rank that
called with another shape or dtype is seen at the barrier instead of producing garbage. A waiter
accepts a flag whose epoch is this call's or up to 2**31 calls *ahead*: a fast peer may already have
passed this barrier and written the next call's flag before a slow waiter looked (that is why
equality alone hangs). A peer can only be ahead if it checked our flag at this epoch, so a signature
mismatch is always seen by some rank at the exact epoch, and once a rank fails it never signals again.

Memory order (lessons of vLLM #2760/#8404 and PyTorch's CUDASymmetricMemory): arrival is a
release exchange at system scope after a CTA barrier (``tl.debug_barrier``) so that the whole
block's prior stores are published; the wait polls with volatile loads and ends with one acquire
read-modify-write of the same flags at system scope. Slots of
different stages of one call are distinct, so a block never confuses the start and end barriers.

Failures never hang: a waiter gives up after ``timeout_iters`` polls and records
``(code, slot, rank bitmask, epoch)`` in the rank's error record, and programs that find a recorded
error skip their barriers and write NaN. The record has two copies: one in device memory, which the
kernels poll (reading host memory from every program cost ~6 us per program, serialised, on the
H200 machines here), and one in host memory, written only on failure, which the host reads.
"""
import os

import triton
import triton.language as tl

from ..memory.protocol import (ABORTED, ARRIVED, DONE_OFF, EPOCH_MOD, EPOCH_OFF, ERROR_OFF, LOCAL_WAIT_SLOT,
                               MAX_PROGRAMS, MAX_WORLD, MISMATCH, SIGNAL_BYTES, SLOTS_OFF, TIMEOUT)

_SLOTS_OFF = tl.constexpr(SLOTS_OFF)
_MAX_WORLD = tl.constexpr(MAX_WORLD)
_MAX_PROGRAMS = tl.constexpr(MAX_PROGRAMS)
_EPOCH_MOD = tl.constexpr(EPOCH_MOD)
_EPOCH_OFF = tl.constexpr(EPOCH_OFF)
_DONE_OFF = tl.constexpr(DONE_OFF)
_ERROR_OFF = tl.constexpr(ERROR_OFF)
_SIGNAL_BYTES = tl.constexpr(SIGNAL_BYTES)
_STATUS_POLL_EVERY = tl.constexpr(1024)
# Scope of the arrival's release fence. Data we publish always lives in our own GPU's memory and
# peers read it through our L2, so a GPU-scope fence orders it before the flag; "sys" is the
# textbook choice. Selectable for measurement (SHARDKIT_RELEASE_SCOPE=gpu|sys).
_RELEASE_SCOPE = tl.constexpr(os.environ.get("SHARDKIT_RELEASE_SCOPE", "sys"))
_LOCAL_WAIT_SLOT = tl.constexpr(LOCAL_WAIT_SLOT)
_ARRIVED = tl.constexpr(ARRIVED)
_MISMATCH = tl.constexpr(MISMATCH)
_TIMEOUT = tl.constexpr(TIMEOUT)
_ABORTED = tl.constexpr(ABORTED)


@triton.jit
def epoch_buffer_offset(epoch, buffer_bytes):
    """Byte offset of the epoch buffer of a call of ``epoch`` (``protocol.epoch_buffer_offset``)."""
    return _SIGNAL_BYTES + buffer_bytes * (1 + epoch % 2)


@triton.jit
def start_call(table_ptr, rank, sig, buffer_bytes):
    """Read this call's epoch; returns (own workspace address, epoch, flag, ok, buf).

    table_ptr:     int64[WORLD] workspace base addresses (this process's view of every rank's buffer)
    rank:          this rank
    sig:           the call's 31-bit signature (host-computed)
    buffer_bytes:  bytes of one epoch buffer
    ok is False when an earlier call already failed: the communicator is then unusable.
    buf is the byte offset of this call's epoch buffer (``epoch_buffer_offset``).
    """
    own = tl.load(table_ptr + rank)
    epoch_ptr = (own + _EPOCH_OFF).to(tl.pointer_type(tl.int64))
    epoch = (tl.load(epoch_ptr, volatile=True) + 1) % _EPOCH_MOD
    flag = sig.to(tl.int64) * _EPOCH_MOD + epoch
    ok = tl.load((own + _ERROR_OFF).to(tl.pointer_type(tl.int32)), volatile=True) == 0
    return own, epoch, flag, ok, epoch_buffer_offset(epoch, buffer_bytes)


@triton.jit
def peer_barrier(table_ptr, rank, stage, flag, ok, error_record_addr, timeout_iters,
                 WORLD: tl.constexpr, WORLD_P2: tl.constexpr):
    """Block-level barrier with every rank's same-numbered program; returns True on success.

    stage: 0, 1, ... for the barriers of one call (each stage has its own flag rows).
    flag: ``sig * 2**32 + epoch`` of this call (from ``start_call``).
    ok: False skips the barrier (this call already failed) and returns False.
    The block's earlier stores are published with the arrival (CTA barrier, then a release).
    """
    if ok:
        tl.debug_barrier()
        # Tensor first: triton 3.8's interpreter turns `constexpr * int + tensor` into a constexpr
        # wrapping a tensor, which its tl.store refuses ("cannot convert [0] of type tensor").
        ok = _wait_for_peers(table_ptr, rank, tl.program_id(0) + stage * _MAX_PROGRAMS, flag, error_record_addr,
                             timeout_iters, WORLD, WORLD_P2)
    return ok


@triton.jit
def launch_barrier(table_ptr, rank, slot, flag, ok, error_record_addr, timeout_iters,
                   WORLD: tl.constexpr, WORLD_P2: tl.constexpr):
    """``peer_barrier`` at a given ``slot`` (< NUM_STAGES * MAX_PROGRAMS) instead of the program's own:
    for the one program that waits on behalf of its launch whatever its program id (e.g. the last
    to ``finish_call``), with the peers' programs that do the same at that slot."""
    if ok:
        tl.debug_barrier()
        ok = _wait_for_peers(table_ptr, rank, slot, flag, error_record_addr, timeout_iters, WORLD, WORLD_P2)
    return ok


@triton.jit
def _wait_for_peers(table_ptr, rank, slot, flag, error_record_addr, timeout_iters,
                    WORLD: tl.constexpr, WORLD_P2: tl.constexpr):
    peers = tl.arange(0, WORLD_P2)
    is_peer = peers < WORLD
    bases = tl.load(table_ptr + peers, mask=is_peer, other=0)
    # One vector exchange publishes our arrival to all ranks at once (a loop of scalar
    # atomics cost ~3x more on 4 GPUs).
    arrive = (bases + _SLOTS_OFF + (slot * _MAX_WORLD + rank) * 8).to(tl.pointer_type(tl.int64))
    tl.atomic_xchg(arrive, tl.zeros([WORLD_P2], tl.int64) + flag, mask=is_peer,
                   sem="release", scope=_RELEASE_SCOPE)

    own = tl.load(table_ptr + rank)
    mine = (own + _SLOTS_OFF + (slot * _MAX_WORLD + peers) * 8).to(tl.pointer_type(tl.int64))
    return wait_flags(mine, is_peer, flag, own, error_record_addr, timeout_iters, slot, WORLD_P2)


@triton.jit
def wait_flags(mine, is_peer, flag, own, error_record_addr, timeout_iters, slot, WORLD_P2: tl.constexpr):
    """Wait until the int64 words ``mine[r]`` (rank r's flag in this rank's memory, written by r with a
    release; ``is_peer`` masks the ranks waited for) carry this call's ``flag`` (or a later epoch);
    returns True when all did. A word with this call's epoch and another signature is a MISMATCH; no
    word after ``timeout_iters`` polls a TIMEOUT: both are recorded (at ``slot``, the waited-for ranks
    as culprits). Stops waiting when another program of the launch recorded a failure."""
    peers = tl.arange(0, WORLD_P2)
    epoch = flag % _EPOCH_MOD
    error_ptr = (own + _ERROR_OFF).to(tl.pointer_type(tl.int32))
    state = 0
    iters = 0
    culprits = 0
    # Carry scalars only: Triton 3.6 fails to compile a loop that carries a vector atomic's result.
    while state == 0:
        # Poll with plain (volatile) loads: a loop of acquire atomics floods the L2 with
        # read-modify-writes and invalidates L1 every iteration; acquire once after the loop.
        seen = tl.load(mine, mask=is_peer, other=0, volatile=True)
        lag = (seen % _EPOCH_MOD - epoch + _EPOCH_MOD) % _EPOCH_MOD
        here = (lag * 2 < _EPOCH_MOD) | (~is_peer)
        wrong = is_peer & (lag == 0) & (seen != flag)
        n_here = tl.sum(here.to(tl.int32), axis=0)
        n_wrong = tl.sum(wrong.to(tl.int32), axis=0)
        culprits = tl.sum(tl.where(wrong | (~here), tl.full([WORLD_P2], 1, tl.int32) << peers, 0), axis=0)
        iters += 1
        state = tl.where(n_wrong > 0, _MISMATCH,
                         tl.where(n_here == WORLD_P2, _ARRIVED,
                                  tl.where(iters > timeout_iters, _TIMEOUT, 0)))
        if iters % _STATUS_POLL_EVERY == 0:
            # Another program of this launch failed: stop waiting for peers that may never come.
            if tl.load(error_ptr, volatile=True) != 0:
                state = _ABORTED
    if state == _ARRIVED:
        tl.atomic_add(mine, 0, mask=is_peer, sem="acquire", scope="sys")
    if (state == _MISMATCH) | (state == _TIMEOUT):
        record_error(own, error_record_addr, state, slot, culprits, epoch)
    return state == _ARRIVED


@triton.jit
def wait_tagged(ptrs, mask, epoch, own, error_record_addr, timeout_iters):
    """Wait until every int64 word ``ptrs[mask]`` carries this call's ``epoch`` in its low 32 bits,
    written by other programs of this launch on this GPU (a value and its validity in one word, so
    no flag has to be ordered after it); returns (the words, ok). Gives up like ``peer_barrier``:
    after ``timeout_iters`` polls (recorded at slot LOCAL_WAIT_SLOT) or when another program failed.
    The words live in the call's workspace half, so an old word carries the epoch of call n-2."""
    state = 0
    iters = 0
    while state == 0:
        seen = tl.load(ptrs, mask=mask, other=0, volatile=True)
        missing = tl.sum((mask & ((seen & 0xFFFFFFFF) != epoch)).to(tl.int32), axis=0)
        iters += 1
        state = tl.where(missing == 0, _ARRIVED, tl.where(iters > timeout_iters, _TIMEOUT, 0))
        if iters % _STATUS_POLL_EVERY == 0:
            if tl.load((own + _ERROR_OFF).to(tl.pointer_type(tl.int32)), volatile=True) != 0:
                state = _ABORTED
    if state == _TIMEOUT:
        record_error(own, error_record_addr, state, _LOCAL_WAIT_SLOT, 0, epoch)
    return tl.load(ptrs, mask=mask, other=0, volatile=True), state == _ARRIVED


@triton.jit
def record_error(own, error_record_addr, code, slot, culprits, epoch):
    """Write ``(code, slot, culprit-rank bitmask, epoch)`` to both copies of the error record (device
    copy at ``own + ERROR_OFF``, host copy at ``error_record_addr``); the first error wins."""
    error_ptr = (own + _ERROR_OFF).to(tl.pointer_type(tl.int32))
    prev = tl.atomic_cas(error_ptr, 0, code, sem="relaxed", scope="gpu")
    if prev == 0:
        # Host memory gets plain stores, never atomics: the GPU may not do atomics on it (compute-sanitizer:
        # "system-scoped atomic ... not allowed" on the pinned record, H200 hosts here; the one-GPU tests
        # hit "misaligned address" faults there). The sys-scope acq_rel exchange on the device copy is the
        # fence that puts the fields before the code the host polls.
        status_ptr = error_record_addr.to(tl.pointer_type(tl.int32))
        tl.store(status_ptr + 1, slot, cache_modifier=".wt")
        tl.store(status_ptr + 2, culprits, cache_modifier=".wt")
        tl.store(status_ptr + 3, epoch.to(tl.int32), cache_modifier=".wt")
        tl.atomic_xchg(error_ptr, code, sem="acq_rel", scope="sys")
        tl.store(status_ptr, code, cache_modifier=".wt")


@triton.jit
def finish_call(own, epoch):
    """Count this program as done; the last program of the launch publishes the new epoch. Returns
    True in that last program, which also sees every other program's stores made before their
    ``tl.debug_barrier(); finish_call`` (the count is acq_rel): it may act for the whole launch.

    Every program read the epoch before it counts itself, so the bump cannot race a reader.
    """
    done_ptr = (own + _DONE_OFF).to(tl.pointer_type(tl.int32))
    finished = tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu")
    last = finished == tl.num_programs(0) - 1
    if last:
        tl.store(done_ptr, 0)
        tl.store((own + _EPOCH_OFF).to(tl.pointer_type(tl.int64)), epoch)
    return last
