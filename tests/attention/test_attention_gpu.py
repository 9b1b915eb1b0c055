"""GPU tests of the compiled attention kernels: bf16/fp16 against an fp32 torch reference.

Run on the device machine:  python -m pytest tests/attention/test_attention_gpu.py -q -m gpu
"""
import os

import pytest
import torch
import torch.nn.functional as F

from shardkit.collectives.attention.sharding import shard, shard_positions, unshard
from shardkit.kernels.attention.chunk import attention_chunk
from shardkit.kernels.attention.merge import merge_attention, merge_attention_
from shardkit.reference.attention import reference_attention, reference_merge

from ._common import ATTENTION, ROUNDING, assert_close_inf, assert_nan_close, plant_nan, tol

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only"),
]

DT = [torch.bfloat16, torch.float16]


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, device="cuda", generator=gen).to(dtype)


def _check(q, k, v, **kw):
    dtype = q.dtype
    out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    o, l = attention_chunk(q, k, v, out=out, lse=lse, **kw)
    torch.cuda.synchronize()
    ref_kw = {n: kw[n] for n in ("causal", "q_pos", "kv_pos", "softmax_scale") if n in kw}
    ref_o, ref_l = reference_attention(q, k, v, dtype=torch.float32, **ref_kw)
    assert not torch.isnan(o).any() and not torch.isnan(l).any(), "element not written"
    torch.testing.assert_close(o.float(), ref_o, **tol(ATTENTION, dtype))
    assert_close_inf(l, ref_l, **tol(ATTENTION, torch.float32))
    return o, l


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk", [(1, 1000), (37, 53), (129, 129), (1000, 4099), (4099, 1000)])
def test_chunk_gpu(dtype, D, causal, Lq, Lk):
    g = torch.Generator(device="cuda").manual_seed(Lq + Lk + D)
    q = _rand(2, 8, Lq, D, dtype=dtype, gen=g)
    k = _rand(2, 2, Lk, D, dtype=dtype, gen=g)
    v = _rand(2, 2, Lk, D, dtype=dtype, gen=g)
    _check(q, k, v, causal=causal, q_pos=Lk - Lq if Lk >= Lq else 0, kv_pos=0)


@pytest.mark.parametrize("dtype", DT)
def test_chunk_gpu_matches_sdpa(dtype):
    """Bottom-right-free case (Lq == Lk, positions 0): compare with torch SDPA too."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (_rand(1, 8, 1031, 128, dtype=dtype, gen=g) for _ in range(3))
    for causal in (False, True):
        o, _ = attention_chunk(q, k, v, causal=causal)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(o, ref, **tol(ATTENTION, dtype))


@pytest.mark.parametrize("dtype", DT)
def test_chunk_gpu_fully_masked_and_positions(dtype):
    g = torch.Generator(device="cuda").manual_seed(2)
    q = _rand(1, 4, 300, 128, dtype=dtype, gen=g)
    k = _rand(1, 1, 500, 128, dtype=dtype, gen=g)
    v = _rand(1, 1, 500, 128, dtype=dtype, gen=g)
    o, l = _check(q, k, v, causal=True, q_pos=0, kv_pos=200)  # rows 0..199 see nothing
    assert torch.isneginf(l[..., :200]).all() and (o[..., :200, :] == 0).all()
    qp = torch.arange(300, device="cuda", dtype=torch.int32) * 3
    kp = torch.cat([torch.arange(0, 250, device="cuda"), torch.arange(700, 950, device="cuda")])
    _check(q, k, v, causal=True, q_pos=qp, kv_pos=kp)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("world", [2, 4])
def test_ring_emulation_gpu(dtype, world):
    seq_len = 4096 + 37
    g = torch.Generator(device="cuda").manual_seed(world)
    q = _rand(1, 8, seq_len, 128, dtype=dtype, gen=g)
    k = _rand(1, 2, seq_len, 128, dtype=dtype, gen=g)
    v = _rand(1, 2, seq_len, 128, dtype=dtype, gen=g)
    pos = [shard_positions(seq_len, r, world, device="cuda") for r in range(world)]
    ks = [shard(k, r, world) for r in range(world)]
    vs = [shard(v, r, world) for r in range(world)]
    results = []
    for r in range(world):
        ql = shard(q, r, world)
        parts = [attention_chunk(ql, ks[s], vs[s], causal=True, q_pos=pos[r], kv_pos=pos[s])
                 for s in range(world)]
        out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
        o2, l2 = parts[0][0].clone(), parts[0][1].clone()
        for p in parts[1:]:
            merge_attention_(o2, l2, p[0], p[1])
        torch.testing.assert_close(o2, out, **tol(ROUNDING, dtype))
        results.append(out)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                         is_causal=True)
    atol, rtol = ATTENTION[dtype]
    torch.testing.assert_close(unshard(results, world), ref, atol=2 * atol, rtol=2 * rtol)


@pytest.mark.parametrize("dtype", DT + [torch.float32])
def test_merge_gpu(dtype):
    g = torch.Generator(device="cuda").manual_seed(3)
    S, B, H, L, D = 4, 2, 8, 777, 128
    outs = _rand(S, B, H, L, D, dtype=dtype, gen=g)
    lses = torch.randn(S, B, H, L, device="cuda", generator=g) * 5
    lses[0, :, :, :10] = float("-inf")
    lses[:, :, :, 10:12] = float("-inf")
    o, l = merge_attention(outs, lses)
    ref_o, ref_l = reference_merge(outs, lses)
    torch.testing.assert_close(o.double(), ref_o, **tol(ROUNDING, dtype))
    assert_close_inf(l, ref_l, **tol(ROUNDING, torch.float32))
    out, lse = outs[0].clone(), lses[0].clone()
    merge_attention_(out, lse, outs[1], lses[1])
    ref_o, ref_l = reference_merge(outs[:2], lses[:2])
    torch.testing.assert_close(out.double(), ref_o, **tol(ROUNDING, dtype))
    assert_close_inf(lse, ref_l, **tol(ROUNDING, torch.float32))


@pytest.mark.parametrize("D", [16, 32, 64])
def test_chunk_gpu_fp32_and_small_head_dims(D):
    """fp32 (IEEE dots) and the small head dims compile and run correctly on GPU too."""
    g = torch.Generator(device="cuda").manual_seed(D)
    for dtype in (torch.float32, torch.bfloat16):
        q = _rand(1, 4, 77, D, dtype=dtype, gen=g)
        k = _rand(1, 2, 150, D, dtype=dtype, gen=g)
        v = _rand(1, 2, 150, D, dtype=dtype, gen=g)
        _check(q, k, v, causal=True, q_pos=60, kv_pos=0)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("causal,pos", [(False, 150), (True, 3), (True, 150), (True, 299)])
def test_chunk_gpu_nan(dtype, where, causal, pos):
    """Compiled kernel, 128 x 64 tiles: NaN reaches exactly the rows (v: columns) that attend to it,
    through the unmasked full tiles and the diagonal tiles (where a hidden NaN value must not leak)."""
    g = torch.Generator(device="cuda").manual_seed(pos)
    q = _rand(1, 4, 300, 128, dtype=dtype, gen=g)
    k, v = (_rand(1, 2, 300, 128, dtype=dtype, gen=g) for _ in range(2))
    q, k, v = plant_nan(q, k, v, where, pos)
    o, l = attention_chunk(q, k, v, causal=causal)
    ref_o, ref_l = reference_attention(q, k, v, causal=causal, dtype=torch.float32)
    assert torch.isnan(ref_o).any()
    assert_nan_close(o, ref_o, f"out, NaN in {where}[{pos}]", **tol(ATTENTION, dtype))
    assert_nan_close(l, ref_l, f"lse, NaN in {where}[{pos}]", **tol(ATTENTION, torch.float32))
    # Position tensors (two pieces of keys, queries every third position), fp32 IEEE dots too.
    qp = torch.arange(300, device="cuda") * 3
    kp = torch.cat([torch.arange(0, 150, device="cuda"), torch.arange(400, 550, device="cuda")])
    for dt in (dtype, torch.float32):
        qd, kd, vd = q.to(dt), k.to(dt), v.to(dt)
        o, l = attention_chunk(qd, kd, vd, causal=True, q_pos=qp, kv_pos=kp)
        ref_o, ref_l = reference_attention(qd, kd, vd, causal=True, q_pos=qp, kv_pos=kp, dtype=torch.float32)
        assert_nan_close(o, ref_o, f"out, positions, {dt}", **tol(ATTENTION, dt))
        assert_nan_close(l, ref_l, f"lse, positions, {dt}", **tol(ATTENTION, torch.float32))


@pytest.mark.parametrize("dtype", DT + [torch.float32])
def test_merge_gpu_nan(dtype):
    """NaN lse / NaN out (also of negligible weight) propagate; lse -inf partials stay weight 0."""
    g = torch.Generator(device="cuda").manual_seed(4)
    S, B, H, L, D = 3, 1, 4, 300, 128
    outs = _rand(S, B, H, L, D, dtype=dtype, gen=g)
    lses = torch.randn(S, B, H, L, device="cuda", generator=g) * 5
    lses[1, 0, 0, 0] = float("nan")
    outs[2, 0, 1, 7, 9] = float("nan")
    lses[0, 0, 2, 50:60], outs[0, 0, 2, 50:60] = float("-inf"), float("nan")
    lses[1, 0, 3, 100], outs[1, 0, 3, 100, 4] = -300.0, float("nan")
    lses[:, 0, 3, 200] = float("-inf")
    ref_o, ref_l = reference_merge(outs, lses)
    o, l = merge_attention(outs, lses)
    assert_nan_close(o, ref_o, "merge_attention out", **tol(ROUNDING, dtype))
    assert_nan_close(l, ref_l, "merge_attention lse", **tol(ROUNDING, torch.float32))
    out, lse = outs[0].clone(), lses[0].clone()
    merge_attention_(out, lse, outs[1], lses[1])
    merge_attention_(out, lse, outs[2], lses[2])
    assert_nan_close(out, ref_o, "merge_attention_ out", **tol(ROUNDING, dtype))
    assert_nan_close(lse, ref_l, "merge_attention_ lse", **tol(ROUNDING, torch.float32))
