"""The workspace protocol's host side: fingerprints, the epoch-buffer rule, error messages."""
import torch

from shardkit.kernels.all_reduce.rmsnorm import RMSNormConfig
from shardkit.kernels.all_reduce.tree import TreeConfig
from shardkit.memory import protocol


def test_call_signatures_tell_apart_what_changes_the_work_map():
    """Every choice that maps data to programs differently (op, kernel family, packs or elements,
    chunk, grid, tree chunk width) or changes the result (eps) must give another signature."""
    bf16 = protocol.DTYPE_CODES[torch.bfloat16]
    grid = vars(TreeConfig(1024, 64, 4)).values()
    base = protocol.call_signature("all_reduce_tree_cuda", 8192, 0, 2, 4096, bf16, -1, True, *grid)
    variants = [
        protocol.call_signature("all_reduce_flat_cuda", 8192, 0, 2, 4096, bf16, -1, True, *grid),
        protocol.call_signature("all_reduce_tree_triton", 8192, 0, 2, 4096, bf16, -1, True, *grid),
        protocol.call_signature("all_reduce_tree_cuda", 8192, 0, 2, 4096, bf16, -1, False, *grid),
        protocol.call_signature("all_reduce_tree_cuda", 8192, 0, 2, 4096, protocol.DTYPE_CODES[torch.float16], -1,
                                True, *grid),
        protocol.call_signature("all_reduce_tree_cuda", 12288, 0, 3, 4096, bf16, -1, True, *grid),  # more chunks
        protocol.call_signature("all_reduce_tree_cuda", 8192, 1, 2, 4096, bf16, -1, True, *grid),   # next chunk
        protocol.call_signature("all_reduce_tree_cuda", 8192, 0, 2, 4096, bf16, 4096, True, *grid),  # zero-copy
        protocol.call_signature("all_reduce_tree_cuda", 8192, 0, 2, 4096, bf16, -1, True,
                                *vars(TreeConfig(1024, 32, 4)).values()),
    ]
    fused = [protocol.call_signature("rmsnorm_tree", 64, 0, 1, 64, 8192, bf16, protocol.float_bits(1e-6),
                                     *vars(RMSNormConfig(132, 2, block_c)).values()) for block_c in (512, 1024)]
    fused.append(protocol.call_signature("rmsnorm_tree", 64, 0, 1, 64, 8192, bf16, protocol.float_bits(1e-5),
                                         *vars(RMSNormConfig(132, 2, 512)).values()))
    fused.append(protocol.call_signature("rmsnorm_flat", 64, 0, 1, 64, 8192, bf16, protocol.float_bits(1e-6),
                                         *vars(RMSNormConfig(132, 8, 0)).values()))
    signatures = [base, *variants, *fused]
    assert len(set(signatures)) == len(signatures)
    assert all(0 <= s < 2**31 for s in signatures)
    assert base == protocol.call_signature("all_reduce_tree_cuda", 8192, 0, 2, 4096, bf16, -1, True, *grid)


def test_op_codes_are_distinct():
    assert len(set(protocol.OP_CODES.values())) == len(protocol.OP_CODES)


def test_epoch_buffers_alternate_after_staging():
    b = 1 << 20
    assert protocol.staging_offset() == protocol.SIGNAL_BYTES
    assert protocol.epoch_buffer_offset(2, b) == protocol.SIGNAL_BYTES + b
    assert protocol.epoch_buffer_offset(3, b) == protocol.SIGNAL_BYTES + 2 * b
    assert protocol.epoch_buffer_offset(3, b) + b == protocol.ll_offset(b)
    assert protocol.workspace_bytes(b, 3) == protocol.ll_offset(b) + 2 * 3 * protocol.LL_SLOT_BYTES


def test_failure_messages_name_the_ranks_and_what_happened():
    mismatch = protocol.describe_failure([protocol.MISMATCH, 1, 0b110, 7], rank=0, world=3, timeout_s=5)
    assert "rank(s) [1, 2]" in mismatch and "different" in mismatch and "call 7" in mismatch
    timeout = protocol.describe_failure([protocol.TIMEOUT, protocol.MAX_PROGRAMS + 3, 0b10, 9], 0, 2, 2.5)
    assert "did not arrive within 2.5 s" in timeout and "barrier 1" in timeout
    local = protocol.describe_failure([protocol.TIMEOUT, protocol.LOCAL_WAIT_SLOT, 0, 4], 1, 2, 1)
    assert "own launch" in local
