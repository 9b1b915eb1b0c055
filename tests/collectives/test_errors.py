"""Bad input: clear errors on every rank, never a hang."""
import time

import pytest
import torch
import torch.distributed as dist

from shardkit import CollectiveError, Communicator, ShardkitError
from shardkit.testing import RankError

from . import rank_checks


def bad_local_inputs() -> list[str]:
    comm = Communicator()
    x = torch.arange(64, dtype=torch.float32)
    cases = [
        lambda: comm.all_reduce(x.to(torch.int32)),
        lambda: comm.all_reduce(torch.randn(8, 8).t()),
        lambda: comm.all_reduce(x.to("meta")),
        lambda: comm.all_reduce(x, out=torch.empty(65)),
        lambda: comm.all_reduce(x, out=torch.empty(64, dtype=torch.float16)),
        lambda: comm.all_reduce(x, algo="ring"),
        lambda: comm.staging_buffer((1 << 30,), torch.float32),
        lambda: Communicator(timeout_s=0),
    ]
    try:
        messages = rank_checks.error_messages(cases)
        # The failed calls must not have disturbed the communicator.
        torch.testing.assert_close(comm.all_reduce(x, algo="flat"), x * dist.get_world_size())
    finally:
        comm.close()
    return messages


def test_bad_local_inputs_raise_clear_errors(worlds):
    messages = worlds(2).run(bad_local_inputs)[0]
    expected = ["int32", "contiguous", "must be on cpu", "shape", "dtype", "algo must be one of",
                "staging", "timeout_s"]
    for text, message in zip(expected, messages):
        assert text in message, (text, message)


@pytest.mark.parametrize("kind", ["numel", "dtype"])
@pytest.mark.parametrize("algo", ["flat", "tree"])
def test_ranks_disagreeing_all_raise(worlds, kind, algo):
    messages = worlds(3).run(rank_checks.mismatched_call, kind, algo, timeout=120)
    for m in messages:
        assert "different element count, dtype" in m and "Create a new Communicator" in m, m


def timed_absent_peer(timeout_s: float) -> tuple[str, float, float]:
    """Rank 2 never calls; ranks 0 and 1 return the error and the wall and CPU seconds it took."""
    comm = Communicator(timeout_s=timeout_s)
    try:
        if dist.get_rank() == 2:
            return "", 0.0, 0.0
        wall, cpu = time.monotonic(), time.process_time()
        try:
            comm.all_reduce(torch.ones(100), algo="flat")
        except CollectiveError as e:
            return str(e), time.monotonic() - wall, time.process_time() - cpu
        raise AssertionError("a call without rank 2 returned")
    finally:
        dist.barrier()  # the absent rank must not tear down its memory while peers still write flags
        comm.close()


# The interpreter's barrier counts polls (timeout_s x an estimated 500 polls per second) instead of
# reading a clock, so its wait is CPU work: bounded in CPU seconds, which other load on the machine
# does not stretch (the wall-clock wait is that divided by the share of a CPU the rank gets).
TIMEOUT_S = 3.0
CPU_BOUNDS_S = (0.3 * TIMEOUT_S, 6 * TIMEOUT_S)  # measured: 8.6-8.9 s at a load average of 14 on 2 CPUs


def test_absent_peer_times_out_naming_it(worlds):
    results = worlds(3).run(timed_absent_peer, TIMEOUT_S, timeout=300)
    assert results[2] == ("", 0.0, 0.0)
    for message, wall_s, cpu_s in results[:2]:
        assert "rank(s) [2] did not arrive within 3 s" in message, message
        assert CPU_BOUNDS_S[0] <= cpu_s <= CPU_BOUNDS_S[1], (cpu_s, CPU_BOUNDS_S)
        assert wall_s >= CPU_BOUNDS_S[0], wall_s


def op_without_communicator() -> str:
    import shardkit.ops  # noqa: F401

    try:
        torch.ops.shardkit.all_reduce(torch.ones(4), "no-such-group")
    except Exception as e:  # torch may wrap the error raised inside a custom op
        return str(e)
    raise AssertionError("op ran without a communicator")


def test_op_without_communicator(worlds):
    for m in worlds(2).run(op_without_communicator):
        assert "no shardkit Communicator for process group 'no-such-group'" in m


def raise_after_peer_memory() -> None:
    from shardkit import PeerMemory

    mem = PeerMemory()
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails while holding peer memory")
    mem.close()


def test_failing_rank_leaks_no_segments(worlds):
    # The autouse fixture checks /dev/shm after the test.
    with pytest.raises(RankError) as info:
        worlds(2).run(raise_after_peer_memory)
    assert list(info.value.errors) == [1]


def calls_after_close() -> tuple[list[str], float]:
    """Every call on a closed communicator raises ShardkitError; a staging buffer handed out before
    close stays readable (it used to point at unmapped memory: a segfault)."""
    comm = Communicator()
    rank = dist.get_rank()
    staged = comm.staging_buffer((100,), torch.float32)
    staged.fill_(rank + 1)
    comm.close()
    comm.close()  # idempotent
    x, rows, weight = torch.ones(64), torch.ones(2, 32), torch.ones(32)
    cases = [lambda: comm.all_reduce(x), lambda: comm.all_reduce(x, algo="flat"),
             lambda: comm.all_reduce(x, algo="tree"), lambda: comm.all_reduce(x, algo="nccl"),
             lambda: comm.all_reduce_(x), lambda: comm.staging_buffer((4,), torch.float32), lambda: comm.check(),
             lambda: comm.all_reduce_residual_rmsnorm(rows, rows, weight),
             lambda: comm.all_reduce_residual_rmsnorm(rows, rows, weight, algo="nccl")]
    messages = []
    for i, case in enumerate(cases):
        try:
            case()
        except ShardkitError as e:
            messages.append(str(e))
        else:
            raise AssertionError(f"call {i} on a closed communicator succeeded")
    return messages, staged.sum().item()


def test_every_call_after_close_raises(worlds):
    for rank, (messages, staged_sum) in enumerate(worlds(2).run(calls_after_close)):
        assert len(messages) == 9
        for m in messages:
            assert "this Communicator is closed" in m, m
        assert staged_sum == 100.0 * (rank + 1)


def newer_communicator_closed_first() -> list[float]:
    """Closing one of two communicators of a group leaves the torch op on the other, in either order."""
    import shardkit.ops  # noqa: F401

    name = dist.group.WORLD.group_name
    x = torch.ones(10)
    sums = []
    for close_newer_first in (True, False):
        older, newer = Communicator(), Communicator()
        first, second = (newer, older) if close_newer_first else (older, newer)
        try:
            first.close()
            sums.append(torch.ops.shardkit.all_reduce(x, name, "flat").sum().item())
        finally:
            second.close()
        try:
            torch.ops.shardkit.all_reduce(x, name, "flat")
        except Exception as e:  # torch may wrap the error raised inside a custom op
            assert "no shardkit Communicator for process group" in str(e), e
        else:
            raise AssertionError("the op ran after every communicator was closed")
    return sums


def test_closing_one_of_two_communicators_keeps_the_op(worlds):
    for sums in worlds(2).run(newer_communicator_closed_first):
        assert sums == [20.0, 20.0]


def overlapping_outputs() -> list[str]:
    """out / residual_out partly overlapping an input (or each other, or weight) is refused; the
    same memory as x (another view of it) is an in-place call."""
    comm = Communicator()
    world = dist.get_world_size()
    try:
        flat = torch.arange(128, dtype=torch.float32)
        x = flat[:64]
        rows = torch.randn(96)  # x of the fused op and, shifted by half, an output
        r_x = rows[:64].view(2, 32)
        res_buf = torch.randn(96)
        residual = res_buf[:64].view(2, 32)
        w_buf = torch.rand(96) + 0.5
        weight = w_buf[:32]
        o_buf = torch.empty(96)
        fused = comm.all_reduce_residual_rmsnorm
        messages = rank_checks.error_messages([
            lambda: comm.all_reduce(x, out=flat[32:96]),
            lambda: comm.all_reduce(flat[1:65], out=x),
            lambda: fused(r_x, residual, weight, out=rows[32:].view(2, 32)),
            lambda: fused(r_x, residual, weight, residual_out=rows[32:].view(2, 32)),
            lambda: fused(r_x, residual, weight, residual_out=res_buf[32:].view(2, 32)),
            lambda: fused(r_x, residual, weight, out=w_buf[16:80].view(2, 32)),
            lambda: fused(r_x, residual, weight, out=o_buf[:64].view(2, 32), residual_out=o_buf[32:].view(2, 32)),
        ])
        # Refused calls leave the buffers alone, and another view of x's memory is in place.
        assert torch.equal(flat, torch.arange(128, dtype=torch.float32))
        alias = x.view(8, 8).view(64)
        want = x * world
        assert comm.all_reduce(x, algo="flat", out=alias) is alias and torch.equal(x, want)
        ref = fused(r_x.clone(), residual, weight, algo="flat")
        got = fused(r_x, residual, weight, algo="flat", out=rows[:64].view(2, 32))
        assert all(torch.equal(a, b) for a, b in zip(got, ref)) and torch.equal(r_x, ref[0])
        return messages
    finally:
        comm.close()


def test_partly_overlapping_outputs_are_refused(worlds):
    messages = worlds(2).run(overlapping_outputs)[0]
    expected = ["out overlaps x partly", "out overlaps x partly", "out overlaps x partly",
                "residual_out overlaps x partly", "residual_out overlaps residual partly",
                "out must not overlap weight", "out and residual_out must be different buffers that do not overlap"]
    assert len(messages) == len(expected)
    for text, message in zip(expected, messages):
        assert text in message, (text, message)
