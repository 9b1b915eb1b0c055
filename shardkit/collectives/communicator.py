"""Communicator: all-reduce over a process group with DDA flat/tree on peer memory, or NCCL.

    comm = Communicator(group)                 # every rank of the group, together
    y = comm.all_reduce(x)                      # algo="auto" picks flat / tree / nccl by size
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

from triton import next_power_of_2 as triton_next_pow2

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import CollectiveError, ShardkitError
from ..kernels.all_reduce import cuda as cuda_dda
from ..kernels.all_reduce.flat import launch_flat_all_reduce
from ..kernels.all_reduce.rmsnorm import (MAX_HIDDEN, chunk_columns, chunk_warps, default_warps,
                                          launch_all_reduce_rmsnorm, max_rows)
from ..kernels.all_reduce.rmsnorm import call_signature as rmsnorm_signature
from ..kernels.all_reduce.tree import launch_tree_all_reduce
from ..kernels.sync import LOCAL_WAIT_SLOT, MAX_PROGRAMS, MISMATCH, TIMEOUT
from ..memory.peer_memory import PeerMemory, in_interpreter
from .. import thresholds

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_CODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
# Both kernel families share the workspace but map work to programs differently: the signature
# tells them apart, so ranks that disagree about the kernels fail instead of mixing data.
_ALGO_CODE = {("flat", "triton"): 1, ("tree", "triton"): 2, ("flat", "cuda"): 3, ("tree", "cuda"): 4}
KERNELS = ("auto", "triton", "cuda")
ALGOS = ("auto", "flat", "tree", "nccl")

# Barrier polls per second, to turn timeout_s into a poll count (approximate by nature).
_POLLS_PER_S = {"cuda": 4_000_000, "cpu": 500}  # measured: ~4M/s on H200 (volatile polls)
DEFAULT_TIMEOUT_S = 60.0

_REGISTRY: dict[str, "Communicator"] = {}


def get_communicator(group_name: str) -> "Communicator":
    """The communicator most recently created for the process group named ``group_name``."""
    try:
        return _REGISTRY[group_name]
    except KeyError:
        raise ShardkitError(
            f"no shardkit Communicator for process group {group_name!r}: create "
            f"shardkit.Communicator(group) on every rank first") from None


def call_signature(algo: str, kernels: str, numel: int, dtype: torch.dtype, x_offset: int,
                   packed: bool = True) -> int:
    """31-bit fingerprint of a call; ranks compare it at the first barrier. ``packed``: the CUDA
    kernels move 16-byte packs (x and out 16-byte aligned, numel a multiple of a pack) or single
    elements, which maps elements to blocks differently, so ranks must agree on it too."""
    h = (_ALGO_CODE[algo, kernels] * 1_000_003 + _DTYPE_CODE[dtype]) * 2_147_483_629
    h = (h ^ numel) * 1_000_000_007 + x_offset + 1
    return (h + (0 if packed else 7919)) % 2_147_483_647


class Communicator:
    """All-reduce for the ranks of ``group`` (default: the world), all of which must construct it.

    Args:
        group: the process group. NCCL groups use the cuda backend, gloo groups the cpu backend
            (Triton kernels in the interpreter, ranks on one host).
        half_bytes: per-call workspace capacity (see PeerMemory); larger inputs go in chunks.
        timeout_s: how long a barrier waits for a peer before the call fails (approximate).
        rules: [(max_bytes or None, algo)] for algo="auto"; default from thresholds.json.
        kernels: "triton", "cuda" (the CUDA C++ kernels of csrc/, GPUs only, when built) or "auto"
            (cuda where built, else triton). Every rank must choose the same.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, half_bytes: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, rules: list | None = None, kernels: str = "auto") -> None:
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
        self._rmsnorm_twoshot_min_bytes = thresholds.rmsnorm_twoshot_min_bytes(self.device_name, self.world_size)
        self.memory: PeerMemory | None = None
        self.fallback_reason = self._peer_access_problem()
        if self.fallback_reason is None:
            self.memory = PeerMemory(self.group, half_bytes=half_bytes, backend=self.backend, device=self.device)
        elif self.rank == 0:
            warnings.warn(f"shardkit: peer-memory collectives disabled, using NCCL: {self.fallback_reason}",
                          stacklevel=2)
        if self.backend == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            self._max_programs = min(MAX_PROGRAMS, props.multi_processor_count)
            self._block = self._warps = None  # by size: see _launch_shape
        else:  # the interpreter runs programs one after another: few, large ones are fastest
            self._max_programs, self._block, self._warps = 2, 512, 1
        self._timeout_iters = int(self.timeout_s * _POLLS_PER_S[self.backend])
        self._host_table = (cuda_dda.HostTable(self.memory.table.tolist())
                            if self.memory is not None and self.kernels == "cuda" else None)
        self._error: str | None = None
        _REGISTRY[self.group.group_name] = self

    # ------------------------------------------------------------------ topology
    def _peer_access_problem(self) -> str | None:
        """Why this group cannot use peer memory (agreed by all ranks), or None."""
        reason = ""
        info = socket.gethostname() if self.backend == "cpu" else (socket.gethostname(), self.device.index)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, info, group=self.group)
        if self.backend == "cpu":
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
                missing = [d for d in devices if d != self.device.index
                           and not torch.cuda.can_device_access_peer(self.device.index, d)]
                if missing:
                    reason = f"GPU {self.device.index} has no peer access to GPU(s) {missing}"
        reasons: list = [None] * self.world_size
        dist.all_gather_object(reasons, reason, group=self.group)
        bad = [r for r in reasons if r]
        return bad[0] if bad else None

    # ------------------------------------------------------------------ public API
    def all_reduce(self, x: torch.Tensor, algo: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of ``x`` over the ranks, in a new tensor or in ``out``.

        x: contiguous fp32/fp16/bf16 tensor on this rank's device, any shape; same shape and dtype
           on every rank. Not modified (unless ``out`` is ``x``).
        algo: "auto" | "flat" | "tree" | "nccl".
        out: optional contiguous tensor of x's shape, dtype and device (may be ``x``).
        Returns the reduced tensor (``out`` when given). fp32 accumulation, ranks summed in rank
        order: every rank gets bitwise the same result.
        """
        self._validate(x, "x")
        if out is None:
            out = torch.empty_like(x)
        elif out is not x:
            self._validate(out, "out")
            if out.shape != x.shape or out.dtype != x.dtype:
                raise ValueError(f"all_reduce: out must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                                 f"got {tuple(out.shape)} and {out.dtype}")
        return self._run(x, out, algo)

    def all_reduce_(self, x: torch.Tensor, algo: str = "auto") -> torch.Tensor:
        """In-place sum of ``x`` over the ranks; returns ``x``."""
        self._validate(x, "x")
        return self._run(x, x, algo)

    def staging_buffer(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A tensor in this rank's peer-visible staging area: all-reduce it without a copy.

        The area is shared by all staging buffers of this communicator: one live input at a time.
        """
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
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
        self._raise_if_failed()

    def close(self) -> None:
        """Release the peer memory (idempotent)."""
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if _REGISTRY.get(self.group.group_name) is self:
            del _REGISTRY[self.group.group_name]

    # ------------------------------------------------------------------ internals
    def _validate(self, t: torch.Tensor, name: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"all_reduce: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"all_reduce: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"all_reduce: {name} must be on {self.device} (this rank's device), got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"all_reduce: {name} must be contiguous (call .contiguous() first)")

    def _raise_if_failed(self) -> None:
        if self._error is None and self.memory is not None and self.memory.status_view[0] != 0:
            self._error = self._describe_failure()
        if self._error is not None:
            raise CollectiveError(self._error)

    def _describe_failure(self) -> str:
        code, slot, culprits, epoch = (int(v) for v in self.memory.status_view)
        ranks = [r for r in range(self.world_size) if culprits >> r & 1]
        stage = slot // MAX_PROGRAMS
        where = f"barrier {stage} of call {epoch}"
        if slot == LOCAL_WAIT_SLOT and code == TIMEOUT:
            what = (f"the programs of this rank's own launch did not all run within {self.timeout_s:g} s (call "
                    f"{epoch}; they wait for each other, so they must all fit on the GPU at once: is other "
                    f"work holding its SMs?)")
        elif code == MISMATCH:
            what = (f"rank(s) {ranks} called with a different element count, dtype, algorithm or "
                    f"buffer than this rank ({where}); every rank must make the same calls")
        elif code == TIMEOUT:
            what = f"rank(s) {ranks} did not arrive within {self.timeout_s:g} s ({where})"
        else:
            what = f"error code {code} at {where}"
        return (f"shardkit collective failed on rank {self.rank}: {what}. This communicator is unusable "
                f"now; its outputs from this call on are NaN. Create a new Communicator.")

    def _run(self, x: torch.Tensor, out: torch.Tensor, algo: str) -> torch.Tensor:
        if algo not in ALGOS:
            raise ValueError(f"all_reduce: algo must be one of {ALGOS}, got {algo!r}")
        self._raise_if_failed()
        nbytes = x.numel() * x.element_size()
        if algo == "auto":
            algo = thresholds.choose(self.rules, nbytes) if self.memory is not None else "nccl"
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
        x_offset = mem.holds(x)
        # A flat in-place call must stage: peers read our input until they are done.
        zero_copy = x_offset is not None and x_offset % 16 == 0 and not (algo == "flat" and out is x)
        if zero_copy or nbytes <= mem.half_bytes:
            self._launch(algo, x.view(-1), out.view(-1), x_offset if zero_copy else 0, zero_copy)
        else:
            step = mem.half_bytes // x.element_size()
            xs, outs = x.view(-1), out.view(-1)
            for lo in range(0, x.numel(), step):
                self._launch(algo, xs[lo:lo + step], outs[lo:lo + step], 0, False)
        if self.backend == "cpu":
            self._raise_if_failed()
        return out

    def _launch_shape(self, algo: str, elements: int) -> tuple[int, int, int]:
        """(BLOCK, programs, warps) for ``elements`` per rank (flat) or per shard (tree).

        Measured on 4xH200 (bench/tune_all_reduce.py, docs/PERFORMANCE.md): the copies are latency
        bound, so the best grid gives every program about one tile and spreads over all SMs; the
        tree kernel grows its tile with the shard so that ~64 programs suffice.
        """
        if self._block is not None:
            block, warps = self._block, self._warps
        elif algo == "flat":
            block, warps = 2048, 8 if elements <= (1 << 17) else 16
        else:
            block = min(8192, max(1024, triton_next_pow2(-(-elements // 64))))
            warps = 8 if elements <= 4096 else 4
        return block, max(1, min(self._max_programs, -(-elements // block))), warps

    def _launch(self, algo: str, x: torch.Tensor, out: torch.Tensor, x_offset: int, zero_copy: bool) -> None:
        mem = self.memory
        numel = x.numel()
        packed = self.kernels != "cuda" or (x.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0
                                            and numel % (16 // x.element_size()) == 0)
        sig = call_signature(algo, self.kernels, numel, x.dtype, x_offset if zero_copy else -1, packed)
        # Tree shards of a multiple of 16 elements keep every shard start 16-byte aligned (vector loads).
        shard = -(-numel // (16 * self.world_size)) * 16 if algo == "tree" else 0
        if self.kernels == "cuda":
            self._launch_cuda(algo, x, out, x_offset, zero_copy, sig, shard)
            return
        common = dict(table=mem.table, status_addr=mem.status_addr, rank=self.rank, world=self.world_size,
                      sig=sig, x_offset=x_offset, half_bytes=mem.half_bytes,
                      timeout_iters=self._timeout_iters, zero_copy=zero_copy)
        if algo == "flat":
            block, programs, warps = self._launch_shape(algo, numel)
            launch_flat_all_reduce(x, out, programs=programs, block=block, num_warps=warps, **common)
        else:
            block, programs, warps = self._launch_shape(algo, shard)
            launch_tree_all_reduce(x, out, programs=programs, shard=shard, block=block, num_warps=warps,
                                   **common)

    def _launch_cuda(self, algo: str, x: torch.Tensor, out: torch.Tensor, x_offset: int, zero_copy: bool,
                     sig: int, shard: int) -> None:
        """The CUDA C++ kernels, launched through ctypes with the grid of ``_cuda_shape``."""
        mem = self.memory
        common = dict(table=self._host_table, status_addr=mem.status_addr, rank=self.rank, sig=sig,
                      x_offset=x_offset, half_bytes=mem.half_bytes, timeout_iters=self._timeout_iters,
                      zero_copy=zero_copy)
        if algo == "flat":
            programs, threads, unroll = self._cuda_shape(algo, x.numel(), x.element_size())
            cuda_dda.launch_flat_all_reduce(x, out, programs=programs, threads=threads, unroll=unroll, **common)
        else:
            programs, threads, unroll = self._cuda_shape(algo, shard, x.element_size())
            cuda_dda.launch_tree_all_reduce(x, out, programs=programs, threads=threads, unroll=unroll, shard=shard,
                                            **common)

    def _cuda_shape(self, algo: str, elements: int, element_size: int) -> tuple[int, int, int]:
        """(programs, threads, unroll) of a CUDA launch over ``elements`` per rank (flat) or per shard (tree).

        Flat: one 16-byte pack per thread per tile, 512 threads (measured faster than Triton's flat
        grid); tuning may set the threads through ``_warps``. Tree (bench/tune_all_reduce.py
        --kernels cuda on 2 and 4 H200s, ``tune_all_reduce_cuda_H200_x{2,4}_*``): 256 threads, every
        tile at once up to one program per SM, and more packs in flight per thread as the shard
        grows: 1 up to 256 KiB per shard, 2 up to 2 MiB, then 4 (8 on 2 GPUs was not measured).
        """
        if algo == "flat":
            threads, unroll = (512 if self._block is None else min(1024, 32 * self._warps)), 1
        else:
            shard_bytes = elements * element_size
            threads = cuda_dda.max_tree_threads()
            unroll = min(1 if shard_bytes <= 256 << 10 else 2 if shard_bytes <= 2 << 20 else 4,
                         cuda_dda.max_unroll(self.world_size))
        return cuda_dda.grid(elements, element_size, threads, unroll, self._max_programs), threads, unroll

    # ------------------------------------------------------------------ fused all-reduce + residual + RMSNorm
    RMSNORM_ALGOS = ("auto", "oneshot", "twoshot", "nccl")

    def all_reduce_residual_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                    eps: float = 1e-6, algo: str = "auto", *, out: torch.Tensor | None = None,
                                    residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce ``x``, add ``residual``, RMSNorm: the tensor-parallel sync point of a Llama block.

        x: [..., hidden] this rank's partial sum (e.g. a row-parallel linear's output); contiguous
           fp32/fp16/bf16 on this rank's device, same shape and dtype on every rank. Not modified.
        residual: x's shape and dtype, contiguous, equal on every rank (the replicated residual
           stream). Not modified.
        weight: [hidden] RMSNorm weight, x's dtype, equal on every rank. Not modified.
        eps: RMSNorm epsilon (>= 0).
        algo: "oneshot" (every rank reduces every row, one barrier), "twoshot" (reduce-scatter by
           rows, in chunks over all SMs, norm, all-gather), "nccl" (dist.all_reduce + add + F.rms_norm), or "auto": two-shot
           from the measured crossover for this GPU and world size (thresholds.json), one-shot
           below; without one, one-shot where the all-reduce rules pick flat; nccl without peer memory.
        out, residual_out: optional contiguous buffers of x's shape and dtype (e.g. static buffers for
           CUDA graphs); each may be x or residual itself, but not overlap anything else.
        Returns (out, residual_out) with residual_out = residual + sum over ranks of x and
        out = residual_out * rsqrt(mean(residual_out**2, -1) + eps) * weight, fp32 math, in x's
        dtype; bitwise identical on every rank (ranks summed in rank order).
        """
        hidden = self._check_rmsnorm_args(x, residual, weight, eps, algo, out, residual_out)
        self._raise_if_failed()
        out = torch.empty_like(x) if out is None else out
        residual_out = torch.empty_like(x) if residual_out is None else residual_out
        if algo == "auto":
            nbytes = x.numel() * x.element_size()
            algo = "nccl" if self.memory is None else self._rmsnorm_auto(nbytes)
        if x.numel() == 0:
            return out, residual_out
        if algo == "nccl":
            total = x.clone()
            dist.all_reduce(total, group=self.group)
            torch.add(residual, total, out=residual_out)
            out.copy_(F.rms_norm(residual_out.float(), (hidden,), weight.float(), eps))
            return out, residual_out
        if self.memory is None:
            raise ShardkitError(f"all_reduce_residual_rmsnorm(algo={algo!r}) needs peer memory, which this group "
                                f"lacks: {self.fallback_reason}")
        mem = self.memory
        two_shot = algo == "twoshot"
        rows = [t.view(-1, hidden) for t in (x, residual, out, residual_out)]
        tokens = rows[0].shape[0]
        if two_shot:
            block_c, warps, programs = self._twoshot_shape(tokens, hidden)
        else:
            block_c, warps, programs = 0, self._warps or default_warps(hidden), self._max_programs
        step = max_rows(hidden, x.element_size(), mem.half_bytes, two_shot, block_c)
        if step == 0:
            raise ValueError(f"all_reduce_residual_rmsnorm: one row of x ({hidden} x {x.dtype}) does not fit the "
                             f"workspace half ({mem.half_bytes} bytes): use a larger half_bytes or algo='nccl'")
        for lo in range(0, tokens, step):
            xc, rc, oc, roc = (t[lo:lo + step] for t in rows)
            n = xc.shape[0]
            busy = -(-n // self.world_size) * -(-hidden // block_c) if two_shot else n  # work items
            sig = rmsnorm_signature(two_shot, n, hidden, _DTYPE_CODE[x.dtype], block_c)
            launch_all_reduce_rmsnorm(xc, rc, weight, oc, roc, mem.table, mem.status_addr, self.rank,
                                      self.world_size, sig, eps, mem.half_bytes, self._timeout_iters, two_shot,
                                      programs=min(programs, busy), num_warps=warps, block_c=block_c)
        if self.backend == "cpu":
            self._raise_if_failed()
        return out, residual_out

    def _rmsnorm_auto(self, nbytes: int) -> str:
        """one-shot or two-shot for x of ``nbytes``: the measured crossover of the fused kernels on
        this GPU and world size, else the all-reduce rule (flat -> one-shot)."""
        if self._rmsnorm_twoshot_min_bytes is None:
            return "oneshot" if thresholds.choose(self.rules, nbytes) == "flat" else "twoshot"
        return "twoshot" if nbytes >= self._rmsnorm_twoshot_min_bytes else "oneshot"

    def _twoshot_shape(self, tokens: int, hidden: int) -> tuple[int, int, int]:
        """(BLOCK_C, warps, most programs) of the two-shot fused kernel for [tokens, hidden].

        GPU: about one chunk of a row per SM (``chunk_columns``). Interpreter: one program, since a
        program waits for the other chunks of its row and interpreted programs run one after
        another; chunks of 32 columns, so that the CPU tests cover rows split into chunks.
        """
        if self.backend == "cpu":
            return 32, 1, 1
        rows_per_rank = -(-tokens // self.world_size)
        block_c = chunk_columns(hidden, rows_per_rank, self._max_programs)
        return block_c, chunk_warps(block_c), self._max_programs

    def _check_rmsnorm_args(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            algo: str, out: torch.Tensor | None, residual_out: torch.Tensor | None) -> int:
        """Raise a TypeError/ValueError naming the bad argument; returns hidden."""
        what = "all_reduce_residual_rmsnorm"
        for t, name in ((x, "x"), (residual, "residual"), (weight, "weight")):
            self._validate(t, name)
        if x.dim() == 0:
            raise ValueError(f"{what}: x must be [..., hidden], got a 0-d tensor")
        hidden = x.shape[-1]
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"{what}: residual must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                             f"got {tuple(residual.shape)} and {residual.dtype}")
        if weight.shape != (hidden,) or weight.dtype != x.dtype:
            raise ValueError(f"{what}: weight must be [hidden] = [{hidden}] of x's dtype {x.dtype}, "
                             f"got {tuple(weight.shape)} and {weight.dtype}")
        if hidden > MAX_HIDDEN:
            raise ValueError(f"{what}: hidden size {hidden} exceeds the supported {MAX_HIDDEN}")
        if not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
            raise ValueError(f"{what}: eps must be a finite number >= 0, got {eps!r}")
        if algo not in self.RMSNORM_ALGOS:
            raise ValueError(f"{what}: algo must be one of {self.RMSNORM_ALGOS}, got {algo!r}")
        for t, name in ((out, "out"), (residual_out, "residual_out")):
            if t is not None:
                self._validate(t, name)
                if t.shape != x.shape or t.dtype != x.dtype:
                    raise ValueError(f"{what}: {name} must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                                     f"got {tuple(t.shape)} and {t.dtype}")
        if out is not None and residual_out is not None and out.data_ptr() == residual_out.data_ptr():
            raise ValueError(f"{what}: out and residual_out must be different buffers")
        return hidden
