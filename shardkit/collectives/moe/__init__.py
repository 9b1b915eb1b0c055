"""Expert-parallel MoE dispatch and combine (peer memory, or NCCL where peers cannot share memory)."""
from .config import MoeHandle
from .dispatcher import MoeDispatcher, get_dispatcher

__all__ = ["MoeDispatcher", "MoeHandle", "get_dispatcher"]
