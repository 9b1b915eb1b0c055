"""torch.ops.shardkit.attention_chunk / merge_attention: registered, fake shapes, same results as the kernels."""
import torch

import shardkit.ops  # noqa: F401  (registers the ops)
from shardkit.kernels.attention.chunk import attention_chunk
from shardkit.kernels.attention.merge import merge_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(Lq=7, Lk=11, dtype=torch.float32):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(1, 4, Lq, 16, generator=g, device=DEVICE).to(dtype)
    k = torch.randn(1, 2, Lk, 16, generator=g, device=DEVICE).to(dtype)
    v = torch.randn(1, 2, Lk, 16, generator=g, device=DEVICE).to(dtype)
    return q, k, v


def test_fake_impls_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 8, 5, 64, dtype=torch.bfloat16)
        k = torch.empty(2, 2, 9, 64, dtype=torch.bfloat16)
        out, lse = torch.ops.shardkit.attention_chunk(q, k, k, True)
        m_out, m_lse = torch.ops.shardkit.merge_attention(torch.empty(3, 2, 8, 5, 64, dtype=torch.float16),
                                                          torch.empty(3, 2, 8, 5))
    assert out.shape == (2, 8, 5, 64) and out.dtype == torch.bfloat16
    assert lse.shape == (2, 8, 5) and lse.dtype == torch.float32
    assert m_out.shape == (2, 8, 5, 64) and m_out.dtype == torch.float16
    assert m_lse.shape == (2, 8, 5) and m_lse.dtype == torch.float32


def test_attention_chunk_op_matches_kernel():
    q, k, v = _qkv()
    ref = attention_chunk(q, k, v, causal=True, q_pos=4, kv_pos=0)
    got = torch.ops.shardkit.attention_chunk(q, k, v, True, None, None, 4, 0)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    pos_q = torch.tensor([0, 2, 4, 6, 8, 10, 12], device=DEVICE)
    pos_k = torch.arange(11, device=DEVICE) + 1
    ref = attention_chunk(q, k, v, causal=True, q_pos=pos_q, kv_pos=pos_k, softmax_scale=0.3)
    got = torch.ops.shardkit.attention_chunk(q, k, v, True, pos_q, pos_k, softmax_scale=0.3)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_merge_attention_op_matches_kernel():
    g = torch.Generator(device=DEVICE).manual_seed(1)
    outs = torch.randn(3, 1, 2, 5, 16, generator=g, device=DEVICE)
    lses = torch.randn(3, 1, 2, 5, generator=g, device=DEVICE)
    ref = merge_attention(outs, lses)
    got = torch.ops.shardkit.merge_attention(outs, lses)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_ops_trace_under_compile():
    q, k, v = _qkv()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(q, k, v):
        o1, l1 = torch.ops.shardkit.attention_chunk(q, k[:, :, :6], v[:, :, :6], True, None, None, 4, 0)
        o2, l2 = torch.ops.shardkit.attention_chunk(q, k[:, :, 6:], v[:, :, 6:], True, None, None, 4, 6)
        return torch.ops.shardkit.merge_attention(torch.stack([o1, o2]), torch.stack([l1, l2]))

    out, lse = block(q, k, v)
    ref_o, ref_l = attention_chunk(q, k, v, causal=True, q_pos=4, kv_pos=0)
    torch.testing.assert_close(out, ref_o, atol=1e-5, rtol=1e-5)
    fin = torch.isfinite(ref_l)
    assert torch.equal(fin, torch.isfinite(lse))
    torch.testing.assert_close(lse[fin], ref_l[fin], atol=1e-5, rtol=1e-5)
