"""pytest-benchmark: shardkit all-reduce (flat, tree, auto) vs NCCL and torch symm_mem, per size.

    torchrun --standalone --nproc-per-node=4 -m pytest bench/test_all_reduce_benchmark.py \
        --benchmark-group-by=group [--records-out DIR]
Groups are "all_reduce <size> bf16", so each group's table puts shardkit next to NCCL. Results are
verified against NCCL first. Records: bench "pytest_all_reduce" (table
``pytest_all_reduce_<card>_x<world>.md``).
"""
import pytest
import torch
import torch.distributed as dist

from bench.all_reduce_sweep import symm_mem_algos
from bench.conftest import graph_of, keep, run_pedantic
from bench.report import human

SIZES = [4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]
ALGOS = ["nccl", "flat", "tree", "auto", "symm_1shot", "symm_2shot"]


@pytest.fixture(scope="module")
def comm(process_group):
    import shardkit

    c = shardkit.Communicator(process_group)
    yield c
    c.close()


@pytest.mark.parametrize("nbytes", SIZES, ids=human)
@pytest.mark.parametrize("algo", ALGOS)
def test_all_reduce(benchmark, comm, algo, nbytes):
    benchmark.group = f"all_reduce {human(nbytes)} bf16 x{comm.world_size}"
    x = torch.randn(nbytes // 2, generator=torch.Generator().manual_seed(comm.rank)).to(torch.bfloat16).cuda()
    ref = x.clone()
    dist.all_reduce(ref)
    if algo == "nccl":
        scratch = x.clone()
        fn, got = (lambda: dist.all_reduce(scratch)), None
    elif algo in ("flat", "tree", "auto"):
        got = torch.empty_like(x)
        fn = lambda: comm.all_reduce(x, algo=algo, out=got)  # noqa: E731
    else:
        make = symm_mem_algos(dist.group.WORLD.group_name).get(algo)
        fn, got = make(x) if make else (None, None)
        if fn is None:
            pytest.skip(f"{algo} not available in this torch")
    if got is not None:
        fn()
        torch.cuda.synchronize()
        rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < 1e-2, f"{algo} differs from NCCL (relative error {rel:.3g})"
    us = run_pedantic(benchmark, graph_of(fn))
    impl = f"{algo}_{comm.kernels}" if algo in ("flat", "tree", "auto") else algo
    keep("pytest_all_reduce", impl, {"bytes": nbytes}, us, world=comm.world_size)
