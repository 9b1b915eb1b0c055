"""Communicator: all-reduce over a process group with DDA flat/tree or copy engines on peer memory, or NCCL.

    comm = Communicator(group)                 # every rank of the group, together
    y = comm.all_reduce(x)                      # algo="auto" picks ll / flat / tree / copy / nccl by size
    comm.all_reduce_(x, algo="tree")            # in place
    buf = comm.staging_buffer(x.shape, x.dtype) # write into it and all_reduce(buf): zero-copy

Calls on one communicator must be issued in the same order on every rank and, on GPUs, on one
stream per rank (like NCCL). Errors (a peer that never arrives, ranks that disagree about shape or
dtype) are detected in the kernel: on the cpu backend the call raises ``CollectiveError`` on every
rank at once; on GPUs the failed call writes NaN and the next call (or ``check()``) raises, since
raising at once would need a host synchronisation on every call.
"""
from __future__ import annotations

import socket
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import copy_engine
from . import host_path as host_path_mod
from .checks import SUPPORTED_DTYPES, check_tensor
from .. import thresholds
from ..errors import CollectiveError, ShardkitError
from ..kernels.all_reduce import cuda as cuda_dda
from ..kernels.all_reduce.flat import FlatConfig, flat_config, launch_flat_all_reduce
from ..kernels.all_reduce.rmsnorm import (RMSNormConfig, check_rmsnorm_operands, launch_all_reduce_rmsnorm, max_rows,
                                          rmsnorm_config)
from ..kernels.all_reduce.tree import TreeConfig, launch_tree_all_reduce, shard_elements, tree_config
from ..memory.peer_memory import PeerMemory, in_interpreter
from ..memory.protocol import DTYPE_CODES, LL_MAX_BYTES, MAX_PROGRAMS, call_signature, describe_failure, float_bits

# A launch grid: the Triton kernels' FlatConfig / TreeConfig or the CUDA kernels' CudaConfig.
LaunchConfig = FlatConfig | TreeConfig | cuda_dda.CudaConfig
KERNELS = ("auto", "triton", "cuda")
ALGOS = ("auto", "flat", "tree", "nccl", "copy", "ll")

# Barrier polls per second, to turn timeout_s into a poll count (approximate by nature).
_POLLS_PER_S = {"cuda": 4_000_000, "cpu": 500}  # measured: ~4M/s on H200 (volatile polls)


def timeout_iters(timeout_s: float, backend: str) -> int:
    """Barrier polls of a kernel that waits about ``timeout_s`` seconds on ``backend`` (approximate)."""
    return int(timeout_s * _POLLS_PER_S[backend])


DEFAULT_TIMEOUT_S = 60.0

# The open communicators of each process group (by name), newest last: closing one leaves the others.
_REGISTRY: dict[str, list["Communicator"]] = {}


def get_communicator(group_name: str) -> "Communicator":
    """The most recently created communicator of the process group named ``group_name`` still open."""
    if not _REGISTRY.get(group_name):
        raise ShardkitError(
            f"no shardkit Communicator for process group {group_name!r}: create "
            f"shardkit.Communicator(group) on every rank first")
    return _REGISTRY[group_name][-1]


def _overlap(a: torch.Tensor, b: torch.Tensor) -> str:
    """How the bytes of contiguous ``a`` and ``b`` meet: 'same' (one memory), 'partly' or '' (apart)."""
    a_lo, b_lo = a.data_ptr(), b.data_ptr()
    a_hi, b_hi = a_lo + a.numel() * a.element_size(), b_lo + b.numel() * b.element_size()
    if a.device != b.device or a_lo >= b_hi or b_lo >= a_hi:
        return ""
    return "same" if (a_lo, a_hi) == (b_lo, b_hi) else "partly"


def peer_access_problem(group: dist.ProcessGroup, backend: str, device: torch.device) -> str | None:
    """Why the ranks of ``group`` cannot use peer memory (agreed by all ranks), or None. ``backend``:
    "cuda" (NCCL groups: one GPU per rank, same host, peer access between every pair) or "cpu" (gloo
    groups: the ranks share a host's memory). Collective: every rank of the group calls it."""
    world = dist.get_world_size(group)
    reason = ""
    info = socket.gethostname() if backend == "cpu" else (socket.gethostname(), device.index)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, info, group=group)
    if backend == "cpu":
        if len(set(gathered)) != 1:
            reason = "ranks are on different hosts"
    else:
        hosts = {h for h, _ in gathered}
        devices = [d for _, d in gathered]
        if len(hosts) != 1:
            reason = "ranks are on different hosts"
        elif len(set(devices)) != len(devices):
            reason = "two ranks share one GPU"
        else:
            missing = [d for d in devices
                       if d != device.index and not torch.cuda.can_device_access_peer(device.index, d)]
            if missing:
                reason = f"GPU {device.index} has no peer access to GPU(s) {missing}"
    reasons: list = [None] * world
    dist.all_gather_object(reasons, reason, group=group)
    bad = [r for r in reasons if r]
    return bad[0] if bad else None


class Communicator:
    """All-reduce for the ranks of ``group`` (default: the world), all of which must construct it.

    Args:
        group: the process group. NCCL groups use the cuda backend, gloo groups the cpu backend
            (Triton kernels in the interpreter, ranks on one host).
        buffer_bytes: per-call workspace capacity (see PeerMemory); larger inputs go in chunks.
        timeout_s: how long a barrier waits for a peer before the call fails (approximate).
        rules: [(max_bytes or None, algo)] for algo="auto" (in graph captures and eager alike); default from
            thresholds.json (its eager rules, where measured, outside graph captures).
        kernels: "triton", "cuda" (the CUDA C++ kernels of csrc/, GPUs only, when built) or "auto"
            (cuda where built, else triton). Every rank must choose the same.
        host_path: how all_reduce reaches the CUDA kernels: "cpp" (the C++ host path, shardkit._C:
            the whole eager call in one C++ call), "python", or "auto" (cpp where built). Same calls,
            same results; ranks may differ in this.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, buffer_bytes: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, rules: list | None = None, kernels: str = "auto",
                 host_path: str = "auto") -> None:
        if not dist.is_initialized():
            raise ShardkitError("Communicator needs an initialised torch.distributed process group")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        if self.backend == "cpu" and not in_interpreter():
            raise ShardkitError("a gloo group runs shardkit's kernels on the CPU: set TRITON_INTERPRET=1 "
                                "before importing triton")
        if timeout_s <= 0:
            raise ValueError(f"Communicator: timeout_s must be positive, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        if kernels not in KERNELS:
            raise ValueError(f"Communicator: kernels must be one of {KERNELS}, got {kernels!r}")
        if kernels == "cuda" and (self.backend != "cuda" or not cuda_dda.available()):
            raise ShardkitError("Communicator(kernels='cuda') needs GPUs and the CUDA library (build with nvcc: "
                                "pip install -e . where nvcc is on the PATH)")
        if kernels == "auto":
            kernels = "cuda" if self.backend == "cuda" and cuda_dda.available() else "triton"
        self.kernels = kernels
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "cuda" else torch.device("cpu")
        self.device_name = torch.cuda.get_device_name(self.device) if self.backend == "cuda" else "cpu"
        self.rules = rules if rules is not None else thresholds.select_rules(self.device_name, self.world_size)
        # auto's rules outside a graph capture (eager times), where measured; else the graph ones.
        self._eager_rules = (rules if rules is not None
                             else thresholds.select_rules(self.device_name, self.world_size, mode="eager"))
        self._rmsnorm_tree_min_bytes = thresholds.rmsnorm_tree_min_bytes(self.device_name, self.world_size)
        self._rmsnorm_ll_max_bytes = {m: thresholds.rmsnorm_ll_max_bytes(self.device_name, self.world_size, mode=m)
                                      for m in ("graph", "eager")}
        self.memory: PeerMemory | None = None
        self.fallback_reason = peer_access_problem(self.group, self.backend, self.device)
        if self.fallback_reason is None:
            self.memory = PeerMemory(self.group, buffer_bytes=buffer_bytes, backend=self.backend, device=self.device)
        elif self.rank == 0:
            warnings.warn(f"shardkit: peer-memory collectives disabled, using NCCL: {self.fallback_reason}",
                          stacklevel=2)
        # The launch policies (beside each kernel) take the SM count; the interpreter has its own.
        self._sm_count = (torch.cuda.get_device_properties(self.device).multi_processor_count
                          if self.backend == "cuda" else 0)
        self._interpret = self.backend == "cpu"
        self._timeout_iters = timeout_iters(self.timeout_s, self.backend)
        self._host_table = (cuda_dda.HostTable(self.memory.table.tolist())
                            if self.memory is not None and self.kernels == "cuda" else None)
        if host_path not in host_path_mod.HOST_PATHS:
            raise ValueError(f"Communicator: host_path must be one of {host_path_mod.HOST_PATHS}, got {host_path!r}")
        if host_path == "cpp" and (self.kernels != "cuda" or not host_path_mod.available()):
            raise ShardkitError(f"Communicator(host_path='cpp') needs the CUDA kernels and the torch binding "
                                f"(shardkit._C: {host_path_mod.IMPORT_ERROR or 'kernels are ' + self.kernels})")
        # The C++ host path (all_reduce on the CUDA kernels; it hands back what it does not handle).
        self._host = (host_path_mod.make_host(self.memory, self.rank, self.world_size, self.device, self._timeout_iters,
                                              self._sm_count, thresholds.agreed_rules(self.rules, self._eager_rules),
                                              self._rmsnorm_ll_max_bytes)
                      if host_path != "python" and self._host_table is not None and self.world_size > 1
                      and host_path_mod.available() else None)
        self._error: str | None = None
        self._closed = False
        _REGISTRY.setdefault(self.group.group_name, []).append(self)

    # ------------------------------------------------------------------ public API
    def all_reduce(self, x: torch.Tensor, algo: str = "auto", out: torch.Tensor | None = None, *,
                   config: LaunchConfig | None = None) -> torch.Tensor:
        """Sum of ``x`` over the ranks, in a new tensor or in ``out``.

        x: contiguous fp32/fp16/bf16 tensor on this rank's device, any shape; same shape and dtype
           on every rank. Not modified (unless ``out`` is ``x``).
        algo: "auto" | "flat" | "tree" | "nccl" | "copy" (copy-engine transfers for large messages,
           ``collectives/copy_engine.py``: on 2 GPUs the oneshot schedule, which takes messages larger
           than the workspace in one call through a ring of slots; on more GPUs it is fastest with a
           ``buffer_bytes`` that holds the message) | "ll"
           (one synchronisation per call, flags carried in the data: csrc/dda/ll_all_reduce.cu; small
           messages on the CUDA kernels; calls above ``protocol.LL_MAX_BYTES`` go in chunks; where
           ``auto``'s rules pick it on the Triton kernels, flat runs instead).
        out: optional contiguous tensor of x's shape, dtype and device; it may be ``x`` (or x's memory
           exactly: in place), but not overlap x partly (ValueError).
        config: the launch grid instead of the launch policy's (for tuning): a ``FlatConfig`` /
           ``TreeConfig`` (Triton kernels) or a ``CudaConfig`` (CUDA kernels), with algo "flat" or
           "tree" (or "ll", CUDA kernels); the same on every rank. It applies to every chunk of the call.
        Returns the reduced tensor (``out`` when given). fp32 accumulation, ranks summed in rank
        order: every rank gets bitwise the same result.
        """
        if self._host is not None and config is None:
            result = self._host.all_reduce(x, out, algo)
            if result is not None:
                return result
        self._check_open("all_reduce")
        self._validate(x, "x")
        if out is None:
            out = torch.empty_like(x)
        elif out is not x:
            self._validate(out, "out")
            if out.shape != x.shape or out.dtype != x.dtype:
                raise ValueError(f"all_reduce: out must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                                 f"got {tuple(out.shape)} and {out.dtype}")
            overlap = _overlap(out, x)
            if overlap == "partly":
                raise ValueError("all_reduce: out overlaps x partly: pass x itself (in place) or a separate buffer")
            if overlap == "same":  # another view of x: in place
                self._run(x, x, algo, config)
                return out
        return self._run(x, out, algo, config)

    def all_reduce_(self, x: torch.Tensor, algo: str = "auto", *, config: LaunchConfig | None = None) -> torch.Tensor:
        """In-place sum of ``x`` over the ranks; returns ``x``; arguments as ``all_reduce``."""
        if self._host is not None and config is None and self._host.all_reduce(x, x, algo) is not None:
            return x
        self._check_open("all_reduce_")
        self._validate(x, "x")
        return self._run(x, x, algo, config)

    def staging_buffer(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A tensor in this rank's peer-visible staging area: all-reduce it without a copy.

        The area is shared by all staging buffers of this communicator: one live input at a time.
        After ``close()`` a buffer stays readable (the mapping lives as long as the tensor) but is
        no longer part of any collective.
        """
        self._check_open("staging_buffer")
        if self.memory is None:
            raise ShardkitError(f"staging_buffer: no peer memory on this group ({self.fallback_reason})")
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"staging_buffer: dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        numel = 1
        for s in shape:
            numel *= int(s)
        return self.memory.staging(numel, dtype).view(shape)

    def check(self) -> None:
        """Wait for this rank's queued work and raise CollectiveError if a collective failed."""
        self._check_open("check")
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
        self._raise_if_failed()

    def close(self) -> None:
        """Release the peer memory (idempotent); every later call raises ShardkitError. Other
        communicators of the group stay registered for the torch ops."""
        self._closed = True
        self._host = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        open_ones = _REGISTRY.get(self.group.group_name, [])
        if self in open_ones:
            open_ones.remove(self)
        if not open_ones:
            _REGISTRY.pop(self.group.group_name, None)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ShardkitError(f"{what}: this Communicator is closed; create a new one (on every rank)")

    # ------------------------------------------------------------------ internals
    def _validate(self, t: torch.Tensor, name: str) -> None:
        check_tensor(t, name, self.device)

    def _raise_if_failed(self) -> None:
        if self._error is None and self.memory is not None and self.memory.error_record[0] != 0:
            self._error = describe_failure(self.memory.error_record, self.rank, self.world_size, self.timeout_s)
        if self._error is not None:
            raise CollectiveError(self._error)

    def _run(self, x: torch.Tensor, out: torch.Tensor, algo: str, config: LaunchConfig | None) -> torch.Tensor:
        if algo not in ALGOS:
            raise ValueError(f"all_reduce: algo must be one of {ALGOS}, got {algo!r}")
        if config is not None:
            if algo not in ("flat", "tree", "ll"):
                raise ValueError(f"all_reduce: a config needs algo 'flat', 'tree' or 'll', got {algo!r}")
            self._check_config(algo, config)
        self._raise_if_failed()
        if self.world_size == 1:  # the sum over one rank is x, whatever the algo (the kernels need two ranks)
            if out is not x:
                out.copy_(x)
            return out
        if algo == "ll" and self.kernels != "cuda":
            raise ShardkitError("all_reduce(algo='ll') needs the CUDA kernels (Communicator(kernels='cuda') on GPUs, "
                                "with the CUDA library built)")
        nbytes = x.numel() * x.element_size()
        if algo == "auto":
            # The rules of the call's mode (the C++ host path hands back the sizes where they differ).
            rules = (self._eager_rules if self.backend == "cuda" and not torch.cuda.is_current_stream_capturing()
                     else self.rules)
            algo = thresholds.choose(rules, nbytes) if self.memory is not None else "nccl"
            if algo == "ll" and self.kernels != "cuda":  # a rule measured on the CUDA kernels
                algo = "flat"
        if algo == "nccl" or x.numel() == 0:
            if out is not x:
                out.copy_(x)
            if x.numel():
                dist.all_reduce(out, group=self.group)
            return out
        if self.memory is None:
            raise ShardkitError(f"all_reduce(algo={algo!r}) needs peer memory, which this group lacks: "
                                f"{self.fallback_reason}")
        mem = self.memory
        if algo == "copy":
            copy_engine.all_reduce(mem, x, out, timeout_iters=self._timeout_iters)
            if self.backend == "cpu":
                self._raise_if_failed()
            return out
        x_offset = mem.holds(x)
        # A flat in-place call must stage: peers read our input until they are done. LL pushes x from
        # wherever it lives (no zero-copy mode) and holds LL_MAX_BYTES per call.
        zero_copy = (x_offset is not None and x_offset % 16 == 0 and not (algo == "flat" and out is x)
                     and algo != "ll")
        capacity = LL_MAX_BYTES if algo == "ll" else mem.buffer_bytes
        xs, outs = x.view(-1), out.view(-1)
        if zero_copy or nbytes <= capacity:
            self._launch(algo, xs, outs, x_offset if zero_copy else 0, zero_copy, config, x.numel(), 0, 1)
        else:
            step = capacity // x.element_size()
            chunks = -(-x.numel() // step)
            for i in range(chunks):
                lo = i * step
                self._launch(algo, xs[lo:lo + step], outs[lo:lo + step], 0, False, config, x.numel(), i, chunks)
        if self.backend == "cpu":
            self._raise_if_failed()
        return out

    def _launch(self, algo: str, x: torch.Tensor, out: torch.Tensor, x_offset: int, zero_copy: bool,
                config: LaunchConfig | None, total: int, chunk: int, chunks: int) -> None:
        """One kernel launch on chunk ``chunk`` of ``chunks`` of a call over ``total`` elements.

        The fingerprint covers the whole call (total count, chunk index and count), the work map
        (algorithm, kernel family, grid, packed/unaligned CUDA path) and the zero-copy offset: ranks
        whose calls differ in any of these fail at the first barrier instead of mixing data.
        """
        mem = self.memory
        numel = x.numel()
        shard = shard_elements(numel, self.world_size) if algo == "tree" else 0
        if config is None:  # the policy's (an explicit config was checked once per call, in _run)
            config = self._config(algo, numel, shard, x.element_size())
        # (LL's work map does not depend on alignment: every line carries its own flag.)
        packed = algo == "ll" or self.kernels != "cuda" or (x.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0
                                                            and numel % (16 // x.element_size()) == 0)
        sig = call_signature(f"all_reduce_{algo}_{self.kernels}", total, chunk, chunks, numel,
                             DTYPE_CODES[x.dtype], x_offset if zero_copy else -1, packed, *vars(config).values())
        common = dict(error_record_addr=mem.error_record_addr, rank=self.rank, sig=sig, x_offset=x_offset,
                      buffer_bytes=mem.buffer_bytes, timeout_iters=self._timeout_iters, zero_copy=zero_copy,
                      config=config)
        if algo == "ll":
            cuda_dda.launch_ll_all_reduce(x, out, self._host_table, mem.error_record_addr, self.rank, sig,
                                          mem.buffer_bytes, self._timeout_iters, config)
        elif self.kernels == "cuda":
            launch = cuda_dda.launch_flat_all_reduce if algo == "flat" else cuda_dda.launch_tree_all_reduce
            launch(x, out, table=self._host_table, **common, **({"shard": shard} if algo == "tree" else {}))
        elif algo == "flat":
            launch_flat_all_reduce(x, out, table=mem.table, world=self.world_size, **common)
        else:
            launch_tree_all_reduce(x, out, table=mem.table, world=self.world_size, shard=shard, **common)

    def _config(self, algo: str, numel: int, shard: int, element_size: int) -> LaunchConfig:
        """The launch policy's grid for this call (a pure function of the shape: the same on every rank)."""
        if self.kernels == "cuda":
            if algo == "ll":
                return cuda_dda.ll_config(numel, element_size, self._sm_count)
            if algo == "flat":
                return cuda_dda.flat_config(numel, element_size, self._sm_count)
            return cuda_dda.tree_config(shard, element_size, self.world_size, self._sm_count)
        if algo == "flat":
            return flat_config(numel, element_size, self._sm_count, self._interpret)
        return tree_config(shard, element_size, self._sm_count, self._interpret)

    def _check_config(self, algo: str, config: LaunchConfig) -> None:
        expected = cuda_dda.CudaConfig if self.kernels == "cuda" else FlatConfig if algo == "flat" else TreeConfig
        if type(config) is not expected:
            raise TypeError(f"all_reduce: config for algo={algo!r} on the {self.kernels} kernels must be a "
                            f"{expected.__name__}, got {type(config).__name__}")
        if not 1 <= config.programs <= MAX_PROGRAMS:
            raise ValueError(f"all_reduce: config.programs must be in 1..{MAX_PROGRAMS}, got {config.programs}")

    # ------------------------------------------------------------------ fused all-reduce + residual + RMSNorm
    RMSNORM_ALGOS = ("auto", "flat", "tree", "nccl", "ll")

    def all_reduce_residual_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                    eps: float = 1e-6, algo: str = "auto", *, out: torch.Tensor | None = None,
                                    residual_out: torch.Tensor | None = None,
                                    config: RMSNormConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce ``x``, add ``residual``, RMSNorm: the tensor-parallel sync point of a Llama block.

        x: [..., hidden] this rank's partial sum (e.g. a row-parallel linear's output); contiguous
           fp32/fp16/bf16 on this rank's device, same shape and dtype on every rank. Not modified.
        residual: x's shape and dtype, contiguous, equal on every rank (the replicated residual
           stream). Not modified.
        weight: [hidden] RMSNorm weight, x's dtype, equal on every rank. Not modified.
        eps: RMSNorm epsilon (>= 0).
        algo: "flat" (one-shot: every rank reduces every row, one barrier), "tree" (two-shot:
           reduce-scatter by rows, in chunks over all SMs, norm, all-gather), "ll" (CUDA kernels only:
           one synchronisation per call, flags carried in the data, csrc/dda/ll_rmsnorm.cu;
           ``cuda.ll_rmsnorm_max_rows`` rows per launch, more go in chunks), "nccl"
           (dist.all_reduce + add + F.rms_norm), or "auto": ll on the CUDA kernels up to the measured
           ``thresholds.rmsnorm_ll_max_bytes`` of the mode (CUDA-graph capture or eager), else tree from the
           measured crossover for this GPU and world size (thresholds.json), flat below; without one,
           flat where the all-reduce rules pick flat; nccl without peer memory. Calls of ll (and auto
           picking it) go through the C++ host path where built.
        out, residual_out: optional contiguous buffers of x's shape and dtype (e.g. static buffers for
           CUDA graphs); each may be x or residual itself, but not overlap anything else.
        config: the launch grid instead of the launch policy's (``rmsnorm_config``; for tuning),
           with algo "flat" or "tree"; the same on every rank.
        Returns (out, residual_out) with residual_out = residual + sum over ranks of x and
        out = residual_out * rsqrt(mean(residual_out**2, -1) + eps) * weight, fp32 math, in x's
        dtype; bitwise identical on every rank (ranks summed in rank order).
        """
        if self._host is not None and config is None:
            result = self._host.all_reduce_residual_rmsnorm(x, residual, weight, eps, algo, out, residual_out)
            if result is not None:
                return result
        self._check_open("all_reduce_residual_rmsnorm")
        hidden = self._check_rmsnorm_args(x, residual, weight, eps, algo, out, residual_out)
        if config is not None and algo not in ("flat", "tree"):
            raise ValueError(f"all_reduce_residual_rmsnorm: a config needs algo 'flat' or 'tree', got {algo!r}")
        self._raise_if_failed()
        out = torch.empty_like(x) if out is None else out
        residual_out = torch.empty_like(x) if residual_out is None else residual_out
        if algo == "auto":
            algo = "nccl" if self.memory is None else self._rmsnorm_auto(x)
        if x.numel() == 0:
            return out, residual_out
        if algo == "nccl" or self.world_size == 1:  # one rank: add and norm here (the CUDA kernels need two)
            total = x
            if self.world_size > 1:
                total = x.clone()
                dist.all_reduce(total, group=self.group)
            torch.add(residual, total, out=residual_out)
            out.copy_(F.rms_norm(residual_out.float(), (hidden,), weight.float(), eps))
            return out, residual_out
        if self.memory is None:
            raise ShardkitError(f"all_reduce_residual_rmsnorm(algo={algo!r}) needs peer memory, which this group "
                                f"lacks: {self.fallback_reason}")
        mem = self.memory
        rows = [t.view(-1, hidden) for t in (x, residual, out, residual_out)]
        tokens = rows[0].shape[0]
        if algo == "ll":
            self._rmsnorm_ll(rows, weight, eps, tokens, hidden)
            return out, residual_out
        if config is None:
            config = rmsnorm_config(algo, tokens, hidden, self.world_size, self._sm_count, self._interpret)
        elif type(config) is not RMSNormConfig or not 1 <= config.programs <= MAX_PROGRAMS or (
                (algo == "tree") != (config.block_c > 0)):
            raise ValueError(f"all_reduce_residual_rmsnorm: config must be an RMSNormConfig with 1..{MAX_PROGRAMS} "
                             f"programs and block_c > 0 exactly for algo 'tree', got {config!r}")
        step = max_rows(hidden, x.element_size(), mem.buffer_bytes, algo, config.block_c)
        if step == 0:
            raise ValueError(f"all_reduce_residual_rmsnorm: one row of x ({hidden} x {x.dtype}) does not fit the "
                             f"epoch buffer ({mem.buffer_bytes} bytes): use a larger buffer_bytes or algo='nccl'")
        chunks = -(-tokens // step)
        for i in range(chunks):
            xc, rc, oc, roc = (t[i * step:(i + 1) * step] for t in rows)
            # The whole call in the fingerprint: total rows, this chunk, eps, grid (ranks passing a
            # different eps would otherwise compute different outputs without noticing).
            sig = call_signature(f"rmsnorm_{algo}", tokens, i, chunks, xc.shape[0], hidden, DTYPE_CODES[x.dtype],
                                 float_bits(eps), *vars(config).values())
            launch_all_reduce_rmsnorm(xc, rc, weight, oc, roc, mem.table, mem.error_record_addr, self.rank,
                                      self.world_size, sig, eps, mem.buffer_bytes, self._timeout_iters, algo, config)
        if self.backend == "cpu":
            self._raise_if_failed()
        return out, residual_out

    def _rmsnorm_ll(self, rows: list[torch.Tensor], weight: torch.Tensor, eps: float, tokens: int, hidden: int,
                    segments: int | None = None) -> None:
        """The fused call on the CUDA LL kernel (the C++ host path's launches, in Python): ``rows`` = x,
        residual, out, residual_out as [tokens, hidden]; chunks of ``ll_rmsnorm_max_rows`` rows. ``segments``:
        blocks per row instead of the policy's (``cuda.ll_rmsnorm_grid``; tuning and tests)."""
        what = "all_reduce_residual_rmsnorm"
        x = rows[0]
        if self.kernels != "cuda":
            raise ShardkitError(f"{what}(algo='ll') needs the CUDA kernels (Communicator(kernels='cuda') on GPUs, "
                                f"with the CUDA library built)")
        step = cuda_dda.ll_rmsnorm_max_rows(hidden, x.element_size())
        if step == 0:
            raise ValueError(f"{what}: algo='ll' takes rows of at most {LL_MAX_BYTES} bytes, got hidden {hidden} "
                             f"in {x.dtype}: use algo 'flat' or 'tree'")
        mem = self.memory
        chunks = -(-tokens // step)
        for i in range(chunks):
            xc, rc, oc, roc = (t[i * step:(i + 1) * step] for t in rows)
            config = (cuda_dda.ll_rmsnorm_config(xc.shape[0], hidden, x.element_size(), self._sm_count)
                      if segments is None else
                      cuda_dda.ll_rmsnorm_grid(xc.shape[0], hidden, x.element_size(), self._sm_count, segments))
            sig = call_signature("rmsnorm_ll_cuda", tokens, i, chunks, xc.shape[0], hidden, DTYPE_CODES[x.dtype],
                                 float_bits(eps), config.programs, config.threads)
            cuda_dda.launch_ll_all_reduce_rmsnorm(xc, rc, weight, oc, roc, self._host_table, mem.error_record_addr,
                                                  self.rank, sig, float(eps), mem.buffer_bytes, self._timeout_iters,
                                                  config)

    def _rmsnorm_auto(self, x: torch.Tensor, capturing: bool | None = None) -> str:
        """ll, flat or tree for x: ll on the CUDA kernels up to the ``rmsnorm_ll_max_bytes`` measured in
        this mode (``capturing``: a CUDA-graph capture; None: whether the current stream is capturing);
        else the measured flat / tree crossover of the fused kernels on this GPU and world size, else the
        all-reduce rule."""
        nbytes = x.numel() * x.element_size()
        if self.kernels == "cuda" and x.numel() > 0:
            if capturing is None:
                capturing = torch.cuda.is_current_stream_capturing()
            limit = self._rmsnorm_ll_max_bytes["graph" if capturing else "eager"]
            if (limit is not None and nbytes <= limit
                    and cuda_dda.ll_rmsnorm_max_rows(x.shape[-1], x.element_size()) > 0):
                return "ll"
        if self._rmsnorm_tree_min_bytes is None:
            return "flat" if thresholds.choose(self.rules, nbytes) == "flat" else "tree"
        return "tree" if nbytes >= self._rmsnorm_tree_min_bytes else "flat"

    def _check_rmsnorm_args(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            algo: str, out: torch.Tensor | None, residual_out: torch.Tensor | None) -> int:
        """Raise a TypeError/ValueError naming the bad argument; returns hidden."""
        what = "all_reduce_residual_rmsnorm"
        for t, name in ((x, "x"), (residual, "residual"), (weight, "weight")):
            self._validate(t, name)
        hidden = check_rmsnorm_operands(x, residual, weight, eps, what)
        if algo not in self.RMSNORM_ALGOS:
            raise ValueError(f"{what}: algo must be one of {self.RMSNORM_ALGOS}, got {algo!r}")
        for t, name in ((out, "out"), (residual_out, "residual_out")):
            if t is not None:
                self._validate(t, name)
                if t.shape != x.shape or t.dtype != x.dtype:
                    raise ValueError(f"{what}: {name} must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                                     f"got {tuple(t.shape)} and {t.dtype}")
        if out is not None and residual_out is not None and _overlap(out, residual_out):
            raise ValueError(f"{what}: out and residual_out must be different buffers that do not overlap")
        for t, name in ((out, "out"), (residual_out, "residual_out")):
            if t is None:
                continue
            if _overlap(t, weight):
                raise ValueError(f"{what}: {name} must not overlap weight")
            for source, source_name in ((x, "x"), (residual, "residual")):
                if _overlap(t, source) == "partly":
                    raise ValueError(f"{what}: {name} overlaps {source_name} partly: pass {source_name} itself "
                                     f"or a separate buffer")
        return hidden
