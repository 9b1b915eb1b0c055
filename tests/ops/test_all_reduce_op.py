"""torch.ops.shardkit.all_reduce / all_reduce_: registered, traceable by torch.compile, correct."""
import torch
import torch.distributed as dist

from shardkit import Communicator
from shardkit.reference.all_reduce import all_reduce_reference, rank_inputs

from ..collectives.rank_checks import device


def ops_on_rank(n: int, seed: int) -> list[float]:
    import shardkit.ops  # noqa: F401  (registers the ops)

    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Communicator()
    name = dist.group.WORLD.group_name
    try:
        xs = rank_inputs(world, n, torch.float32, seed, device=device())
        ref = all_reduce_reference(xs)
        x = xs[rank]
        errors = []
        errors.append((torch.ops.shardkit.all_reduce(x, name, "flat").double() - ref).abs().max().item())
        y = x.clone()
        torch.ops.shardkit.all_reduce_(y, name, "tree")
        errors.append((y.double() - ref).abs().max().item())

        @torch.compile(fullgraph=True, backend="aot_eager")
        def block(t: torch.Tensor) -> torch.Tensor:
            return torch.ops.shardkit.all_reduce(t * 2.0, name, "auto") + 1.0

        errors.append((block(x).double() - (2 * ref + 1)).abs().max().item())
        return errors
    finally:
        comm.close()


def test_ops_match_reference_and_compile(worlds):
    for errors in worlds(2).run(ops_on_rank, 1001, 3):
        assert all(e < 1e-5 for e in errors), errors  # not max(): it skips a NaN that is not first


def test_fake_impl_gives_shape_and_dtype():
    import shardkit.ops  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5, dtype=torch.bfloat16)
        y = torch.ops.shardkit.all_reduce(x, "any-group", "auto")
        torch.ops.shardkit.all_reduce_(x, "any-group", "auto")
    assert y.shape == (3, 5) and y.dtype == torch.bfloat16
