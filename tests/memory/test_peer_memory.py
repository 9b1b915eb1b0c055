"""PeerMemory on the cpu backend: every rank sees every rank's workspace at the table's addresses."""
import pytest
import torch
import torch.distributed as dist

from shardkit import PeerMemory
from shardkit.memory.protocol import SIGNAL_BYTES

from ..conftest import gpu_count


def peer_memory_on_rank() -> list:
    rank = dist.get_rank()
    with PeerMemory(buffer_bytes=5000) as mem:
        assert mem.buffer_bytes == 8192, "capacity is rounded up to 4 KiB"
        assert mem.table.dtype == torch.int64 and mem.table.tolist()[rank] == mem.buffer.data_ptr()
        assert torch.count_nonzero(mem.buffer[:SIGNAL_BYTES]) == 0, "signal area starts zeroed"
        stage = mem.staging(100, torch.float32)
        assert mem.holds(stage) == SIGNAL_BYTES and mem.holds(torch.empty(100)) is None
        stage.fill_(rank + 1)
        dist.barrier()
        seen = []
        for r, addr in enumerate(mem.table.tolist()):
            peer = mem._segments.tensors[r]
            assert peer.data_ptr() == addr
            seen.append(peer[SIGNAL_BYTES:SIGNAL_BYTES + 400].view(torch.float32)[0].item())
        dist.barrier()
    mem.close()  # idempotent
    return seen


def test_every_rank_sees_every_workspace(worlds):
    for seen in worlds(3).run(peer_memory_on_rank):
        assert seen == [1.0, 2.0, 3.0]


def test_on_one_device_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world must be in"):
        PeerMemory.on_one_device(0, 4096, "cuda")
    with pytest.raises(ValueError, match="buffer_bytes must be positive"):
        PeerMemory.on_one_device(2, 0, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 1, reason="needs a CUDA GPU")
def test_on_one_device_every_rank_sees_every_workspace():
    ranks = PeerMemory.on_one_device(3, 5000, "cuda")
    addresses = [m.buffer.data_ptr() for m in ranks]
    for r, mem in enumerate(ranks):
        assert (mem.rank, mem.world_size, mem.buffer_bytes, mem.device) == (r, 3, 8192, mem.buffer.device)
        assert mem.table.tolist() == addresses and torch.count_nonzero(mem.buffer) == 0
        mem.staging(10, torch.float32).fill_(r + 1)
    for mem in ranks:
        seen = [mem.peer_view(q, SIGNAL_BYTES, 10, torch.float32) for q in range(3)]
        assert [v.data_ptr() for v in seen] == [a + SIGNAL_BYTES for a in addresses]
        assert [float(v.sum()) for v in seen] == [10.0, 20.0, 30.0]
