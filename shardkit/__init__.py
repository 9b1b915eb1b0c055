"""shardkit: Triton kernels and peer-memory collectives for parallel LLM inference on NVLink GPUs."""
from .collectives.communicator import Communicator
from .errors import CollectiveError, ShardkitError
from .memory import PeerMemory
from . import ops  # registers torch.ops.shardkit.*

__all__ = ["Communicator", "PeerMemory", "CollectiveError", "ShardkitError"]
__version__ = "0.1.0"
