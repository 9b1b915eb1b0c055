"""Shared benchmark plumbing: environment header, GPU-correct timing, fitting one threshold, worlds."""
from __future__ import annotations

import datetime
import os
import platform
from typing import Callable

import torch
import torch.distributed as dist


def environment() -> dict:
    """GPU name/count, NVLink topology, driver and library versions (what a reader needs to trust a number)."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
        try:
            env["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:
            pass
        env.update(_nvml_topology())
    else:
        env["gpu"] = "cpu (Triton interpreter)"
        env["gpu_count"] = 0
    return env


def _nvml_topology() -> dict:
    try:
        import pynvml
    except ImportError:
        return {"topology": "pynvml missing"}
    try:
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        driver = pynvml.nvmlSystemGetDriverVersion()
        links = []
        for h in handles[:1]:
            active = 0
            for link in range(18):
                try:
                    active += pynvml.nvmlDeviceGetNvLinkState(h, link) == pynvml.NVML_FEATURE_ENABLED
                except pynvml.NVMLError:
                    break
            links.append(active)
        p2p = []
        for i in range(n):
            row = []
            for j in range(n):
                if i == j:
                    row.append("X")
                    continue
                st = pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                row.append("NV" if st == pynvml.NVML_P2P_STATUS_OK else "--")
            p2p.append(" ".join(row))
        return {"driver": driver if isinstance(driver, str) else driver.decode(),
                "nvlinks_gpu0": links[0] if links else 0, "p2p_nvlink": p2p}
    except Exception as e:  # NVML missing on this machine: the header says so, the run goes on
        return {"topology": f"nvml unavailable: {e}"}


def header_lines(env: dict) -> list[str]:
    lines = [f"GPU: {env.get('gpu')} x{env.get('gpu_count')}  driver {env.get('driver', '-')}  "
             f"CUDA {env.get('cuda', '-')}  NCCL {env.get('nccl', '-')}",
             f"torch {env['torch']}  triton {env.get('triton', '-')}  python {env['python']}  host {env['host']}"]
    if "p2p_nvlink" in env:
        lines.append(f"NVLink: {env['nvlinks_gpu0']} active links on GPU0; P2P over NVLink: "
                     + " | ".join(env["p2p_nvlink"]))
    return lines


def capture_graph(fn: Callable[[], None], calls: int) -> torch.cuda.CUDAGraph:
    """``calls`` calls of ``fn`` captured in one CUDA graph (after a warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def time_cuda(fn: Callable[[], None], iters: int, reps: int, graph: bool, sync: Callable[[], None]) -> list[float]:
    """Microseconds per call of ``fn`` for each of ``reps`` repetitions of ``iters`` calls.

    graph=True captures the ``iters`` calls in one CUDA graph and times its replays (launch cost
    gone, as in an inference engine); otherwise the calls are launched eagerly. CUDA events around
    each repetition; ``sync`` lines the ranks up before each one.
    """
    if graph:
        run = capture_graph(fn, iters).replay
    else:
        def run() -> None:
            for _ in range(iters):
                fn()
    run()
    torch.cuda.synchronize()
    out = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        sync()
        start.record()
        run()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1000.0 / iters)
    return out


def time_host(fn: Callable[[], None], iters: int, reps: int, sync: Callable[[], None]) -> list[float]:
    """Wall-clock microseconds per call (CPU runs)."""
    import time
    fn()
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - t0) * 1e6 / iters)
    return out


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def best_cut(rows: list[dict], key: str, low: str, high: str) -> tuple[list, int]:
    """Fit one rule, "variant ``low`` below a threshold of ``key``, ``high`` from it on", to measurements.

    rows: dicts with ``key`` and the two variants' times under the names ``low`` and ``high``. Every
    cut between two distinct sorted key values is scored by the summed relative loss
    ``chosen / best - 1`` over the rows; returns (the distinct key values, sorted; how many of them go
    to ``low``), ties to fewer. One noisy point does not drag the threshold to an end, as "the first
    value where ``high`` wins" would.
    """
    values = sorted({r[key] for r in rows})

    def loss(cut: int) -> float:
        return sum((r[low] if values.index(r[key]) < cut else r[high]) / min(r[low], r[high]) - 1 for r in rows)

    return values, min(range(len(values) + 1), key=lambda c: (loss(c), c))


def run_distributed(rank_fn: Callable, args, report: Callable) -> None:
    """Run ``rank_fn(args)`` on every rank and ``report(args, env, records, world, functional)`` with
    rank 0's ``(env, records)``: under torchrun on GPUs (NCCL), or, with ``args.cpu_world`` > 0, on a
    CPU world of that many processes running the Triton kernels in the interpreter (gloo)."""
    import sys

    if args.cpu_world > 0:
        os.environ["TRITON_INTERPRET"] = "1"
        from shardkit.testing import ProcessWorld
        print(f"No GPU: functional run of the Triton kernels in the interpreter on {args.cpu_world} CPU processes.",
              file=sys.stderr)
        world = ProcessWorld(args.cpu_world, "gloo")
        try:
            env, records = world.run(rank_fn, args, timeout=3600)[0]
        finally:
            world.close()
        report(args, env, records, args.cpu_world, functional=True)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    result = rank_fn(args)
    if dist.get_rank() == 0:
        env, records = result
        report(args, env, records, dist.get_world_size(), functional=False)
    dist.destroy_process_group()


def budget_spent(t0: float, budget_s: float, device: torch.device) -> bool:
    """Whether ``budget_s`` seconds have passed since ``t0`` (time.monotonic) on rank 0: rank 0
    decides and broadcasts, since every rank must take the same decision or the collectives diverge."""
    import time
    flag = torch.tensor([time.monotonic() - t0 > budget_s], dtype=torch.int32, device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())

