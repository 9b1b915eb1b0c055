"""sdpa_with_lse (torch's flash / cuDNN kernels with the LSE) against the float64 reference.

On CPU the "flash" backend is torch's CPU flash kernel; on GPU both flash and cuDNN run
(where this torch has them) in fp16/bf16, with grouped-query shapes, ragged lengths and
sequence slices of q (the ring hands over row ranges of its shards).
"""
import pytest
import torch

from shardkit.kernels.attention.sdpa import sdpa_backends, sdpa_with_lse
from shardkit.reference.attention import reference_attention

from ._common import ATTENTION, assert_close_inf, assert_nan_close, plant_nan, randn, same_bits, tol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]
BACKENDS = list(sdpa_backends(torch.device(DEVICE), DTYPES[-1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,causal", [
    (2, 4, 2, 37, 53, 64, False),    # GQA, ragged, Lq < Lk
    (1, 4, 1, 1, 129, 128, False),   # one query, MQA
    (1, 2, 2, 129, 37, 64, False),   # MHA, Lq > Lk
    (1, 4, 2, 77, 77, 128, True),    # the causal diagonal block
    (2, 8, 8, 3, 3, 32, True),
])
def test_matches_reference(backend, dtype, B, Hq, Hkv, Lq, Lk, D, causal):
    g = torch.Generator(device=DEVICE).manual_seed(Lq * 1000 + Lk + Hq)
    q = randn(B, Hq, Lq, D, dtype=dtype, device=DEVICE, gen=g)
    k = randn(B, Hkv, Lk, D, dtype=dtype, device=DEVICE, gen=g)
    v = randn(B, Hkv, Lk, D, dtype=dtype, device=DEVICE, gen=g)
    inputs = [t.clone() for t in (q, k, v)]
    out, lse = sdpa_with_lse(q, k, v, causal=causal, softmax_scale=0.3, backend=backend)
    ref_o, ref_l = reference_attention(q, k, v, causal=causal, softmax_scale=0.3)
    assert out.shape == (B, Hq, Lq, D) and out.dtype == dtype
    assert lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_o, **tol(ATTENTION, dtype))
    assert_close_inf(lse, ref_l, **tol(ATTENTION, torch.float32))
    for a, b in zip(inputs, (q, k, v)):
        assert torch.equal(a, b), "input modified"


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_slice_of_a_shard(backend):
    """A row range of q and a key prefix of k/v (strided views), as the ring passes them."""
    dtype = DTYPES[-1]
    g = torch.Generator(device=DEVICE).manual_seed(7)
    q = randn(1, 4, 61, 64, dtype=dtype, device=DEVICE, gen=g)
    k = randn(1, 2, 45, 64, dtype=dtype, device=DEVICE, gen=g)
    v = randn(1, 2, 45, 64, dtype=dtype, device=DEVICE, gen=g)
    out, lse = sdpa_with_lse(q[:, :, 17:], k[:, :, :30], v[:, :, :30], backend=backend)
    ref_o, ref_l = reference_attention(q[:, :, 17:], k[:, :, :30], v[:, :, :30])
    torch.testing.assert_close(out.double(), ref_o, **tol(ATTENTION, dtype))
    assert_close_inf(lse, ref_l, **tol(ATTENTION, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_blocks(backend):
    dtype = DTYPES[-1]
    q = torch.randn(1, 2, 5, 64, device=DEVICE).to(dtype)
    kv = torch.randn(1, 2, 0, 64, device=DEVICE).to(dtype)
    out, lse = sdpa_with_lse(q, kv, kv, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    out, lse = sdpa_with_lse(q[:, :, :0], q, q, backend=backend)
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)


def test_bad_input():
    dtype = DTYPES[-1]
    q = torch.randn(1, 2, 5, 64, device=DEVICE).to(dtype)
    k = torch.randn(1, 2, 6, 64, device=DEVICE).to(dtype)
    with pytest.raises(ValueError, match="backend must be one of"):
        sdpa_with_lse(q, k, k, backend="xformers")
    if BACKENDS:
        with pytest.raises(ValueError, match="square block"):
            sdpa_with_lse(q, k, k, causal=True, backend=BACKENDS[0])
        with pytest.raises(ValueError, match="multiple of"):
            sdpa_with_lse(torch.randn(1, 3, 5, 64, device=DEVICE).to(dtype), k, k, backend=BACKENDS[0])
        with pytest.raises(ValueError, match="head_dim"):
            sdpa_with_lse(q, k[..., :32], k[..., :32], backend=BACKENDS[0])
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="not available"):
            sdpa_with_lse(q, k, k, backend="cudnn")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("L,causal,pos", [(21, False, 9), (21, True, 9), (21, True, 0), (5, False, 2), (5, True, 3)])
def test_nan_reaches_exactly_the_rows_that_attend_to_it(backend, where, L, causal, pos):
    """As attention_chunk. torch's kernels alone do not: on CPU the flash kernel gives a query row
    with NaN out 0 and lse 0 when there are fewer than 8 keys, and with the causal mask a NaN value
    reaches rows that cannot see it; sdpa_with_lse puts NaN where the reference does."""
    dtype = DTYPES[-1]
    g = torch.Generator(device=DEVICE).manual_seed(pos)
    q = randn(1, 4, L, 64, dtype=dtype, device=DEVICE, gen=g)
    k, v = (randn(1, 2, L, 64, dtype=dtype, device=DEVICE, gen=g) for _ in range(2))
    q, k, v = plant_nan(q, k, v, where, pos)
    inputs = [t.clone() for t in (q, k, v)]
    out, lse = sdpa_with_lse(q, k, v, causal=causal, backend=backend)
    ref_o, ref_l = reference_attention(q, k, v, causal=causal)
    assert torch.isnan(ref_o).any() and (~torch.isnan(ref_o)).any()
    assert_nan_close(out, ref_o, f"out, NaN in {where}[{pos}]", **tol(ATTENTION, dtype))
    assert_nan_close(lse, ref_l, f"lse, NaN in {where}[{pos}]", **tol(ATTENTION, torch.float32))
    for a, b in zip(inputs, (q, k, v)):
        assert same_bits(a, b), "input modified"
