"""torch.library custom ops (``torch.ops.shardkit.*``); importing this package registers them."""
from .all_reduce import all_reduce, all_reduce_
from . import attention  # noqa: F401  (registers shardkit::attention_chunk, shardkit::merge_attention)

__all__ = ["all_reduce", "all_reduce_"]
