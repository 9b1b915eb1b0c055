"""The C++ host path of the LL fused all-reduce + residual + RMSNorm (shardkit._C's
AllReduceHost.all_reduce_residual_rmsnorm) without a GPU: its launch policy is the one Python calls
(csrc/dda/policy.h), it plans exactly the launches of Communicator._rmsnorm_ll (row chunks, fingerprints) for
algo "ll" and for "auto" under the measured LL rule of the mode (graph capture or eager), hands everything else to the Python path, and raises the
Python path's messages for bad arguments. Its launches run in test_all_reduce_rmsnorm_ll_gpu.py."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from shardkit import Communicator
from shardkit.collectives import host_path
from shardkit.collectives.checks import check_tensor
from shardkit.kernels.all_reduce import cuda as cuda_dda
from shardkit.memory import protocol

from .rank_checks import error_messages
from .test_host_path import RULES, SM, fake_memory

pytestmark = pytest.mark.skipif(not host_path.available(), reason="the torch binding was not built (no nvcc)")

LL_MAX = {"graph": 64 << 10, "eager": 1 << 20}  # the measured rules the tests pretend: auto picks ll up to these


def policy(tokens: int, hidden: int, esize: int, sm: int) -> tuple[int, int, int]:
    """policy.h's ll_rmsnorm_config written out: S blocks per row (a power of two <= 8, tokens * S <= the SMs,
    >= 256 lines per block), one thread per line of a block's range, 64..512 threads."""
    lines = -(-hidden * esize // 8)
    blocks = min(sm, protocol.MAX_PROGRAMS)
    segments = 1
    while segments < 8 and tokens * segments * 2 <= blocks and lines >= segments * 2 * 256:
        segments *= 2
    programs = tokens * segments if segments > 1 else max(1, min(tokens, blocks))
    return programs, min(512, max(64, -(-(-(-lines // segments)) // 32) * 32)), 1


def test_launch_policy_is_the_one_python_uses():
    for sm in (1, 16, SM):
        for esize in (2, 4):
            for hidden in (1, 3, 100, 1001, 4096, 4099, 8192, 8193, 16384, 32768, 32769 * 4):
                lines = -(-hidden * esize // 8)
                rows = host_path._C.ll_rmsnorm_max_rows(hidden, esize)
                assert rows == cuda_dda.ll_rmsnorm_max_rows(hidden, esize)
                assert rows == (0 if lines * 8 > protocol.LL_MAX_BYTES else protocol.LL_MAX_BYTES // 8 // lines), \
                    (hidden, esize)
                for tokens in (1, 5, 16, 300):
                    config = host_path._C.ll_rmsnorm_config(tokens, hidden, esize, sm)
                    assert config == dataclasses.astuple(cuda_dda.ll_rmsnorm_config(tokens, hidden, esize, sm))
                    assert config == policy(tokens, hidden, esize, sm), (tokens, hidden, esize, sm)
                    segments = config[0] // tokens if config[0] > tokens else 1  # the policy's grid, rebuilt
                    assert dataclasses.astuple(cuda_dda.ll_rmsnorm_grid(tokens, hidden, esize, sm, segments)) == config
    # The decode shapes of issue 14 on an H200 (132 SMs): 8 blocks per row of 8192 bf16 up to 16 rows.
    assert [host_path._C.ll_rmsnorm_config(t, 8192, 2, 132)[:2] for t in (1, 4, 16)] == [(8, 256), (32, 256),
                                                                                         (128, 256)]
    assert host_path._C.ll_rmsnorm_max_rows(16384, 2) == 8 and host_path._C.ll_rmsnorm_max_rows(32768, 4) == 2


def python_plan(x: torch.Tensor, eps: float) -> list[dict]:
    """Communicator._rmsnorm_ll's launches, written out in Python."""
    hidden = x.shape[-1]
    tokens, esize = x.numel() // hidden, x.element_size()
    step = cuda_dda.ll_rmsnorm_max_rows(hidden, esize)
    chunks = -(-tokens // step)
    plan = []
    for i in range(chunks):
        rows = min(step, tokens - i * step)
        config = cuda_dda.ll_rmsnorm_config(rows, hidden, esize, SM)
        sig = protocol.call_signature("rmsnorm_ll_cuda", tokens, i, chunks, rows, hidden, protocol.DTYPE_CODES[x.dtype],
                                      protocol.float_bits(eps), config.programs, config.threads)
        plan.append(dict(lo=i * step, rows=rows, sig=sig, config=dataclasses.astuple(config)))
    return plan


def make_host(rmsnorm_ll_max_bytes=LL_MAX):
    mem = fake_memory(2)
    return mem, host_path.make_host(mem, 0, 2, torch.device("cpu"), 1000, SM, RULES, rmsnorm_ll_max_bytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plans_the_python_paths_launches(dtype):
    mem, host = make_host()
    for shape in ((1, 8192), (16, 8192), (17, 8192), (64, 8192), (2, 3, 1001), (33, 4100), (1, 1), (300, 96),
                  (3, 16384), (9, 16384), (1, 32768)):
        x = torch.randn(shape).to(dtype)
        r, w = torch.randn(shape).to(dtype), torch.randn(shape[-1]).to(dtype)
        for eps in (1e-6, 1e-5, 0, 1):  # every hidden up to MAX_HIDDEN fits an LL slot: no row is too wide
            got = host.plan_rmsnorm(x, r, w, eps, "ll", None, None)
            want = python_plan(x, eps)
            assert [dict(g, config=tuple(g["config"])) for g in got] == want, (shape, dtype, eps)
            for mode, limit in LL_MAX.items():  # chunked calls too, where the mode's rule takes them
                auto = host.plan_rmsnorm(x, r, w, eps, "auto", x, r, capturing=mode == "graph")
                fits = x.numel() * x.element_size() <= limit
                assert (auto is None) != fits, (shape, dtype, mode)
                if fits:
                    assert [dict(g, config=tuple(g["config"])) for g in auto] == want
    x, r, w = torch.randn(4, 96), torch.randn(4, 96), torch.randn(96)
    for algo in ("flat", "tree", "nccl", "no-such-algo"):
        assert host.plan_rmsnorm(x, r, w, 1e-6, algo, None, None) is None, algo
    assert host.plan_rmsnorm(x[:0], r[:0], w, 1e-6, "ll", None, None) is None  # empty: the Python path
    assert make_host(None)[1].plan_rmsnorm(x, r, w, 1e-6, "auto", None, None) is None  # no measured rule
    graph_mem, graph_only = make_host({"graph": 1 << 20})  # a rule for one mode only (graph_mem: kept alive)
    assert graph_only.plan_rmsnorm(x, r, w, 1e-6, "auto", None, None) is None
    assert graph_only.plan_rmsnorm(x, r, w, 1e-6, "auto", None, None, capturing=True) is not None
    assert not host.capturing()  # a CPU host never captures
    mem.record[0] = protocol.TIMEOUT  # a failed communicator: the Python path raises the record's message
    assert host.plan_rmsnorm(x, r, w, 1e-6, "ll", None, None) is None


def test_bad_arguments_raise_the_python_paths_messages():
    _, host = make_host()
    python = SimpleNamespace(_validate=lambda t, name: check_tensor(t, name, torch.device("cpu")),
                             RMSNORM_ALGOS=Communicator.RMSNORM_ALGOS)
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    flat = torch.randn(60)
    cases = [  # (x, residual, weight, eps, out, residual_out)
        ([1.0], r, w, 1e-6, None, None),
        (x.int(), r, w, 1e-6, None, None),
        (torch.randn(8, 3).t(), r, w, 1e-6, None, None),
        (x, "r", w, 1e-6, None, None),
        (x, r, torch.randn(8, device="meta"), 1e-6, None, None),
        (torch.tensor(1.0), torch.tensor(1.0), w, 1e-6, None, None),
        (x, r[:2], w, 1e-6, None, None),
        (x, r.half(), w, 1e-6, None, None),
        (x, r, torch.randn(9), 1e-6, None, None),
        (x, r, torch.randn(1, 8), 1e-6, None, None),
        (x, r, w.half(), 1e-6, None, None),
        (torch.randn(1, 40000), torch.randn(1, 40000), torch.randn(40000), 1e-6, None, None),
        (x, r, w, -1.0, None, None),
        (x, r, w, float("nan"), None, None),
        (x, r, w, float("inf"), None, None),
        (x, r, w, "1e-6", None, None),
        (x, r, w, None, None, None),
        (x, r, w, 1e-6, torch.empty(3, 9), None),
        (x, r, w, 1e-6, None, torch.empty(3, 8).t()),
        (x, r, w, 1e-6, None, torch.empty(3, 8, dtype=torch.float16)),
        (x, r, w, 1e-6, x, x),
        (x, r, w, 1e-6, flat[:24].view(3, 8), flat[20:44].view(3, 8)),
        (flat[:24].view(3, 8), r, w, 1e-6, flat[4:28].view(3, 8), None),
        (x, flat[:24].view(3, 8), w, 1e-6, None, flat[8:32].view(3, 8)),
        (x, r, flat[:8], 1e-6, flat[4:28].view(3, 8), None),
    ]
    for algo in ("ll", "auto"):
        for case in cases:
            args = case[:4]
            want = error_messages([lambda: Communicator._check_rmsnorm_args(python, *args, algo, *case[4:])])
            got = error_messages([lambda: host.plan_rmsnorm(*args, algo, *case[4:])])
            assert got == want, (algo, got, want)
    with pytest.raises(ValueError, match="made for the CPU"):  # valid, but a CPU host launches nothing
        host.all_reduce_residual_rmsnorm(x, r, w, 1e-6, "ll", None, None)
