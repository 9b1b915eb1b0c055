"""torch.library custom ops (``torch.ops.shardkit.*``); importing this package registers them.

all_reduce, all_reduce_ (in place), all_reduce_residual_rmsnorm: the Communicator registered for the
process group named ``group_name``; attention_chunk, merge_attention: the local attention kernels.
"""
from .all_reduce import all_reduce, all_reduce_, all_reduce_residual_rmsnorm
from .attention import attention_chunk, merge_attention
from . import moe  # noqa: F401  (registers shardkit::moe_dispatch, shardkit::moe_combine)

__all__ = ["all_reduce", "all_reduce_", "all_reduce_residual_rmsnorm", "attention_chunk", "merge_attention"]
