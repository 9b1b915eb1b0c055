"""attention_chunk against the float64 reference (CPU: Triton interpreter; GPU: compiled).

Sizes are small and deliberately not multiples of the tile sizes so that CPU runs stay
fast and every tail path (partial Q tile, partial KV tile, diagonal tiles) is hit.
"""
import math

import pytest
import torch

from shardkit.collectives.attention.sharding import shard_positions
from shardkit.kernels.attention.chunk import attention_chunk
from shardkit.reference.attention import reference_attention

from ._common import ATTENTION, assert_close_inf, assert_nan_close, plant_nan, randn, tol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 only on GPU: the interpreter path upcasts bf16 dots to fp32 (tested once below).
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]


def _run_and_check(q, k, v, dtype, **kw):
    """Poison preallocated outputs, run, check every element against float64."""
    B, Hq, Lq, D = q.shape
    inputs = [t.clone() for t in (q, k, v)]
    out = torch.full((B, Hq, Lq, D), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Lq), float("nan"), dtype=torch.float32, device=q.device)
    o, l = attention_chunk(q, k, v, out=out, lse=lse, **kw)
    assert o is out and l is lse
    ref_kw = {n: kw[n] for n in ("causal", "q_pos", "kv_pos", "softmax_scale") if n in kw}
    ref_o, ref_l = reference_attention(q, k, v, **ref_kw)
    assert not torch.isnan(o).any(), "output element not written (NaN poison left)"
    assert not torch.isnan(l).any(), "lse element not written (NaN poison left)"
    torch.testing.assert_close(o.double(), ref_o, **tol(ATTENTION, dtype))
    assert_close_inf(l, ref_l, **tol(ATTENTION, torch.float32))
    for a, b in zip(inputs, (q, k, v)):
        assert torch.equal(a, b), "input modified"
    return o, l


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D", [
    (2, 4, 2, 37, 53, 32),   # GQA group 2, ragged lengths
    (1, 4, 1, 1, 129, 16),   # one query (decode), MQA
    (1, 2, 2, 129, 37, 64),  # MHA, Lq > Lk
    (1, 2, 1, 19, 40, 128),  # the production head dim
])
def test_non_causal(dtype, B, Hq, Hkv, Lq, Lk, D):
    g = torch.Generator(device=DEVICE).manual_seed(Lq * 1000 + Lk)
    q = randn(B, Hq, Lq, D, dtype=dtype, device=DEVICE, gen=g)
    k = randn(B, Hkv, Lk, D, dtype=dtype, device=DEVICE, gen=g)
    v = randn(B, Hkv, Lk, D, dtype=dtype, device=DEVICE, gen=g)
    _run_and_check(q, k, v, dtype, causal=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk,q_pos,kv_pos", [
    (37, 53, 16, 0),     # queries are the last 37 of 53 keys (bottom-right aligned)
    (37, 53, 0, 0),      # top-left aligned: keys beyond the queries are masked
    (29, 40, 0, 11),     # rows 0..10 see no key at all: lse -inf, out 0
    (20, 33, 0, 500),    # whole KV chunk in the future: every row fully masked
    (21, 1, 7, 7),       # a single key
    (1, 50, 1000, 0),    # decode step far into the sequence
])
def test_causal_int_positions(dtype, Lq, Lk, q_pos, kv_pos):
    g = torch.Generator(device=DEVICE).manual_seed(7 + Lq + Lk)
    q = randn(1, 4, Lq, 32, dtype=dtype, device=DEVICE, gen=g)
    k = randn(1, 2, Lk, 32, dtype=dtype, device=DEVICE, gen=g)
    v = randn(1, 2, Lk, 32, dtype=dtype, device=DEVICE, gen=g)
    o, l = _run_and_check(q, k, v, dtype, causal=True, q_pos=q_pos, kv_pos=kv_pos)
    masked = (torch.arange(Lq) + q_pos) < kv_pos
    if masked.any():
        assert torch.isneginf(l[..., masked.to(l.device)]).all()
        assert (o[..., masked.to(o.device), :] == 0).all()


@pytest.mark.parametrize("world", [2, 3])
def test_causal_load_balanced_shards(world):
    """Every (query shard, kv shard) pair of the load-balanced layout, position tensors."""
    seq_len, D = 45, 16  # not divisible by 2 * world
    dtype = DTYPES[0]
    g = torch.Generator(device=DEVICE).manual_seed(world)
    for rq in range(world):
        qp = shard_positions(seq_len, rq, world, device=DEVICE)
        q = randn(1, 2, qp.numel(), D, dtype=dtype, device=DEVICE, gen=g)
        for rk in range(world):
            kp = shard_positions(seq_len, rk, world, device=DEVICE, dtype=torch.int64)
            k = randn(1, 1, kp.numel(), D, dtype=dtype, device=DEVICE, gen=g)
            v = randn(1, 1, kp.numel(), D, dtype=dtype, device=DEVICE, gen=g)
            _run_and_check(q, k, v, dtype, causal=True, q_pos=qp, kv_pos=kp)


def test_position_tensor_and_int_agree():
    g = torch.Generator(device=DEVICE).manual_seed(3)
    q = randn(1, 2, 23, 16, device=DEVICE, gen=g)
    k = randn(1, 2, 31, 16, device=DEVICE, gen=g)
    v = randn(1, 2, 31, 16, device=DEVICE, gen=g)
    a = attention_chunk(q, k, v, causal=True, q_pos=9, kv_pos=3)
    b = attention_chunk(q, k, v, causal=True,
                        q_pos=torch.arange(9, 32, device=DEVICE, dtype=torch.int32),
                        kv_pos=torch.arange(3, 34, device=DEVICE, dtype=torch.int32))
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)


def test_unsorted_q_positions():
    """q_pos may be in any order (only kv_pos must be sorted)."""
    g = torch.Generator(device=DEVICE).manual_seed(4)
    q = randn(1, 2, 19, 16, device=DEVICE, gen=g)
    k = randn(1, 1, 25, 16, device=DEVICE, gen=g)
    v = randn(1, 1, 25, 16, device=DEVICE, gen=g)
    qp = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:19].to(DEVICE)
    qf = q if DEVICE == "cpu" else q.half()
    kf = k if DEVICE == "cpu" else k.half()
    vf = v if DEVICE == "cpu" else v.half()
    _run_and_check(qf, kf, vf, qf.dtype, causal=True, q_pos=qp, kv_pos=5)


def test_strided_inputs_and_scale():
    """[B, L, H, D] storage viewed as [B, H, L, D] (the usual projection layout)."""
    dtype = DTYPES[0]
    g = torch.Generator(device=DEVICE).manual_seed(5)
    q = randn(2, 27, 4, 32, dtype=dtype, device=DEVICE, gen=g).transpose(1, 2)
    kv = randn(2, 35, 2, 2, 32, dtype=dtype, device=DEVICE, gen=g)  # fused k/v storage
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    _run_and_check(q, k, v, dtype, causal=True, q_pos=8, kv_pos=0, softmax_scale=0.3)


def test_tile_overrides():
    """Different tile sizes give the same answer (block_m != block_n, several KV tiles)."""
    g = torch.Generator(device=DEVICE).manual_seed(6)
    dtype = DTYPES[0]
    q = randn(1, 2, 45, 16, dtype=dtype, device=DEVICE, gen=g)
    k = randn(1, 2, 70, 16, dtype=dtype, device=DEVICE, gen=g)
    v = randn(1, 2, 70, 16, dtype=dtype, device=DEVICE, gen=g)
    qp = torch.arange(45, device=DEVICE) * 2  # gaps: queries at even positions
    kp = torch.arange(70, device=DEVICE) + 3
    _run_and_check(q, k, v, dtype, causal=True, q_pos=qp, kv_pos=kp, block_m=32, block_n=16)
    _run_and_check(q, k, v, dtype, causal=True, q_pos=qp, kv_pos=kp, block_m=16, block_n=32)


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter-only path (bf16 dots upcast to fp32)")
def test_bf16_in_interpreter():
    g = torch.Generator().manual_seed(8)
    q = randn(1, 2, 21, 32, dtype=torch.bfloat16, gen=g)
    k = randn(1, 1, 30, 32, dtype=torch.bfloat16, gen=g)
    v = randn(1, 1, 30, 32, dtype=torch.bfloat16, gen=g)
    _run_and_check(q, k, v, torch.bfloat16, causal=True, q_pos=4)


def test_empty_kv_gives_masked_rows():
    q = randn(1, 2, 5, 16, device=DEVICE)
    k = torch.empty(1, 2, 0, 16, device=DEVICE)
    o, l = attention_chunk(q, k, k.clone())
    assert (o == 0).all() and torch.isneginf(l).all()


def test_default_scale_is_inverse_sqrt_d():
    g = torch.Generator(device=DEVICE).manual_seed(9)
    q, k, v = (randn(1, 1, 17, 64, device=DEVICE, gen=g) for _ in range(3))
    a = attention_chunk(q, k, v)
    b = attention_chunk(q, k, v, softmax_scale=1 / math.sqrt(64))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------- errors

def _qkv(Hq=4, Hkv=2, D=32, dtype=None):
    dtype = dtype or DTYPES[0]
    return tuple(torch.zeros(1, h, n, D, dtype=dtype, device=DEVICE)
                 for h, n in ((Hq, 8), (Hkv, 9), (Hkv, 9)))


@pytest.mark.parametrize("make,match", [
    (lambda: _qkv(Hq=4, Hkv=3), "heads"),
    (lambda: _qkv(D=48), "head_dim"),
    (lambda: _qkv(D=256), "head_dim"),
    (lambda: _qkv(dtype=torch.float64), "q must be float16"),
    (lambda: (_qkv()[0], _qkv()[1].to(torch.float16 if DEVICE == "cpu" else torch.bfloat16), _qkv()[2]),
     "k has dtype"),
    (lambda: (_qkv()[0], _qkv()[1].expand(2, -1, -1, -1), _qkv()[2].expand(2, -1, -1, -1)), "batch"),
    (lambda: (_qkv()[0], _qkv()[1][..., :16], _qkv()[2][..., :16]), "head_dim"),
    (lambda: (_qkv()[0], _qkv()[1], _qkv()[2][:, :, :7]), "v shape"),
    (lambda: (_qkv()[0], _qkv()[1].to("meta"), _qkv()[2]), "k is on meta"),
    (lambda: (_qkv()[0][0, 0], _qkv()[1], _qkv()[2]), "q must be 4-D"),
])
def test_bad_inputs(make, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        attention_chunk(q, k, v)


@pytest.mark.parametrize("kw,match", [
    (dict(q_pos=torch.arange(7)), r"q_pos must have shape \[8\]"),
    (dict(kv_pos=torch.arange(9).float()), "kv_pos must be an int32 or int64"),
    (dict(kv_pos=torch.arange(9).flip(0)), "non-decreasing"),
    (dict(out=torch.empty(1, 4, 8, 16)), "out must be"),
    (dict(lse=torch.empty(1, 4, 8, dtype=torch.float16)), "lse must be float32"),
])
def test_bad_positions_and_outputs(kw, match):
    # CPU tensors throughout: the checks run before any device requirement.
    q, k, v = (torch.zeros(1, h, n, 32) for h, n in ((4, 8), (2, 9), (2, 9)))
    with pytest.raises(ValueError, match=match):
        attention_chunk(q, k, v, causal=True, **kw)


# ---------------------------------------------------------------------------- NaN inputs

# NaN arithmetic warns in the interpreter's numpy.
NAN_WARNINGS = pytest.mark.filterwarnings("ignore:(invalid value|All-NaN slice) encountered:RuntimeWarning")


@NAN_WARNINGS
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("causal,pos", [
    (False, 20),
    (True, 2),    # seen by most rows, also through the unmasked full tiles
    (True, 20),   # hidden from rows 0..19, of which 16..19 share a tile with rows that see it
    (True, 36),   # the last key: only the last row sees it
])
def test_nan_reaches_exactly_the_rows_that_attend_to_it(where, causal, pos):
    """A NaN in q, k or v makes NaN what attends to it and nothing else (the reference's rule);
    "saw NaN" is not "saw no key" (lse NaN, not -inf). The finite part is still exact."""
    g = torch.Generator(device=DEVICE).manual_seed(pos)
    dtype = DTYPES[0]
    q, k, v = (randn(1, 2, 37, 16, dtype=dtype, device=DEVICE, gen=g) for _ in range(3))
    q, k, v = plant_nan(q, k, v, where, pos)
    kw = dict(causal=causal, q_pos=0, kv_pos=0)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    lse = torch.full(q.shape[:3], float("nan"), device=DEVICE)
    attention_chunk(q, k, v, out=out, lse=lse, **kw)
    ref_o, ref_l = reference_attention(q, k, v, **kw)
    assert torch.isnan(ref_o).any() and (~torch.isnan(ref_o)).any()  # the case means something
    assert_nan_close(out, ref_o, f"out, NaN in {where}[{pos}]", **tol(ATTENTION, dtype))
    assert_nan_close(lse, ref_l, f"lse, NaN in {where}[{pos}]", **tol(ATTENTION, torch.float32))


@NAN_WARNINGS
@pytest.mark.parametrize("where", ["k", "v"])
def test_nan_with_position_tensors_and_masked_rows(where):
    """Load-balanced positions (two pieces), a key chunk partly after every query (rows that see no
    key stay 0 / -inf), NaN in a key that only some rows of a tile see."""
    g = torch.Generator(device=DEVICE).manual_seed(21)
    dtype = DTYPES[-1]  # fp16: the NaN handling of the low-precision dot path
    qp = shard_positions(45, 0, 2, device=DEVICE)                        # 0..11, 34..44
    kp = shard_positions(45, 1, 2, device=DEVICE, dtype=torch.int64)  # 12..22, 23..33
    q = randn(1, 2, qp.numel(), 16, dtype=dtype, device=DEVICE, gen=g)
    k = randn(1, 1, kp.numel(), 16, dtype=dtype, device=DEVICE, gen=g)
    v = randn(1, 1, kp.numel(), 16, dtype=dtype, device=DEVICE, gen=g)
    q, k, v = plant_nan(q, k, v, where, 5)  # key position 17
    o, l = attention_chunk(q, k, v, causal=True, q_pos=qp, kv_pos=kp)
    ref_o, ref_l = reference_attention(q, k, v, causal=True, q_pos=qp, kv_pos=kp)
    assert torch.isneginf(ref_l).any() and torch.isnan(ref_o).any()
    assert_nan_close(o, ref_o, "out", **tol(ATTENTION, dtype))
    assert_nan_close(l, ref_l, "lse", **tol(ATTENTION, torch.float32))
