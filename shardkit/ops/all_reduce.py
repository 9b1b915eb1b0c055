"""torch.ops.shardkit.all_reduce / all_reduce_ / all_reduce_residual_rmsnorm: the Communicator's
collectives as torch custom ops.

No autograd (inference ops). Fake implementations let torch.compile trace them; the real ones make
no host synchronisation and allocate nothing but their output, so they can be captured in CUDA graphs.
The communicator is looked up by the process group's name (``group.group_name``): create
``shardkit.Communicator(group)`` on every rank first.
"""
import torch

from ..collectives.communicator import get_communicator


@torch.library.custom_op("shardkit::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group_name: str, algo: str = "auto") -> torch.Tensor:
    """Sum of ``x`` over the ranks of the group; a new tensor of x's shape and dtype."""
    return get_communicator(group_name).all_reduce(x, algo=algo)


@all_reduce.register_fake
def _(x: torch.Tensor, group_name: str, algo: str = "auto") -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("shardkit::all_reduce_", mutates_args=("x",))
def all_reduce_(x: torch.Tensor, group_name: str, algo: str = "auto") -> None:
    """In-place sum of ``x`` over the ranks of the group."""
    get_communicator(group_name).all_reduce_(x, algo=algo)


@all_reduce_.register_fake
def _(x: torch.Tensor, group_name: str, algo: str = "auto") -> None:
    return None


@torch.library.custom_op("shardkit::all_reduce_residual_rmsnorm", mutates_args=())
def all_reduce_residual_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, group_name: str,
                                eps: float = 1e-6, algo: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(out, residual_out): residual_out = residual + sum of ``x`` over the ranks, out = its RMSNorm times
    ``weight``; both new tensors of x's shape and dtype (see Communicator.all_reduce_residual_rmsnorm)."""
    return get_communicator(group_name).all_reduce_residual_rmsnorm(x, residual, weight, eps=eps, algo=algo)


@all_reduce_residual_rmsnorm.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, group_name: str,
      eps: float = 1e-6, algo: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x)
