"""The C++ host path of the all-reduce (shardkit._C, csrc/torch) without a GPU: it is built wherever the
CUDA library is (CI has nvcc: a binding that does not compile or load fails here), its launch policy and
fingerprint are the Python path's, it plans exactly the launches the Python path makes (chunks, zero
copy, alignment, fingerprints), and bad arguments raise errors naming them. Its launches run in
test_host_path_gpu.py."""
import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch

from shardkit import thresholds
from shardkit.collectives import host_path
from shardkit.kernels.all_reduce import cuda as cuda_dda
from shardkit.kernels.all_reduce.tree import shard_elements
from shardkit.memory import protocol

from . import host_checks
from .rank_checks import error_messages

pytestmark = pytest.mark.skipif(not cuda_dda.available(), reason="the CUDA library was not built (no nvcc)")

SM = 132
BUFFER = 64 << 10
RULES = [(1 << 10, "ll"), (4 << 10, "flat"), (256 << 10, "tree"), (None, "nccl")]
SIZES = [0, 1, 7, 15, 16, 17, 255, 1000, 4099, 65_541, 1 << 20, 3_000_017, 1 << 24, (1 << 28) + 3]


def test_binding_is_built_where_the_kernels_are():
    assert host_path.available(), f"shardkit._C did not load: {host_path.IMPORT_ERROR}"


def test_launch_policy_is_the_one_python_uses():
    """Python's cuda.flat_config / tree_config call csrc/dda/policy.h through _dda.so, the binding
    calls it directly: the two builds must agree, and both must follow the measured rules."""
    for sm in (1, 16, SM, 300):
        for esize in (2, 4):
            vec = 16 // esize
            for n in SIZES:
                flat = host_path._C.flat_config(n, esize, sm)
                assert flat == dataclasses.astuple(cuda_dda.flat_config(n, esize, sm)), (n, esize, sm)
                assert flat == (max(1, min(sm, protocol.MAX_PROGRAMS, -(-n // (512 * vec)))), 512, 1)
                ll = host_path._C.ll_config(n, esize, sm)
                assert ll == dataclasses.astuple(cuda_dda.ll_config(n, esize, sm)), (n, esize, sm)
                assert ll == (max(1, min(sm, protocol.MAX_PROGRAMS, -(-n * esize // (8 * 512)))), 512, 1)
                for world in range(2, protocol.MAX_WORLD + 1):
                    shard = shard_elements(n, world)
                    assert host_path._C.shard_elements(n, world) == shard
                    tree = host_path._C.tree_config(shard, esize, world, sm)
                    assert tree == dataclasses.astuple(cuda_dda.tree_config(shard, esize, world, sm))
                    nbytes = shard * esize
                    unroll = min(1 if nbytes <= 256 << 10 else 2 if nbytes <= 2 << 20 else 4, cuda_dda.max_unroll(world))
                    programs = max(1, min(sm, protocol.MAX_PROGRAMS, -(-shard // (256 * vec * unroll))))
                    assert tree == (programs, 256, unroll), (n, esize, world, sm)


def test_call_signature_is_the_protocols():
    gen = random.Random(0)
    for op, code in protocol.OP_CODES.items():
        for count in range(12):
            fields = [gen.choice([0, 1, -1, gen.randrange(-2**63, 2**63), gen.randrange(1 << 40)]) for _ in range(count)]
            assert host_path._C.call_signature(code, fields) == protocol.call_signature(op, *fields), (op, fields)


def fake_memory(world: int) -> SimpleNamespace:
    """PeerMemory's fields that the host path reads, over plain CPU memory (nothing is launched)."""
    buffer = torch.zeros(protocol.staging_offset() + BUFFER + 4096, dtype=torch.uint8)
    record = torch.zeros(4, dtype=torch.int32)
    return SimpleNamespace(buffer=buffer, record=record, error_record_addr=record.data_ptr(), buffer_bytes=BUFFER,
                           staging_offset=protocol.staging_offset(),
                           table=torch.tensor([buffer.data_ptr() + (r << 20) for r in range(world)]))


def python_plan(mem: SimpleNamespace, world: int, x: torch.Tensor, out: torch.Tensor, algo: str) -> list[dict] | None:
    """The launches of Communicator._run / _launch on the CUDA kernels, written out in Python."""
    nbytes, esize, total = x.numel() * x.element_size(), x.element_size(), x.numel()
    algo = thresholds.choose(RULES, nbytes) if algo == "auto" else algo
    if algo not in ("flat", "tree", "ll"):
        return None
    offset = x.data_ptr() - mem.buffer.data_ptr()
    held = mem.staging_offset <= offset and offset + nbytes <= mem.staging_offset + BUFFER
    zero_copy = held and offset % 16 == 0 and not (algo == "flat" and out.data_ptr() == x.data_ptr()) and algo != "ll"
    capacity = protocol.LL_MAX_BYTES if algo == "ll" else BUFFER
    step = total if zero_copy or nbytes <= capacity else capacity // esize
    chunks = -(-total // step) if total else 0
    plan = []
    for i in range(chunks):
        lo, n = i * step, min(step, total - i * step)
        shard = shard_elements(n, world) if algo == "tree" else 0
        config = dataclasses.astuple(cuda_dda.tree_config(shard, esize, world, SM) if algo == "tree"
                                     else cuda_dda.ll_config(n, esize, SM) if algo == "ll"
                                     else cuda_dda.flat_config(n, esize, SM))
        packed = algo == "ll" or ((x.data_ptr() + lo * esize) % 16 == 0 and (out.data_ptr() + lo * esize) % 16 == 0
                                  and n % (16 // esize) == 0)
        sig = protocol.call_signature(f"all_reduce_{algo}_cuda", total, i, chunks, n, protocol.DTYPE_CODES[x.dtype],
                                      offset if zero_copy else -1, packed, *config)
        plan.append(dict(algo=algo, lo=lo, numel=n, shard=shard, zero_copy=zero_copy,
                         x_offset=offset if zero_copy else 0, packed=packed, sig=sig, config=config))
    return plan


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plans_the_python_paths_launches(world, dtype):
    mem = fake_memory(world)
    host = host_path.make_host(mem, 0, world, torch.device("cpu"), 1000, SM, RULES)
    esize = dtype.itemsize
    staging = mem.buffer[mem.staging_offset:]
    cases = []
    for n in (0, 1, 7, 1000, 4099, BUFFER // esize, BUFFER // esize + 1, 3 * BUFFER // esize + 5, 300_007):
        x = torch.randn(n).to(dtype)
        cases += [(x, None), (x, torch.empty_like(x)), (x, x)]
        cases.append((torch.randn(n + 1).to(dtype)[1:], None))  # unaligned input: the element path
    for lo, n in ((0, 1000), (esize, 1000), (64, BUFFER // esize - 32), (0, BUFFER // esize + 1)):
        if lo + n * esize <= len(staging):
            x = staging[lo:lo + n * esize].view(dtype)  # in the staging area: zero copy where aligned
            cases += [(x, None), (x, x)]
    for x, out in cases:
        for algo in ("flat", "tree", "ll", "auto", "nccl", "copy", "no-such-algo"):
            got = host.plan(x, out, algo)
            want = python_plan(mem, world, x, torch.empty_like(x) if out is None else out, algo)
            if want is None:
                assert got is None, (algo, x.numel())
            else:
                assert [dict(g, config=tuple(g["config"])) for g in got] == want, (algo, x.numel(), out is x)


def test_a_failed_communicator_goes_to_the_python_path():
    mem = fake_memory(2)
    host = host_path.make_host(mem, 1, 2, torch.device("cpu"), 1000, SM, RULES)
    x = torch.randn(100)
    assert host.plan(x, None, "flat") is not None
    mem.record[0] = protocol.MISMATCH  # the Python path raises the error record's message
    assert host.plan(x, None, "flat") is None and host.all_reduce(x, None, "flat") is None


def test_bad_arguments_raise_naming_them():
    mem = fake_memory(2)
    host = host_path.make_host(mem, 0, 2, torch.device("cpu"), 1000, SM, RULES)
    x = torch.randn(12, 5)
    flat = torch.randn(61)
    messages = error_messages([
        lambda: host.all_reduce([1.0], None, "flat"),
        lambda: host.all_reduce(x.int(), None, "flat"),
        lambda: host.all_reduce(x.t(), None, "flat"),
        lambda: host.all_reduce(torch.randn(3, device="meta"), None, "flat"),
        lambda: host.all_reduce(x, 3, "flat"),
        lambda: host.all_reduce(x, torch.empty(5, 12), "flat"),
        lambda: host.all_reduce(x, torch.empty_like(x, dtype=torch.float16), "flat"),
        lambda: host.all_reduce(x, torch.empty(5, 12).t(), "flat"),
        lambda: host.all_reduce(flat[:60], flat[1:], "flat"),
    ])
    assert messages == [
        "all_reduce: x must be a torch.Tensor, got list",
        "all_reduce: x must be float32, float16 or bfloat16, got torch.int32",
        "all_reduce: x must be contiguous (call .contiguous() first)",
        "all_reduce: x must be on cpu (this rank's device), got meta",
        "all_reduce: out must be a torch.Tensor, got int",
        "all_reduce: out must have x's shape (12, 5) and dtype torch.float32, got (5, 12) and torch.float32",
        "all_reduce: out must have x's shape (12, 5) and dtype torch.float32, got (12, 5) and torch.float16",
        "all_reduce: out must be contiguous (call .contiguous() first)",
        "all_reduce: out overlaps x partly: pass x itself (in place) or a separate buffer",
    ]
    with pytest.raises(ValueError, match="made for the CPU"):  # valid, but a CPU host launches nothing
        host.all_reduce(x, None, "flat")


def test_communicator_host_path_argument(worlds):
    """host_path='cpp' needs the CUDA kernels (a gloo group runs Triton): a clear error, on every rank."""
    for text in worlds(2).run(host_checks.host_path_errors):
        assert text == ["Communicator: host_path must be one of ('auto', 'cpp', 'python'), got 'c++'",
                        "Communicator(host_path='cpp') needs the CUDA kernels and the torch binding (shardkit._C: "
                        "kernels are triton)"], text
