"""torch.library custom ops (``torch.ops.shardkit.*``); importing this package registers them."""
from .all_reduce import all_reduce, all_reduce_

__all__ = ["all_reduce", "all_reduce_"]
