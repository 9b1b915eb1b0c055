"""Device code of Sync-Point Drop blocks: the local (communication-free) residual + partial
attention + RMSNorm that feeds an SPD block's FFN."""
from .add_rmsnorm import add_rmsnorm

__all__ = ["add_rmsnorm"]
