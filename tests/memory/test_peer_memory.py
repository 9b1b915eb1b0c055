"""PeerMemory on the cpu backend: every rank sees every rank's workspace at the table's addresses."""
import torch
import torch.distributed as dist

from shardkit import PeerMemory
from shardkit.memory.protocol import SIGNAL_BYTES


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
