"""pytest-benchmark suites (run on demand, never in CI: CI collects tests/ only).

Collective benchmarks run under torchrun, one process per GPU:
    torchrun --standalone --nproc-per-node=4 -m pytest bench/test_all_reduce_benchmark.py \
        --benchmark-save=all_reduce --benchmark-group-by=group
Kernel benchmarks run on one GPU:
    python -m pytest bench/test_kernels_benchmark.py
Each benchmarked call replays a CUDA graph of CALLS captured calls and synchronises once, so the
per-round time divided by CALLS is a GPU time, not a Python launch time; rounds are fixed
(``pedantic``) so that every rank runs the same number of collectives. Only rank 0 saves results:
its records go to the store at the end of the session (bench/results/records.jsonl, or
``--records-out DIR``/records.jsonl) with the suites' tables (bench/report.py). The suites run only
on GPUs, so CPU sessions write nothing.
"""
import os

import pytest
import torch

from bench.common import capture_graph
from bench.records import record

CALLS = 50
RECORDS: list[dict] = []  # this session's store records, published by rank 0 at its end


def pytest_addoption(parser):
    parser.addoption("--records-out", default=None,
                     help="directory for records.jsonl and the tables (default: the store, bench/results)")


def graph_of(fn, calls: int = CALLS):
    """Capture ``calls`` calls of ``fn`` in one CUDA graph; returns a function that replays it and waits."""
    graph = capture_graph(fn, calls)

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()
    return replay


def run_pedantic(benchmark, replay, calls: int = CALLS, rounds: int = 30) -> list[float]:
    """Time ``rounds`` replays; returns the microseconds per call of each round."""
    benchmark.extra_info["calls_per_round"] = calls
    benchmark.pedantic(replay, rounds=rounds, warmup_rounds=3, iterations=1)
    benchmark.extra_info["us_per_call_median"] = benchmark.stats.stats.median * 1e6 / calls
    return [t * 1e6 / calls for t in benchmark.stats.stats.data]


def keep(bench: str, impl: str, params: dict, us: list[float], world: int = 1, metrics: dict | None = None) -> None:
    """Add a measurement (bf16, CUDA graph) to the records this session publishes."""
    RECORDS.append(record(bench, impl, gpu=torch.cuda.get_device_name(), world=world, dtype=torch.bfloat16,
                          mode="graph", params=params, us=us, metrics=metrics))


def pytest_sessionfinish(session):
    if RECORDS and int(os.environ.get("RANK", "0")) == 0:
        from bench.report import publish
        publish(RECORDS, session.config.getoption("--records-out"), on_gpu=True)


def pytest_configure(config):
    if int(os.environ.get("RANK", "0")) != 0:  # every rank runs the rounds; only rank 0 reports and saves
        for opt in ("benchmark_save", "benchmark_json", "benchmark_histogram"):
            if hasattr(config.option, opt):
                setattr(config.option, opt, None)
        if hasattr(config.option, "benchmark_autosave"):
            config.option.benchmark_autosave = False


@pytest.fixture(scope="session")
def process_group():
    """The torchrun process group (NCCL), or skip when not launched by torchrun on GPUs."""
    import torch.distributed as dist

    if "RANK" not in os.environ or not torch.cuda.is_available():
        pytest.skip("collective benchmarks run under torchrun on GPUs")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    yield dist.group.WORLD
    dist.barrier()
