"""Bad input: clear errors on every rank, never a hang."""
import pytest
import torch
import torch.distributed as dist

from shardkit import Communicator
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


def test_absent_peer_times_out_naming_it(worlds):
    messages = worlds(3).run(rank_checks.absent_peer, 2, 3.0, timeout=120)
    assert messages[2] == ""
    for m in messages[:2]:
        assert "rank(s) [2] did not arrive" in m, m


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
