"""decode_attention (split-KV decode for GQA) against a float64 plain-torch reference.

CPU: the Triton interpreter, fp32/fp16 (bf16 once: the kernel upcasts its dots there); sizes are not
multiples of the interpreter's 16-key tiles and splits. GPU (marked): bf16 at the 70B TP=2 shapes,
and a CUDA graph replayed with new positions.
"""
import pytest
import torch

from shardkit.kernels.attention.decode import DecodeConfig, decode_attention, decode_config

from ._common import ATTENTION, same_bits, tol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(hd)) v per sequence over keys 0..lengths[b]-1 (0 rows for none)."""
    batch, n_q, hd = q.shape
    group = n_q // k.shape[1]
    out = torch.zeros(batch, n_q, hd, dtype=torch.float64)
    for b, n in enumerate(lengths):
        if n <= 0:
            continue
        keys = k[b, :, :n].double().cpu().repeat_interleave(group, 0)  # [n_q, n, hd]
        values = v[b, :, :n].double().cpu().repeat_interleave(group, 0)
        scores = torch.einsum("hd,hnd->hn", q[b].double().cpu(), keys) / hd ** 0.5
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(-1), values)
    return out


def make(batch, n_q, n_kv, hd, cache_len, dtype, seed, pad_hd=0):
    """q [B, n_q, hd] and caches [B, n_kv, S, hd]; pad_hd > 0: the caches are column slices of wider
    tensors (strides that are not the contiguous ones); the cache is NaN beyond what tests read."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q, hd, generator=gen).to(dtype).to(DEVICE)
    k, v = (torch.randn(batch, n_kv, cache_len, hd + pad_hd, generator=gen).to(dtype).to(DEVICE)[..., :hd]
            for _ in range(2))
    return q, k, v


def run_checked(q, k, v, kv_len, lengths, dtype, **kw):
    inputs = [t.clone() for t in (q, k, v)]
    out = torch.full_like(q, float("nan"))
    got = decode_attention(q, k, v, kv_len, out=out, **kw)
    assert got is out
    assert torch.isfinite(out).all(), "an output element was not written (NaN poison left) or is not finite"
    torch.testing.assert_close(out.double().cpu(), reference(q, k, v, lengths), **tol(ATTENTION, dtype))
    assert all(same_bits(a, b) for a, b in zip(inputs, (q, k, v))), "input modified"
    return out


CPU_DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("batch, n_q, n_kv, hd, kv_len, splits", [
    (1, 8, 1, 16, 53, 3),      # group 8 (the 70B TP=2 layout), ragged last split
    (3, 4, 2, 24, 37, None),   # group 2, head dim padded to 32, the policy's splits
    (3, 2, 2, 32, 70, 1),      # group 1, one split: the split kernel writes the output itself
    (1, 8, 4, 64, 19, 5),      # more splits than the keys fill: the trailing splits see nothing
])
def test_matches_float64_reference(dtype, batch, n_q, n_kv, hd, kv_len, splits):
    q, k, v = make(batch, n_q, n_kv, hd, kv_len + 5, dtype, seed=kv_len, pad_hd=8 if batch == 3 else 0)
    k[:, :, kv_len:] = float("nan")  # beyond kv_len: never read
    v[:, :, kv_len:] = float("nan")
    config = None if splits is None else DecodeConfig(splits=splits, block_n=16)
    run_checked(q, k, v, kv_len, [kv_len] * batch, dtype, config=config)


@pytest.mark.parametrize("per_sequence", [True, False])
def test_q_pos_limits_each_sequence(per_sequence):
    """Keys 0..q_pos[b] (a [B] tensor, or [1] for the whole batch); q_pos -1 sees nothing: a 0 row."""
    dtype, kv_len = torch.float32, 45
    q, k, v = make(3, 8, 2, 16, kv_len, dtype, seed=3)
    pos = [44, 6, -1] if per_sequence else [20]
    q_pos = torch.tensor(pos, device=DEVICE)
    for b, p in enumerate(pos * (3 // len(pos))):
        k[b, :, p + 1:] = float("nan")
        v[b, :, p + 1:] = float("nan")
    lengths = [p + 1 for p in pos] * (3 // len(pos))
    out = run_checked(q, k, v, kv_len, lengths, dtype, q_pos=q_pos, config=DecodeConfig(splits=2, block_n=16))
    if per_sequence:
        assert (out[2] == 0).all()


def test_bf16_in_the_interpreter_and_determinism():
    """bf16 (upcast dots in the interpreter, bf16 tensor-core dots on GPU), and two calls agree bit for bit."""
    dtype, kv_len = torch.bfloat16, 40
    q, k, v = make(1, 4, 1, 32, kv_len, dtype, seed=5)
    first = run_checked(q, k, v, kv_len, [kv_len], dtype, config=DecodeConfig(splits=3, block_n=16))
    assert torch.equal(first, decode_attention(q, k, v, kv_len, config=DecodeConfig(splits=3, block_n=16)))


def test_empty_and_policy():
    q, k, v = make(2, 4, 2, 16, 8, torch.float32, seed=6)
    assert (decode_attention(q, k, v, 0) == 0).all()
    # one wave at two programs per SM, at least two tiles per split, equal tiles per split
    assert decode_config(1, 4, 4096, 128, 2, 132) == DecodeConfig(splits=32, block_n=64)
    assert decode_config(1, 4, 32768, 128, 2, 132).splits == 64
    assert decode_config(8, 4, 4096, 128, 2, 132).splits == 8
    assert decode_config(32, 8, 4096, 128, 2, 132).splits == 1
    assert decode_config(1, 1, 100, 64, 2, 132) == DecodeConfig(splits=1, block_n=128)
    assert decode_config(1, 2, 100, 64, 4, 132) == DecodeConfig(splits=1, block_n=64)  # fp32: 4K-element tiles


def test_bad_arguments():
    q, k, v = make(2, 4, 2, 16, 8, torch.float32, seed=7)
    cases = [
        (lambda: decode_attention(q[0], k, v, 4), "q must be"),
        (lambda: decode_attention(q, k[:1], v, 4), "k_cache must be [2, n_kv, S, 16]"),
        (lambda: decode_attention(q, k, v.half(), 4), "v_cache must be"),
        (lambda: decode_attention(q[:, :3], k, v, 4), "multiple of the cache's KV heads"),
        (lambda: decode_attention(q, k, v, 9), "kv_len must be an int in 0..8"),
        (lambda: decode_attention(q, k, v, 4, q_pos=torch.zeros(3, dtype=torch.long, device=DEVICE)), "q_pos must be"),
        (lambda: decode_attention(q, k, v, 4, q_pos=torch.zeros(2, device=DEVICE)), "q_pos must be"),
        (lambda: decode_attention(q.repeat_interleave(2, -1)[..., ::2], k, v, 4), "unit stride"),
        (lambda: decode_attention(q, k, v, 4, out=q.half()), "out must be"),
        (lambda: decode_attention(q, k, v, 4, config=DecodeConfig(splits=0, block_n=16)), "config needs"),
    ]
    for case, text in cases:
        with pytest.raises(ValueError) as info:
            case()
        assert text in str(info.value), (text, str(info.value))


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch, n_q, n_kv, kv_len", [(1, 32, 4, 4095), (3, 64, 8, 1000), (2, 8, 8, 33000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_shapes_against_reference(dtype, batch, n_q, n_kv, kv_len):
    q, k, v = make(batch, n_q, n_kv, 128, kv_len + 3, dtype, seed=kv_len)
    run_checked(q, k, v, kv_len, [kv_len] * batch, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graph_replays_with_new_positions():
    """Captured once with kv_len = the cache length; each replay attends keys 0..q_pos (changed in place)."""
    dtype, cache_len = torch.bfloat16, 2048
    q, k, v = make(2, 32, 4, 128, cache_len, dtype, seed=11)
    q_pos = torch.zeros(2, dtype=torch.long, device="cuda")
    out = torch.empty_like(q)
    decode_attention(q, k, v, cache_len, q_pos=q_pos, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k, v, cache_len, q_pos=q_pos, out=out)
    for pos in ([0, 5], [700, 2047], [1500, 64]):
        q_pos.copy_(torch.tensor(pos))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double().cpu(), reference(q, k, v, [p + 1 for p in pos]), **tol(ATTENTION, dtype))
