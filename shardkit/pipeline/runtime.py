"""A token-dimension pipeline over ``torch.distributed`` point-to-point (HPipe, Ma et al. 2024).

One process per stage: rank ``m`` of the group runs a ``LlamaStage`` holding a contiguous run of
layers and the KV cache of those layers. The prompt's slices flow through the stages in order;
stage ``m`` receives slice ``j``'s activations from stage ``m - 1``, runs its layers over them
(attending to the cached positions of slices ``0..j-1``), and sends the result on with an
asynchronous ``isend``, so the transfer overlaps the next slice's compute; the receive of slice
``j + 1`` is posted before slice ``j`` is computed. The last stage computes the LM head on the
final slice only. Greedy decode then continues on the same stages: each new token goes from the
last stage back to the first, and one token at a time passes through the stages, each reading
and extending its own cache.

Links: between two CUDA stages tensors travel as they are (NCCL); otherwise, or with
``wire="host"`` (a slow link, as between hosts), through host memory over gloo (the sender copies
to pinned host memory, the receiver back to its device without stalling its host thread). A
process group with both (``"cpu:gloo,cuda:nccl"``) serves every mix; CPU-only groups use gloo.

NCCL's point-to-point kernels occupy SMs while they wait for their peer, and the receive of the
next slice is posted before this slice's compute (so that it arrives early): with NCCL's default
channel count that took about 10% of an H200's compute from the receiving stage for as long as it
computed (measured: every slice with a receive pending ran ~10% slower than the same slice on the
sending GPU, the last one, with none pending, did not). So the device links run in a process
group of their own whose NCCL communicators use at most ``link_ctas`` CTAs (``ncclConfig_t.maxCTAs``,
which also caps NCCL's point-to-point channels): a waiting receive holds that many SMs, and a
slice's activations (MBs) still cross NVLink in a fraction of a millisecond, under the next
slice's compute.
"""
from __future__ import annotations

import time
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .llama import LlamaStage
from .slicing import check_slices

__all__ = ["PipelineRuntime"]

WIRES = ("auto", "host")


class _Clock:
    """Per-slice compute start/end on this rank: CUDA events, or the wall clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: List[object] = []

    def now(self) -> object:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self) -> List[float]:
        """Marks in seconds after the first one."""
        if not self.marks:
            return []
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.marks[0].elapsed_time(e) * 1e-3 for e in self.marks]
        return [t - self.marks[0] for t in self.marks]


class PipelineRuntime:
    """The pipeline over the ranks of ``group`` (default: the world), rank ``m`` running ``stage``.

    Construction is collective: the ranks exchange their stages' layers, devices and shapes, and
    every rank raises the same ValueError if the stages do not form one model in rank order (first
    stage first, layers contiguous, same shape, dtype, batch and cache length).

    Args:
        stage: this rank's stage.
        group: the process group (one rank per stage, in pipeline order).
        wire: ``"auto"`` (CUDA-to-CUDA links carry device tensors, others go through host memory)
            or ``"host"`` (every link through host memory over gloo).
        link_ctas: the most CTAs (SMs) an NCCL transfer of a device link may hold (module
            docstring); ``None``: NCCL's default, the links then run in ``group`` itself.
    """

    def __init__(self, stage: LlamaStage, group: Optional[dist.ProcessGroup] = None, wire: str = "auto",
                 link_ctas: Optional[int] = 2) -> None:
        self.stage, self.group = stage, group if group is not None else dist.group.WORLD
        self.index, self.stages = dist.get_rank(self.group), dist.get_world_size(self.group)
        mine = (stage.device.type, stage.layers.start, stage.layers.stop, stage.first, stage.last, stage.config,
                str(stage.dtype), stage.batch, stage.max_tokens, wire, link_ctas)
        infos: List[tuple] = [None] * self.stages  # type: ignore[list-item]
        dist.all_gather_object(infos, mine, group=self.group)
        # Checked after the exchange, so that a bad argument on one rank raises on every rank.
        for w, ctas in (info[9:11] for info in infos):
            if w not in WIRES:
                raise ValueError(f"wire must be one of {WIRES}, got {w!r}")
            if ctas is not None and (isinstance(ctas, bool) or not isinstance(ctas, int) or ctas < 1):
                raise ValueError(f"link_ctas must be None or an int >= 1, got {ctas!r}")
        problem = self._check_stages(infos)
        if problem:
            raise ValueError(f"PipelineRuntime: the stages do not form one model: {problem}")
        self.devices = [info[0] for info in infos]
        self.layers = [range(info[1], info[2]) for info in infos]
        self.wire = wire
        device_links = wire == "auto" and any(a == b == "cuda" for a, b in zip(self.devices, self.devices[1:]))
        self._link_group = _capped_nccl_group(self.group, link_ctas) if device_links and link_ctas else self.group
        # Collectives (the final token broadcast) need one backend on every rank.
        self._coll_device = stage.device if wire == "auto" and all(d == "cuda" for d in self.devices) else \
            torch.device("cpu")
        self._clock = _Clock(stage.device)

    @staticmethod
    def _check_stages(infos: List[tuple]) -> str:
        n = len(infos)
        for m, (_, start, stop, first, last, config, *_rest) in enumerate(infos):
            if first != (m == 0) or last != (m == n - 1):
                return (f"rank {m} has first={first}, last={last}; the first rank must hold the embedding "
                        f"and only it, the last the LM head and only it")
            if (infos[m - 1][2] if m else 0) != start:
                return f"rank {m} starts at layer {start}, the rank before ends at {infos[m - 1][2] if m else 0}"
            if stop - start < 1 and n > 1:
                return f"rank {m} holds no layer"
        if infos[-1][2] != infos[0][5].layers:
            return f"the last rank ends at layer {infos[-1][2]}, the model has {infos[0][5].layers}"
        for m, info in enumerate(infos):
            if info[5:] != infos[0][5:]:
                return (f"rank {m} has config/dtype/batch/max_tokens/wire/link_ctas {info[5:]}, "
                        f"rank 0 has {infos[0][5:]}")
        return ""

    # --- links -------------------------------------------------------------------------------
    def _wire_device(self, peer: int) -> torch.device:
        if self.wire == "auto" and self.devices[peer] == "cuda" and self.stage.device.type == "cuda":
            return self.stage.device
        return torch.device("cpu")

    def _link(self, peer: int) -> Tuple[torch.device, dist.ProcessGroup, bool]:
        """(the device a transfer with ``peer`` travels from, its group, whether host buffers are pinned)."""
        device = self._wire_device(peer)
        pinned = device.type == "cpu" and self.stage.device.type == "cuda"
        return device, self._link_group if device.type == "cuda" else self.group, pinned

    def send(self, t: torch.Tensor, peer: int) -> Tuple[dist.Work, torch.Tensor]:
        """Start sending ``t`` to stage ``peer``; returns the work and the tensor on the wire (keep
        both until the work is waited for)."""
        device, group, pinned = self._link(peer)
        if pinned:  # gloo reads the host copy as soon as isend returns: wait for the copy
            wire = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            wire.copy_(t, non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()
        else:
            wire = t.to(device).contiguous()
        return dist.isend(wire, dist.get_global_rank(self.group, peer), group=group), wire

    def post_recv(self, shape: Tuple[int, ...], dtype: torch.dtype, peer: int) -> Tuple[dist.Work, torch.Tensor]:
        """Post the receive of a tensor from stage ``peer``; ``finish_recv`` returns it."""
        device, group, pinned = self._link(peer)
        buf = torch.empty(shape, dtype=dtype, device=device, pin_memory=pinned)
        return dist.irecv(buf, dist.get_global_rank(self.group, peer), group=group), buf

    def finish_recv(self, pending: Tuple[dist.Work, torch.Tensor]) -> torch.Tensor:
        """The tensor of a posted receive, on this stage's device (a host copy goes up in stream
        order, without stalling this thread: its pinned buffer stays reserved until it is done)."""
        work, buf = pending
        work.wait()
        return buf.to(self.stage.device, non_blocking=True)

    # --- prefill and decode ------------------------------------------------------------------
    def _agree(self, ids: torch.Tensor, slices: Sequence[int], new_tokens: int) -> None:
        """Gather what each rank was called with, so that a rank called differently makes every
        rank raise (instead of the others waiting for it forever)."""
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        mine = (shape, str(getattr(ids, "dtype", None)), repr(list(slices) if isinstance(slices, (list, tuple))
                                                             else slices), repr(new_tokens))
        calls: List[tuple] = [None] * self.stages  # type: ignore[list-item]
        dist.all_gather_object(calls, mine, group=self.group)
        other = next((r for r, c in enumerate(calls) if c != calls[0]), None)
        if other is not None:
            raise ValueError(f"the ranks were called differently (ids shape, dtype, slices, new_tokens): rank "
                             f"{other} has {calls[other]}, rank 0 has {calls[0]}")

    def _check_ids(self, ids: torch.Tensor, extra: int) -> None:
        st = self.stage
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != st.batch:
            raise ValueError(f"ids must be an int64 tensor [batch={st.batch}, tokens], the same on every rank, "
                             f"got {getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}")
        if ids.shape[1] + extra > st.max_tokens:
            raise ValueError(f"ids: {ids.shape[1]} prompt tokens + {extra} generated exceed the KV cache of "
                             f"{st.max_tokens} tokens")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= st.config.vocab):
            raise ValueError(f"ids must lie in 0..{st.config.vocab - 1}")

    def prefill(self, ids: torch.Tensor, slices: Sequence[int], agree: bool = True) -> Optional[torch.Tensor]:
        """Run the prompt ``ids`` through the pipeline in ``slices`` (token counts, in order).

        Args:
            ids: ``[B, L]`` int64 token ids, the same on every rank (only the first stage reads them).
            slices: positive ints summing to ``L``, the same on every rank.
            agree: first check (one small gather over the group) that every rank got the same
                shapes and slices, so that bad input raises on every rank; ``False`` skips it.

        Returns:
            On the last stage the logits of the final slice ``[B, slices[-1], vocab]``, else None.
            The stages' KV caches then hold the whole prompt; ``timeline()`` gives this rank's
            per-slice compute times.
        """
        if agree:
            self._agree(ids, slices, 0)
        slices = check_slices(slices)
        self._check_ids(ids, 0)
        if sum(slices) != ids.shape[1]:
            raise ValueError(f"slices must sum to the prompt length {ids.shape[1]}, got {sum(slices)}")
        st, m, n = self.stage, self.index, len(slices)
        if st.first:  # one copy up front: a per-slice copy from pageable memory would stall the host
            ids = ids.to(st.device)
        st.reset()
        self._clock.marks = [self._clock.now()]
        sends = []
        hidden_shape = lambda s: (st.batch, s, st.config.hidden)  # noqa: E731
        pending = None if st.first else self.post_recv(hidden_shape(slices[0]), st.dtype, m - 1)
        pos, out = 0, None
        for j, s in enumerate(slices):
            if st.first:
                x = ids[:, pos:pos + s]
            else:
                x = self.finish_recv(pending)
                if j + 1 < n:  # the next slice's transfer proceeds while this one computes
                    pending = self.post_recv(hidden_shape(slices[j + 1]), st.dtype, m - 1)
            self._clock.marks.append(self._clock.now())
            out = st.forward(x, pos, head=j == n - 1)
            self._clock.marks.append(self._clock.now())
            if not st.last:
                sends.append(self.send(out, m + 1))
            pos += s
        for work, _ in sends:
            work.wait()
        return out if st.last else None

    def timeline(self) -> List[Tuple[float, float]]:
        """(start, end) seconds of each slice's compute on this rank in the last prefill, from its start."""
        t = self._clock.seconds()
        return [(t[1 + 2 * j], t[2 + 2 * j]) for j in range((len(t) - 1) // 2)]

    def generate(self, ids: torch.Tensor, slices: Sequence[int], new_tokens: int
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Prefill ``ids`` in ``slices``, then greedily generate ``new_tokens`` tokens on the same stages.

        Returns ``(tokens, logits)``: the generated ids ``[B, new_tokens]`` on every rank (on the
        stage's device) and, on the last stage, the prefill's final-slice logits (else None).
        """
        self._agree(ids, slices, new_tokens)
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
            raise ValueError(f"new_tokens must be an int >= 1, got {new_tokens!r}")
        self._check_ids(ids, new_tokens - 1)
        logits = self.prefill(ids, slices, agree=False)
        st, m, last = self.stage, self.index, self.stages - 1
        token = logits[:, -1].argmax(dim=-1, keepdim=True) if st.last else None
        tokens = [token]
        pos = ids.shape[1]
        sends = []
        for _ in range(new_tokens - 1):
            if self.stages > 1 and st.last:
                sends.append(self.send(token, 0))
            if self.stages > 1 and st.first:
                token = self.finish_recv(self.post_recv((st.batch, 1), torch.int64, last))
            x = token if st.first else self.finish_recv(self.post_recv((st.batch, 1, st.config.hidden), st.dtype, m - 1))
            y = st.forward(x, pos)
            if st.last:
                token = y[:, -1].argmax(dim=-1, keepdim=True)
                tokens.append(token)
            else:
                sends.append(self.send(y, m + 1))
            pos += 1
        for work, _ in sends:
            work.wait()
        out = torch.cat(tokens, dim=1).to(self._coll_device) if st.last else \
            torch.empty((st.batch, new_tokens), dtype=torch.int64, device=self._coll_device)
        dist.broadcast(out, dist.get_global_rank(self.group, last), group=self.group)
        return out.to(st.device), logits


_CAPPED_GROUPS: dict = {}  # (ranks, ctas) -> group: runtimes over the same ranks share one


def _capped_nccl_group(group: dist.ProcessGroup, ctas: int) -> dist.ProcessGroup:
    """A process group over ``group``'s ranks whose NCCL communicators use at most ``ctas`` CTAs per
    kernel (collective over ``group`` the first time, then remembered). Where this torch cannot
    configure NCCL so, ``group`` itself, with a warning."""
    key = (tuple(dist.get_process_group_ranks(group)), ctas)
    if key not in _CAPPED_GROUPS:
        _CAPPED_GROUPS[key] = _new_capped_group(group, ctas)
    return _CAPPED_GROUPS[key]


def _new_capped_group(group: dist.ProcessGroup, ctas: int) -> dist.ProcessGroup:
    try:  # the same torch on every rank: all of them fail here alike, none waits for the others
        options = dist.ProcessGroupNCCL.Options()
        options.config.max_ctas = ctas
        options.config.min_ctas = 1
        return dist.new_group(dist.get_process_group_ranks(group), backend="nccl", pg_options=options,
                              use_local_synchronization=True)
    except (AttributeError, RuntimeError, TypeError, ValueError) as e:
        warnings.warn(f"PipelineRuntime: NCCL CTAs cannot be capped with this torch ({e}); device links use "
                      f"NCCL's default channels")
        return group
