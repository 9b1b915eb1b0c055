"""The C++ host path of ``Communicator.all_reduce`` on the CUDA kernels (``shardkit._C``, csrc/torch).

One C++ call does what ``Communicator._run`` / ``_launch`` do in Python for algo flat / tree / ll / auto
(and what ``Communicator.all_reduce_residual_rmsnorm`` does for its CUDA LL kernel, algo ll / auto):
argument checks (the same messages), the choice of ``auto``, zero-copy detection, chunking, the launch
policy (csrc/dda/policy.h, the one the Python path calls too), the call fingerprint (``layout.h``'s
twin of ``protocol.call_signature``), the launch on torch's current stream and its error check. The
calls are the Python path's, launch for launch and fingerprint for fingerprint, so ranks may even mix
the two paths. What it does not handle (nccl, copy, explicit configs, a failed communicator) it hands
back (None) to the Python path.

Built by setup.py beside ``_dda.so`` where nvcc and torch are present; without it the Python path runs.
"""
from __future__ import annotations

import torch

from ..errors import ShardkitError
from ..kernels.all_reduce.rmsnorm import MAX_HIDDEN
from ..memory.protocol import OP_CODES

try:
    from .. import _C
    IMPORT_ERROR: str | None = None
    built_for = getattr(_C, "torch_version", None)
    if built_for != torch.__version__:  # an editable install's build for another venv's torch
        IMPORT_ERROR = (f"shardkit._C was built for torch {built_for}, this is torch {torch.__version__}: "
                        f"pip install --no-build-isolation -e . again")
        _C = None
except ImportError as e:  # not built (no nvcc), or built against another torch
    _C = None
    IMPORT_ERROR = str(e)

HOST_PATHS = ("auto", "cpp", "python")


def available() -> bool:
    """True when the torch binding was built and loads."""
    return _C is not None


def make_host(memory, rank: int, world: int, device, timeout_iters: int, sm_count: int, rules: list,
              rmsnorm_ll_max_bytes: dict[str, int | None] | None = None):
    """The C++ state of one communicator: its workspaces, error record, timeout, policy inputs,
    ``auto`` rules (``[(max_bytes or None, algo)]``) and the fused op's measured LL rules per mode
    (``{"graph": bytes, "eager": bytes}``, ``thresholds.rmsnorm_ll_max_bytes``; a mode missing or None:
    ``auto`` leaves the fused op to the Python path in that mode; the C++ call asks CUDA whether the stream
    is being captured).
    ``device``: this rank's CUDA device (a CPU device gives an object whose checks and plans work but
    that launches nothing: tests)."""
    limits = {mode: -1 if (rmsnorm_ll_max_bytes or {}).get(mode) is None else int(rmsnorm_ll_max_bytes[mode])
              for mode in ("graph", "eager")}
    return _C.AllReduceHost(
        rank=rank, world=world, device_index=-1 if device.type == "cpu" else device.index, device_text=str(device),
        table=memory.table.tolist(), workspace=memory.buffer.data_ptr(), staging_offset=memory.staging_offset,
        error_record=memory.error_record_addr,
        buffer_bytes=memory.buffer_bytes, timeout_iters=timeout_iters, sm_count=sm_count,
        rules=[(-1 if max_bytes is None else int(max_bytes), algo) for max_bytes, algo in rules],
        flat_op=OP_CODES["all_reduce_flat_cuda"], tree_op=OP_CODES["all_reduce_tree_cuda"],
        ll_op=OP_CODES["all_reduce_ll_cuda"], error_type=ShardkitError, rmsnorm_ll_op=OP_CODES["rmsnorm_ll_cuda"],
        rmsnorm_ll_max_bytes=limits["graph"], rmsnorm_ll_eager_max_bytes=limits["eager"], max_hidden=MAX_HIDDEN)
