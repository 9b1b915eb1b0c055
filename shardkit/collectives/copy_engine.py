"""Copy-engine all-reduce for large messages: reduce-scatter by pulls or pushes, all-gather by pushes or pulls,
or (2 GPUs) one-shot pushes of the whole input.

For messages of many MiB the all-reduce is bound by NVLink bandwidth, and on H200 the copy engines
(``cudaMemcpyAsync`` on a peer pointer) move data faster than SM loads and stores when both
directions are busy (389 vs 366 / 335 GB/s, shared/DESIGN.md "Measured NVLink facts"). The data
therefore moves here as plain tensor copies between this rank's memory and views of the peers'
workspaces (``PeerMemory.peer_view``; a copy with a peer view on one side is a copy-engine transfer);
only the additions run on the SMs. The same code runs on CPU worlds (shared memory, the barrier
kernel in the Triton interpreter), where the copies are memcpys.

Layout. The message (n elements) is cut into W shards of S elements (S = n/W rounded up to 128
elements, so every piece starts 256-byte aligned for bf16; the last shards may be short or empty);
rank r owns shard r. Each shard is cut into K chunks of c elements, the pipeline's unit
(``CopyConfig.chunk_bytes``). Per rank the workspace holds (``memory/protocol.py``):

  * S, the source the peers pull from: the zero-copy input itself (in the staging area) or a copy
    of the input staged into epoch buffer 0 (shards p != r only; our own shard is read locally);
  * R, the reduced shards (pull all-gather): epoch buffer 0 at the message's offsets (shard r only,
    so it never meets the staged shards p != r);
  * T, the pulled pieces of our shard: epoch buffer 1, a ring of two slots of (W-1) x c elements.

Per call, on each rank r, with two streams (the caller's, "main", and a side stream for copies),
after a start barrier (after it no peer still reads our workspace for an earlier call, the
protocol's epoch-buffer rule, and zero-copy inputs are ready):

  * zero-copy in place (the input is in the staging area and is the output; the probe of issue
    14): the side stream pulls the W-1 peers' copies of chunk k of shard r into T, chunk after
    chunk; main sums each chunk in rank order over our input as it lands; then the side stream
    pushes each summed chunk into the same place of every peer's input. Two barriers per call, no
    local copy, and the side stream never waits (push k needs sum k, done during the later pulls).
    Pushes into a peer's shard r are safe: only rank r reads that range (its own pulls, earlier on
    the same stream).
  * otherwise (ordinary inputs, or zero-copy out of place): main stages chunk k of every other
    shard into S (ordinary inputs only), sums chunk k into R, and passes barrier k, which says
    that every rank's chunk k is summed (and chunk k+2 staged). The side stream pulls chunk k+2 of
    our shard into T and gathers chunk k of every peer's shard from their R straight into
    ``out``, alternating: pulls run two chunks ahead of the sums, so the staging copies, the sums
    and the barriers hide behind transfers, and the link never waits for the last sum. Our own
    reduced chunk is copied from R to ``out`` after barrier k, off the peers' path. K + 2 barriers
    (+2 for the first two staged chunks).

An end barrier closes the call: no peer still reads or writes our workspace, so the next call (of
any algorithm) may reuse it. That is the default schedule, ``CopyConfig(sync="barriers")``.

``CopyConfig(sync="flags")`` (issue 14's large-message variants; measured side by side by
``bench/copy_engine_chunks.py`` before any default changes) moves the same bytes with fewer
synchronisations and no staging copy. T holds the W-1 peers' whole shards (slot i for the peer
q with i = (q - r - 1) mod W), so a call needs (W-1) shards in epoch buffer 1 and the message in
epoch buffer 0 (else call-chunks of ``buffer_bytes``). After the start barrier:

  * "rs" stream: copy-engine *pushes* of chunk k of every peer's shard straight from ``x`` (ordinary
    or zero-copy alike: nothing is staged) into that peer's T; then a one-program flag kernel on a
    "sig" stream tells the peers "chunk k is in your T" (``kernels/chunk_flags.py``: one-way flags,
    not barriers; the pushes never wait for anything but the start barrier);
  * main: one flag kernel per chunk (signal "our chunk k-1 is reduced", wait for every peer's
    pieces of chunk k), then the Triton chunk sum (``kernels/all_reduce/chunk_sum.py``: rank order,
    fp32, rounded once, the same bits as the barrier schedule), which writes ``out`` and, in the
    same pass, R (gather="ce") or every peer's workspace with SM stores (gather="sm": the
    all-gather issued by the sum itself);
  * "ag" stream, per chunk: wait for the peers' flags, then copy-engine pulls of their chunk from
    their R into ``out`` (gather="ce") or a local copy of what they stored in our epoch buffer 0
    (gather="sm", or "ce_push": copy-engine pushes of each summed chunk from ``out`` into the
    peers' epoch buffer 0 on an "agp" stream, then the flag on a "sig_ag" stream). Zero-copy in
    place needs no all-gather flags: the reduced chunk goes straight into the peers' inputs
    (copy-engine pushes after the sum, or the sum's SM stores), which only this rank reads or writes
    in that range, and the end barrier says it has landed.

Every rank signals before it waits, in chunk order, so the schedule also runs in program order on
CPU worlds; each wait has the barriers' timeout and error record. Chunks per shard are capped at
``MAX_PROGRAMS`` (one flag row each). The side streams run at high priority, so that a flag kernel
is not queued behind the blocks of a large sum. A ``shard_hook`` needs gather="ce" or "ce_push"
(the sum kernel of "sm" hands the chunk to the peers before a hook could change it).

``CopyConfig(sync="oneshot")`` (the 2-GPU policy; issue 14's large messages on ordinary tensors) has no
all-gather at all: every rank pushes its whole input, by copy engines, into every peer's T and sums
the whole message itself. On 2 GPUs that moves what a two-shot moves (n bytes each way), but as plain
pushes from the input (nothing staged, zero-copy or not alike) that wait for nothing but the start
barrier: the link never waits for a sum, and only the last chunk's sum follows the last byte. (On W
ranks it moves (W-1) n bytes each way: 2 GPUs only, by policy.) T is epoch buffers 0 and 1 (adjacent:
2 x ``buffer_bytes``), one region per sender (peer q's at slot i = (q - r - 1) mod W, as above).
Chunks double towards the front (the last one is ``chunk_bytes``): few copy operations, and a small
last sum. After the start barrier, per chunk k:

  * "rs" stream: copy-engine pushes of chunk k of x into every peer's T; "sig": the flag "chunk k is in
    your T" (``kernels/chunk_flags.py``);
  * main: one flag kernel (signal the credit of chunk k-1, wait for every peer's chunk k), then the
    Triton chunk sum of x and the W-1 pieces into ``out`` (in place: after our own pushes of chunk k);
  * a message larger than a region of T goes through a ring of ``_RING_SLOTS`` slots: chunk k lands in
    slot k mod slots, and its pushes wait (a flag kernel on a "cr" stream) for every peer's credit
    "chunk k - slots is summed". So ``auto`` can take the copy engines on the default workspace.

One barrier per call: no rank reads another's memory, and every write into our workspace (pushes,
flags, credits) is one main waits for before the call ends, so the call needs no end barrier (the
next call's start barrier keeps its peers out until we arrive there).

Barriers are ``kernels/barrier.py``: one program of the workspace protocol, enqueued on main (CUDA
graphs capture it), carrying the call's fingerprint (op, sizes, dtype, chunking, zero-copy
offset, mode, barrier index), so ranks that disagree about a call fail at its first barrier
instead of copying garbage. A failed call's output is unspecified (the copies still run, inside
the workspace); the failure is raised by the next call or ``Communicator.check()`` on GPUs, at once
on CPU worlds.

Numerics, as the flat and tree kernels promise: every element is the sum over ranks 0..W-1 in that
order, accumulated in fp32 and rounded once to the dtype (W = 2: one ``torch.add``, which computes
in fp32 for half types; W > 2: an fp32 accumulator). Exactly one rank computes each element, and
the others copy its bits, so every rank gets bitwise the same result, and the same bits as the
flat and tree kernels (which add the ranks to an fp32 zero: only the sign of an all -0.0 sum can
differ).

Messages larger than the workspace's ``buffer_bytes`` go in call-chunks of at most that size, each
a complete call with its own barriers; the fast configuration is a communicator whose
``buffer_bytes`` holds the largest message (the staging area is the zero-copy capacity anyway).

``shard_hook`` (used by ``collectives/hierarchical.py``) runs on main on each summed chunk of this
rank's shard (a view of the workspace, before the peers gather it) and must update it in place:
e.g. an NCCL all-reduce of the chunk across nodes, which then overlaps the copies of the other
chunks. Every rank of the hook's group sees the same chunks (empty chunks are skipped).
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels.all_reduce.chunk_sum import launch_chunk_sum
from ..kernels.barrier import launch_barrier
from ..kernels.chunk_flags import launch_chunk_flags
from ..memory.peer_memory import PeerMemory
from ..memory.protocol import DTYPE_CODES, MAX_PROGRAMS, call_signature
from .checks import check_tensor

OP = "all_reduce_copy"  # its op code in protocol.OP_CODES

ALIGN = 128  # elements: shard and chunk boundaries (256 bytes in bf16, a copy-engine packet)
_MODE_PUSH, _MODE_PULL_ZERO_COPY, _MODE_PULL_STAGED = 1, 2, 3

ShardHook = Callable[[torch.Tensor], None]


SYNCS = ("barriers", "flags", "oneshot")
GATHERS = ("ce", "ce_push", "sm")
# The schedule's code in every fingerprint: ranks configured differently fail at the start barrier.
_SCHEDULE_CODES = {("barriers", "ce"): 0, ("flags", "ce"): 1, ("flags", "sm"): 2, ("flags", "ce_push"): 3,
                   ("oneshot", "ce"): 4}
# "oneshot": ring slots per sender when T cannot hold the whole message (the credit for chunk k is the
# peer's sum of chunk k - _RING_SLOTS, long done when the link gets there: sums run ~3x faster than
# the transfers). At least 2, or a rank would wait for a credit its peer can only give after it.
_RING_SLOTS = 4
# Flag rows of the "flags" schedule (the barriers use slot 0): chunk k's reduce-scatter notice in
# slot _RS_SLOT + k, its all-gather notice in _AG_SLOT + k; at most MAX_PROGRAMS chunks per shard.
_RS_SLOT, _AG_SLOT = MAX_PROGRAMS, 2 * MAX_PROGRAMS
_RS, _AG = 1, 2


@dataclass(frozen=True)
class CopyConfig:
    """The copy-engine schedule; the same on every rank.

    chunk_bytes: bytes of one pipeline chunk of a shard (one transfer from or to one peer); rounded
       down to a multiple of 128 elements (at least 128).
    sync: "barriers" (the default: a full barrier per chunk on the caller's stream; reduce-scatter by
       pulls from the input or its staged copy), "flags" (reduce-scatter by copy-engine pushes
       straight from the input, so nothing is staged; one-way per-chunk flags instead of barriers;
       see the module) or "oneshot" (every rank pushes its whole input to every peer and sums all of
       it: no all-gather; chunk_bytes is then the size of the last, smallest chunk, the earlier ones
       doubling; gather must be "ce"; no shard_hook).
    gather: "ce" (all-gather by copy-engine transfers: pulls into ``out``, pushes into the peers'
       inputs when zero-copy in place), "ce_push" ("flags" only: copy-engine pushes always, into the
       peers' workspaces, which copy them to ``out`` locally) or "sm" ("flags" only: the sum kernel
       stores each reduced chunk into every peer's workspace itself).
    copy_streams: "flags" and "oneshot" only: side streams per kind of transfer (1-4); chunk k's transfers go to
       stream k mod copy_streams, so that several copies are in flight per direction (one copy's
       start and drain then overlap another's).
    """
    chunk_bytes: int
    sync: str = "barriers"
    gather: str = "ce"
    copy_streams: int = 1


def shard_elements(numel: int, world: int) -> int:
    """Elements per shard: numel / world rounded up to a multiple of ALIGN."""
    return -(-numel // (ALIGN * world)) * ALIGN


def _chunk_elements(config: CopyConfig, element_size: int) -> int:
    return max(ALIGN, config.chunk_bytes // element_size // ALIGN * ALIGN)


def _pieces_fit(numel: int, world: int, chunk: int, element_size: int, buffer_bytes: int) -> bool:
    """Whether the pulled pieces of a call over ``numel`` elements fit epoch buffer 1 (T): two slots
    of (W-1) chunks when there are several chunks, one slot of (W-1) shards otherwise."""
    shard = shard_elements(numel, world)
    slots = 2 if shard > chunk else 1
    return slots * (world - 1) * min(chunk, shard) * element_size <= buffer_bytes


@functools.lru_cache(maxsize=None)
def copy_config(shard_bytes: int, world: int, buffer_bytes: int, element_size: int, interpret: bool,
                sharded: bool = False) -> CopyConfig:
    """The launch policy: the pipeline chunk for shards of ``shard_bytes`` (a pure function of the
    shape, so every rank picks the same). ``sharded``: the call has a shard hook.

    GPUs, 2 ranks: the "flags" schedule with copy-engine gathers in two chunks per shard (2xH200,
    bf16, graph, out of place: 64 MiB 221 us with 16 MiB chunks against 233-249 for the barrier
    schedule's chunks; 256 MiB 768 us with 64 MiB chunks against 835; bench/copy_engine_chunks.py).
    The "oneshot" schedule (``oneshot_config``) is the candidate to replace it where there is no
    hook; it becomes the default once a GPU run has measured it against this one.
    GPUs, more ranks (not measured with the flags schedule yet): the barrier schedule, about four
    chunks per shard between 8 and 32 MiB (the probe of issue 14: 16-64 MiB chunks beat NCCL, 4 MiB
    chunks lost to the per-chunk overhead). Either way no more than two slots of T can hold.
    Interpreter: 2 KiB chunks of the barrier schedule, so that small test messages run several chunks.
    """
    ring_cap = buffer_bytes // (2 * max(1, world - 1))
    if not interpret and world == 2:
        return CopyConfig(max(ALIGN * element_size, min(shard_bytes // 2, ring_cap)), sync="flags")
    target = 2048 if interpret else min(max(shard_bytes // 4, 8 << 20), 32 << 20)
    return CopyConfig(max(ALIGN * element_size, min(target, ring_cap)))


def oneshot_config(message_bytes: int, eager: bool) -> CopyConfig:
    """The "oneshot" schedule (2 ranks, no shard hook) for a message of ``message_bytes``: its last
    chunk 1/32 of the message between 1 and 8 MiB in graph captures (on 2 ranks it moves the bytes of
    a two-shot, as plain pushes from t = 0 with nothing to wait for but the start barrier; only the
    last chunk's sum follows the link); 1/8 in eager calls (four chunks up to 64 MiB): each chunk costs
    ~30-40 us of Python launches, which the GPU then waits for, against a few us of a larger last sum.
    Not GPU-measured yet: pass it as ``config`` (bench/copy_engine_chunks.py times it as oneshot_ce)."""
    return CopyConfig(min(max(message_bytes // (8 if eager else 32), 1 << 20), 8 << 20), sync="oneshot")


@dataclass(frozen=True)
class _Plan:
    """The pieces of one call-chunk of ``numel`` elements on ``rank`` of ``world``."""
    numel: int
    world: int
    rank: int
    shard: int   # S
    chunk: int   # c (elements), <= S
    chunks: int  # K (the same on every rank)

    def shard_range(self, p: int) -> tuple[int, int]:
        return min(p * self.shard, self.numel), min((p + 1) * self.shard, self.numel)

    def chunk_range(self, p: int, k: int) -> tuple[int, int]:
        lo, hi = self.shard_range(p)
        return min(lo + k * self.chunk, hi), min(lo + (k + 1) * self.chunk, hi)

    def peers(self) -> list[int]:
        """The other ranks, starting after this one (so that ranks do not all hit rank 0 first)."""
        return [(self.rank + i) % self.world for i in range(1, self.world)]


def _plan(numel: int, world: int, rank: int, chunk: int) -> _Plan:
    shard = shard_elements(numel, world)
    chunk = min(chunk, shard)
    return _Plan(numel, world, rank, shard, chunk, -(-shard // chunk))


_SIDE_STREAMS: "weakref.WeakKeyDictionary[PeerMemory, dict[str, torch.cuda.Stream]]" = weakref.WeakKeyDictionary()


class _Lanes:
    """The caller's stream ("main") and the memory's side streams by name ("side": the barrier
    schedule's copies; "rs<i>", "sig", "ag<i>", "agp<i>", "sig_ag": the flags schedule's pushes,
    notices and all-gather) on
    CUDA; on CPU everything runs in program order and events are None."""

    def __init__(self, memory: PeerMemory) -> None:
        self.cuda = memory.backend == "cuda"
        if self.cuda:
            self.device = memory.device
            self.streams = {"main": torch.cuda.current_stream(memory.device)}
            self.cached = _SIDE_STREAMS.setdefault(memory, {})

    def stream(self, lane: str) -> torch.cuda.Stream:
        if lane not in self.streams:
            if lane not in self.cached:
                # High priority: a one-program flag kernel on a side stream is then dispatched before
                # the remaining blocks of a large sum kernel on main, instead of after them.
                self.cached[lane] = torch.cuda.Stream(self.device, priority=-1)
            self.streams[lane] = self.cached[lane]
        return self.streams[lane]

    def mark(self, lane: str = "main") -> torch.cuda.Event | None:
        """An event after the work enqueued so far on ``lane``."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.stream(lane))
        return event

    def wait(self, event: torch.cuda.Event | None, lane: str = "main") -> None:
        """Make ``lane`` wait for ``event``."""
        if event is not None:
            self.stream(lane).wait_event(event)

    def on(self, lane: str):
        """A context in which work goes to ``lane`` (on CPU: nothing changes)."""
        return torch.cuda.stream(self.stream(lane)) if self.cuda else contextlib.nullcontext()

    def join(self) -> None:
        """Make main wait for everything enqueued on the side streams used so far."""
        for lane in [name for name in getattr(self, "streams", {}) if name != "main"]:
            self.wait(self.mark(lane))


def sum_in_rank_order(pieces: list[torch.Tensor], dst: torch.Tensor) -> None:
    """dst = pieces[0] + pieces[1] + ... in that order, accumulated in fp32, rounded once to dst's dtype.
    dst may be pieces[0] itself."""
    if len(pieces) == 1:
        dst.copy_(pieces[0])
    elif len(pieces) == 2:  # torch computes half-type additions in fp32 and rounds once
        torch.add(pieces[0], pieces[1], out=dst)
    else:
        acc = pieces[0].to(torch.float32).add(pieces[1])  # a new fp32 tensor: the inputs stay as they are
        for p in pieces[2:]:
            acc.add_(p)
        dst.copy_(acc)


def all_reduce(memory: PeerMemory, x: torch.Tensor, out: torch.Tensor, *, timeout_iters: int,
               config: CopyConfig | None = None, shard_hook: ShardHook | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``memory``'s group into ``out`` by copy-engine transfers.

    x: contiguous fp32/fp16/bf16 tensor on the memory's device, the same shape and dtype on every
       rank; not modified unless ``out`` is ``x``. An ``x`` inside the staging area
       (``Communicator.staging_buffer``) is read in place by the peers (zero-copy); all-reduced in
       place (``out is x``) it takes the push path with no local copy at all.
    out: contiguous, x's shape and dtype; may be ``x``.
    timeout_iters: barrier polls before a missing peer is declared failed.
    config: the pipeline chunk (default ``copy_config``); the same on every rank.
    shard_hook: called on each summed chunk of this rank's shard (a workspace view) before the peers
       gather it, to update it in place (see the module); the same on every rank.
    Returns ``out``. Every rank gets bitwise the same result (see the module for the summation order).
    """
    _validate(memory, x, out)
    world, es = memory.world_size, x.element_size()
    n = x.numel()
    if n == 0:
        return out
    xs, outs = x.view(-1), out.view(-1)
    if world == 1:
        if outs.data_ptr() != xs.data_ptr():
            outs.copy_(xs)
        if shard_hook is not None:
            shard_hook(outs)
        return out
    interpret = memory.backend == "cpu"
    x_offset = memory.holds(x)
    if config is None:
        config = copy_config(shard_elements(n, world) * es, world, memory.buffer_bytes, es, interpret,
                             shard_hook is not None)
    else:
        _check_config(config, shard_hook)
    chunk = _chunk_elements(config, es)
    flags = config.sync == "flags"
    oneshot = config.sync == "oneshot"
    if oneshot:
        region = _oneshot_region(world, es, memory.buffer_bytes)
        # Call-chunks only where one call would need more flag rows than there are.
        step = n if len(_oneshot_chunks(n, chunk, region)[0]) <= MAX_PROGRAMS else MAX_PROGRAMS // 2 * (
            region // _RING_SLOTS // ALIGN * ALIGN)
        calls = [(lo, min(lo + step, n), None) for lo in range(0, n, step)]
    else:
        calls, chunk = _two_phase_calls(memory, n, es, x_offset, chunk, flags)
    lanes = _Lanes(memory)
    schedule = _SCHEDULE_CODES[config.sync, config.gather] * 8 + config.copy_streams
    for i, (lo, hi, offset) in enumerate(calls):
        fingerprint = (n, i, len(calls), hi - lo, DTYPE_CODES[x.dtype], -1 if offset is None else offset, chunk,
                       shard_hook is not None, schedule)
        if oneshot:
            _call_oneshot(memory, lanes, xs[lo:hi], outs[lo:hi], chunk, region, config.copy_streams, timeout_iters,
                          fingerprint)
        elif flags:
            _call_flags(memory, lanes, xs[lo:hi], outs[lo:hi], offset, chunk, config.gather, config.copy_streams,
                        timeout_iters, shard_hook, fingerprint)
        else:
            _call(memory, lanes, xs[lo:hi], outs[lo:hi], offset, chunk, timeout_iters, shard_hook, fingerprint)
    return out


def _two_phase_calls(memory: PeerMemory, n: int, es: int, x_offset: int | None, chunk: int,
                     flags: bool) -> tuple[list[tuple[int, int, int | None]], int]:
    """The call-chunks [(lo, hi, zero-copy offset or None)] of a "barriers" or "flags" call, and the
    pipeline chunk (halved where the workspace cannot hold two slots of it)."""
    world = memory.world_size
    if flags:
        fits = _flags_fit(n, world, es, memory.buffer_bytes)
    else:
        fits = _pieces_fit(n, world, chunk, es, memory.buffer_bytes)
    if fits and (flags or x_offset is not None):
        return [(0, n, x_offset)], chunk
    # Call-chunks that fill epoch buffer 0 (S and R) and whose pieces fit T.
    step = memory.buffer_bytes // es // (ALIGN * world) * (ALIGN * world)
    if step == 0:
        raise ValueError(f"all_reduce: a workspace of {memory.buffer_bytes} bytes is too small for the copy "
                         f"algorithm on {world} ranks ({ALIGN * world} elements at least)")
    while not flags and not _pieces_fit(step, world, chunk, es, memory.buffer_bytes):
        chunk //= 2  # only for buffers too small for two slots of the configured chunk
        if chunk < ALIGN:
            raise ValueError(f"all_reduce: a workspace of {memory.buffer_bytes} bytes is too small for the "
                             f"copy algorithm on {world} ranks")
    return [(lo, min(lo + step, n), None) for lo in range(0, n, step)], chunk


def _check_config(config: CopyConfig, shard_hook: ShardHook | None) -> None:
    if type(config) is not CopyConfig or config.chunk_bytes <= 0:
        raise ValueError(f"all_reduce: config must be a CopyConfig with chunk_bytes > 0, got {config!r}")
    if (config.sync, config.gather) not in _SCHEDULE_CODES:
        raise ValueError(f"all_reduce: config.sync must be one of {SYNCS} and config.gather one of {GATHERS} "
                         f"(gather 'ce_push' and 'sm' with sync='flags' only), got {config!r}")
    if type(config.copy_streams) is not int or not 1 <= config.copy_streams <= 4 or (
            config.copy_streams > 1 and config.sync == "barriers"):
        raise ValueError(f"all_reduce: config.copy_streams must be an int in 1..4 (above 1 with sync='flags' or "
                         f"'oneshot' only), got {config!r}")
    if config.sync == "oneshot" and shard_hook is not None:
        raise ValueError("all_reduce: a shard_hook needs config.sync 'barriers' or 'flags' (the 'oneshot' schedule "
                         "has no shards: every rank sums the whole message)")
    if config.gather == "sm" and shard_hook is not None:
        raise ValueError("all_reduce: a shard_hook needs config.gather 'ce' or 'ce_push' (with 'sm' the sum kernel "
                         "hands each chunk to the peers before a hook could update it)")


def _flags_fit(numel: int, world: int, element_size: int, buffer_bytes: int) -> bool:
    """Whether one "flags" call over ``numel`` elements fits the workspace: R (this rank's shard at its
    message offset) in epoch buffer 0, the W-1 peers' whole shards (T) in epoch buffer 1."""
    return max(numel, (world - 1) * shard_elements(numel, world)) * element_size <= buffer_bytes


def _oneshot_region(world: int, element_size: int, buffer_bytes: int) -> int:
    """Elements of one sender's region of T in the "oneshot" schedule: epoch buffers 0 and 1 (adjacent
    in the workspace) split over the W-1 peers."""
    region = 2 * buffer_bytes // (world - 1) // element_size // ALIGN * ALIGN
    if region < _RING_SLOTS * ALIGN:
        raise ValueError(f"all_reduce: a workspace of {buffer_bytes} bytes is too small for the oneshot copy "
                         f"schedule on {world} ranks")
    return region


def _oneshot_chunks(numel: int, last: int, region: int) -> tuple[list[tuple[int, int]], int | None]:
    """The "oneshot" chunks of a message of ``numel`` elements: ([(lo, hi)], slot). From the end: about
    ``last`` elements, again ``last``, then doubling, at most ``slot`` each, the first chunk the rest
    (merged into the second when smaller than it and the two fit a slot). Inner boundaries are multiples
    of ALIGN. slot: elements of a ring slot when the message does not fit one region of T (then chunk k
    lands in slot k mod _RING_SLOTS), else None (chunk k lands at its own offset)."""
    slot = region // _RING_SLOTS // ALIGN * ALIGN if numel > region else None
    biggest = slot if slot is not None else numel
    size, pos, cuts = min(last, biggest), numel, []
    while pos > 0:
        lo = max(0, -(-(pos - size) // ALIGN) * ALIGN)  # < pos: size >= ALIGN
        cuts.append((lo, pos))
        pos = lo
        if len(cuts) >= 2:
            size = min(2 * size, biggest)
    cuts.reverse()
    if len(cuts) >= 2 and cuts[0][1] - cuts[0][0] < cuts[1][1] - cuts[1][0] and cuts[1][1] <= biggest:
        cuts[:2] = [(0, cuts[1][1])]
    return cuts, slot


def _validate(memory: PeerMemory, x: torch.Tensor, out: torch.Tensor) -> None:
    for t, name in ((x, "x"), (out, "out")):
        check_tensor(t, name, memory.device)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"all_reduce: out must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                         f"got {tuple(out.shape)} and {out.dtype}")


def _call(memory: PeerMemory, lanes: _Lanes, x: torch.Tensor, out: torch.Tensor, x_offset: int | None, chunk: int,
          timeout_iters: int, shard_hook: ShardHook | None, fingerprint: tuple) -> None:
    """One call-chunk: x and out flat, at most buffer_bytes (see the module for the schedule)."""
    rank, world, dtype, es = memory.rank, memory.world_size, x.dtype, x.element_size()
    plan = _plan(x.numel(), world, rank, chunk)
    push = x_offset is not None and out.data_ptr() == x.data_ptr()
    staged = x_offset is None
    mode = _MODE_PUSH if push else _MODE_PULL_STAGED if staged else _MODE_PULL_ZERO_COPY
    base = memory.staging_offset
    epoch0, epoch1 = base + memory.buffer_bytes, base + 2 * memory.buffer_bytes
    src_off = epoch0 if staged else x_offset  # S
    peers = plan.peers()
    barriers = iter(range(1 << 30))
    pulled, reduced = [], []

    def barrier() -> torch.cuda.Event | None:
        """A barrier on main; returns an event after it (for the side stream to wait on)."""
        sig = call_signature(OP, *fingerprint, mode, next(barriers))
        launch_barrier(memory.table, memory.error_record_addr, rank, world, sig, memory.buffer_bytes, timeout_iters)
        return lanes.mark()

    def view(r: int, offset: int, lo: int, hi: int) -> torch.Tensor:
        return memory.peer_view(r, offset + lo * es, hi - lo, dtype)

    def stage(k: int) -> None:  # main: chunk k of every other shard into S (epoch buffer 0)
        for p in peers:
            lo, hi = plan.chunk_range(p, k)
            if hi > lo:
                view(rank, epoch0, lo, hi).copy_(x[lo:hi])

    def pull(k: int, ready: torch.cuda.Event | None) -> None:  # side: the peers' copies of our chunk k into T
        with lanes.on("side"):
            lanes.wait(ready, "side")
            if k >= 2:  # T's slot k % 2 is free once chunk k-2 is summed
                lanes.wait(reduced[k - 2], "side")
            lo, hi = plan.chunk_range(rank, k)
            for i, r in enumerate(peers):
                if hi > lo:
                    slot = epoch1 + ((k % 2) * (world - 1) + i) * plan.chunk * es
                    memory.peer_view(rank, slot, hi - lo, dtype).copy_(view(r, src_off, lo, hi))
            pulled.append(lanes.mark("side"))

    def add(k: int) -> None:  # main: sum chunk k in rank order over our input (push) or into R; the hook
        lo, hi = plan.chunk_range(rank, k)
        lanes.wait(pulled[k])
        if hi > lo:
            slots = [epoch1 + ((k % 2) * (world - 1) + i) * plan.chunk * es for i in range(world - 1)]
            pieces = {r: memory.peer_view(rank, slot, hi - lo, dtype) for r, slot in zip(peers, slots)}
            pieces[rank] = x[lo:hi]
            dst = x[lo:hi] if push else view(rank, epoch0, lo, hi)
            sum_in_rank_order([pieces[r] for r in range(world)], dst)
            if shard_hook is not None:
                shard_hook(dst)
        reduced.append(lanes.mark())

    # Start: after this barrier no peer still reads our workspace for an earlier call (the tree
    # kernel's all-gather reads our epoch buffer after its last barrier), and zero-copy inputs are ready.
    ready = barrier()
    if push:
        # Pull every chunk, summing each as it lands; then push the sums into the peers' inputs.
        for k in range(plan.chunks):
            pull(k, ready if k == 0 else None)
            if k >= 1:
                add(k - 1)
        add(plan.chunks - 1)
        with lanes.on("side"):
            for k in range(plan.chunks):
                lanes.wait(reduced[k], "side")
                lo, hi = plan.chunk_range(rank, k)
                if hi > lo:
                    for r in peers:
                        view(r, src_off, lo, hi).copy_(x[lo:hi])
    else:
        # Pulls run two chunks ahead of the sums; barrier k says that every rank's chunk k is summed
        # into R (and chunk k+2 staged), so the side stream then gathers chunk k of every shard into
        # out, between the pulls: the link never waits for the last sum.
        for k in range(min(2, plan.chunks)):
            if staged:
                stage(k)
                ready = barrier()
            pull(k, ready)
        for k in range(plan.chunks):
            add(k)
            if staged and k + 2 < plan.chunks:
                stage(k + 2)
            ready = barrier()
            with lanes.on("side"):
                lanes.wait(ready, "side")
                for r in peers:
                    lo, hi = plan.chunk_range(r, k)
                    if hi > lo:
                        out[lo:hi].copy_(view(r, epoch0, lo, hi))
            if k + 2 < plan.chunks:
                pull(k + 2, None)
            lo, hi = plan.chunk_range(rank, k)
            if hi > lo:  # our own chunk, off the path to the peers
                out[lo:hi].copy_(view(rank, epoch0, lo, hi))
    lanes.join()

    # End: nobody touches our workspace after this.
    barrier()


def _call_flags(memory: PeerMemory, lanes: _Lanes, x: torch.Tensor, out: torch.Tensor, x_offset: int | None,
                chunk: int, gather: str, streams: int, timeout_iters: int, shard_hook: ShardHook | None,
                fingerprint: tuple) -> None:
    """One call-chunk of the "flags" schedule (see the module): x and out flat, fitting the workspace
    (``_flags_fit``)."""
    rank, world, dtype, es = memory.rank, memory.world_size, x.dtype, x.element_size()
    plan = _plan(x.numel(), world, rank, chunk)
    if plan.chunks > MAX_PROGRAMS:  # one flag row per chunk: larger chunks, the same on every rank
        plan = _plan(x.numel(), world, rank, -(-plan.shard // (MAX_PROGRAMS * ALIGN)) * ALIGN)
    base = memory.staging_offset
    epoch0, epoch1 = base + memory.buffer_bytes, base + 2 * memory.buffer_bytes
    zc_in_place = x_offset is not None and out.data_ptr() == x.data_ptr()
    sm = gather == "sm"
    # The peers' reduced chunks reach our epoch buffer 0 (their pushes), not their own R (our pulls).
    pushed_to_us = not zc_in_place and gather != "ce"
    peers = plan.peers()
    ws = memory.buffer.data_ptr()  # this rank's workspace address (the table's entry)
    interpret = memory.backend == "cpu"
    shard_lo = plan.shard_range(rank)[0]

    def flags(signal: tuple[int, int] | None = None, wait: tuple[int, int] | None = None) -> None:
        launch_chunk_flags(memory.table, memory.error_record_addr, rank, world, timeout_iters, signal=signal, wait=wait)

    def notice(phase: int, k: int) -> tuple[int, int]:
        return (_RS_SLOT if phase == _RS else _AG_SLOT) + k, call_signature(OP, *fingerprint, phase, k)

    def view(r: int, offset: int, lo: int, hi: int) -> torch.Tensor:
        return memory.peer_view(r, offset + lo * es, hi - lo, dtype)

    def lane(kind: str, k: int) -> str:
        """Chunk k's stream for ``kind``; its first chunk waits for the start barrier (which also
        forks the stream off main, as CUDA-graph capture needs)."""
        name = f"{kind}{k % streams}"
        if k < streams:
            lanes.wait(start, name)
        return name

    def reduce_scatter(k: int) -> None:
        """rs: push our pieces of chunk k of every peer's shard into its T; sig: say so."""
        rs = lane("rs", k)
        with lanes.on(rs):
            for p in peers:
                lo, hi = plan.chunk_range(p, k)
                if hi > lo:
                    slot = (rank - p - 1) % world  # our place among p's senders (the T layout)
                    dst = epoch1 + (slot * plan.shard + lo - plan.shard_range(p)[0]) * es
                    memory.peer_view(p, dst, hi - lo, dtype).copy_(x[lo:hi])
            pushed = lanes.mark(rs)
        with lanes.on("sig"):
            lanes.wait(pushed, "sig")
            flags(signal=notice(_RS, k))

    def reduce(k: int) -> torch.cuda.Event | None:
        """main: sum chunk k of our shard into out (and R, or the peers' workspaces); the hook."""
        lo, hi = plan.chunk_range(rank, k)
        if hi > lo:
            own = x[lo:hi]
            dst = x_offset if zc_in_place else epoch0  # where the peers' copies of the result live
            r_view = view(rank, epoch0, lo, hi)
            hooked = shard_hook is not None and not zc_in_place
            target = r_view if hooked else out[lo:hi]
            launch_chunk_sum(memory.table, rank, world, dtype, hi - lo, own.data_ptr(),
                             ws + epoch1 + (lo - shard_lo) * es, plan.shard * es, target.data_ptr(),
                             copy_addr=None if (pushed_to_us or zc_in_place or hooked) else r_view.data_ptr(),
                             push_offset=dst + lo * es if sm else None, interpret=interpret)
            if shard_hook is not None:
                shard_hook(target)
                if hooked:
                    out[lo:hi].copy_(r_view)
        return lanes.mark()

    def publish(k: int, summed: torch.cuda.Event | None) -> None:
        """gather="ce_push": agp pushes our reduced chunk k from out into every peer's epoch buffer
        0; sig_ag says so."""
        lo, hi = plan.chunk_range(rank, k)
        agp = lane("agp", k)
        with lanes.on(agp):
            lanes.wait(summed, agp)
            if hi > lo:
                for p in peers:
                    view(p, epoch0, lo, hi).copy_(out[lo:hi])
            pushed = lanes.mark(agp)
        with lanes.on("sig_ag"):
            lanes.wait(pushed, "sig_ag")
            flags(signal=notice(_AG, k))

    def all_gather(k: int, summed: torch.cuda.Event | None) -> None:
        """ag: chunk k of every shard into out (pulls from the peers' R, or a local copy of what they
        pushed into our workspace), or our chunk k into the peers' inputs (zero-copy in place)."""
        if zc_in_place and sm:
            return  # the sum kernel stored it in the peers' inputs already
        ag = lane("ag", k)
        with lanes.on(ag):
            if zc_in_place:
                lanes.wait(summed, ag)
                lo, hi = plan.chunk_range(rank, k)
                if hi > lo:
                    for p in peers:
                        view(p, x_offset, lo, hi).copy_(x[lo:hi])
                return
            flags(wait=notice(_AG, k))
            for p in peers:
                lo, hi = plan.chunk_range(p, k)
                if hi > lo:
                    out[lo:hi].copy_(view(rank if pushed_to_us else p, epoch0, lo, hi))

    # Start: after this barrier no peer still reads or writes our workspace for an earlier call, and
    # zero-copy inputs are ready.
    launch_barrier(memory.table, memory.error_record_addr, rank, world, call_signature(OP, *fingerprint, 0),
                   memory.buffer_bytes, timeout_iters)
    start = lanes.mark()
    ag_notices = not zc_in_place and gather != "ce_push"  # main's (ce_push: sig_ag's, after the pushes)
    summed = None
    # Per chunk: the pushes of chunk k, then main's notice of chunk k-1's sum with its wait for chunk
    # k's pieces (one flag kernel), the sum of chunk k, and the all-gather of chunk k-1. Every rank
    # signals before it waits, so the same order also runs on CPU worlds (program order).
    for k in range(plan.chunks + 1):
        if k < plan.chunks:
            reduce_scatter(k)
        signal = notice(_AG, k - 1) if k > 0 and ag_notices else None
        if k < plan.chunks:
            flags(signal=signal, wait=notice(_RS, k))
        elif signal is not None:
            flags(signal=signal)
        if k > 0:
            all_gather(k - 1, summed)
        if k < plan.chunks:
            summed = reduce(k)
            if gather == "ce_push" and not zc_in_place:
                publish(k, summed)
    lanes.join()

    # End: nobody touches our workspace after this.
    launch_barrier(memory.table, memory.error_record_addr, rank, world, call_signature(OP, *fingerprint, 1),
                   memory.buffer_bytes, timeout_iters)


def _call_oneshot(memory: PeerMemory, lanes: _Lanes, x: torch.Tensor, out: torch.Tensor, last: int, region: int,
                  streams: int, timeout_iters: int, fingerprint: tuple) -> None:
    """One call-chunk of the "oneshot" schedule (see the module): x and out flat (out may be x)."""
    rank, world, dtype, es = memory.rank, memory.world_size, x.dtype, x.element_size()
    ranges, slot = _oneshot_chunks(x.numel(), last, region)
    chunks = len(ranges)
    base = memory.staging_offset + memory.buffer_bytes  # T: epoch buffers 0 and 1, one region per sender
    in_place = out.data_ptr() == x.data_ptr()
    peers = [(rank + i) % world for i in range(1, world)]
    ws = memory.buffer.data_ptr()  # this rank's workspace address (the table's entry)
    interpret = memory.backend == "cpu"
    forked: set[str] = set()

    def flags(signal: tuple[int, int] | None = None, wait: tuple[int, int] | None = None) -> None:
        launch_chunk_flags(memory.table, memory.error_record_addr, rank, world, timeout_iters, signal=signal, wait=wait)

    def notice(phase: int, k: int) -> tuple[int, int]:
        return (_RS_SLOT if phase == _RS else _AG_SLOT) + k, call_signature(OP, *fingerprint, phase, k)

    def on(lane: str):
        """Work on ``lane``; its first use waits for the start barrier (which forks it off main, as
        CUDA-graph capture needs)."""
        if lane not in forked:
            forked.add(lane)
            lanes.wait(start, lane)
        return lanes.on(lane)

    def t_offset(sender: int, receiver: int, k: int) -> int:
        """Byte offset of chunk k from ``sender`` in ``receiver``'s T."""
        at = (k % _RING_SLOTS) * slot if slot is not None else ranges[k][0]
        return base + (((sender - receiver - 1) % world) * region + at) * es

    # Start: after this barrier no peer still reads or writes our workspace for an earlier call.
    launch_barrier(memory.table, memory.error_record_addr, rank, world, call_signature(OP, *fingerprint, 0),
                   memory.buffer_bytes, timeout_iters)
    start = lanes.mark()
    # Per chunk, in this order (every rank signals before it waits, so CPU worlds run it in program
    # order): cr waits for the peers' credits (ring only: their sums of chunk k - slots freed the
    # slot); rs pushes chunk k of x into every peer's T; sig tells them; main signals the credit of
    # chunk k-1, waits for the peers' chunk k and sums it in rank order into out.
    for k, (lo, hi) in enumerate(ranges):
        rs = f"rs{k % streams}"
        if slot is not None and k >= _RING_SLOTS:
            with on("cr"):
                flags(wait=notice(_AG, k - _RING_SLOTS))
                credit = lanes.mark("cr")
            lanes.wait(credit, rs)
        with on(rs):
            for p in peers:
                memory.peer_view(p, t_offset(rank, p, k), hi - lo, dtype).copy_(x[lo:hi])
            pushed = lanes.mark(rs)
        with on("sig"):
            lanes.wait(pushed, "sig")
            flags(signal=notice(_RS, k))
        credit_due = slot is not None and k >= 1 and k - 1 + _RING_SLOTS < chunks
        flags(signal=notice(_AG, k - 1) if credit_due else None, wait=notice(_RS, k))
        if in_place:
            lanes.wait(pushed)  # our pushes of chunk k read it before the sum overwrites it
        pieces = ws + t_offset(rank + 1, rank, k)  # peer rank+1's piece; the others region * es apart
        launch_chunk_sum(memory.table, rank, world, dtype, hi - lo, x[lo:hi].data_ptr(), pieces, region * es,
                         out[lo:hi].data_ptr(), interpret=interpret)
    # No end barrier: nobody reads a peer's memory in this schedule, and once main has every peer's
    # flag of the last chunk (and the credits it waited for), nothing more of this call arrives here;
    # a peer's next call touches our workspace only after its start barrier, which waits for ours.
    lanes.join()
