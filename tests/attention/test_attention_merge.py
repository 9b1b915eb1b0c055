"""merge_attention / merge_attention_ against softmax over the concatenated KV sets."""
import pytest
import torch

from shardkit.collectives.attention.sharding import shard, shard_positions, unshard
from shardkit.kernels.attention.chunk import attention_chunk
from shardkit.kernels.attention.merge import merge_attention, merge_attention_
from shardkit.reference.attention import reference_attention, reference_merge

from ._common import ATTENTION, ROUNDING, assert_close_inf, assert_nan_close, randn, tol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MERGE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no dots: bf16 is fine on CPU
ATTN_DTYPE = torch.float32 if DEVICE == "cpu" else torch.float16


def _partials(B, H, L, D, splits, dtype, gen, causal=False, q_pos=0):
    """Reference partials over consecutive KV pieces plus the reference over all of them."""
    Lk = sum(splits)
    q = randn(B, H, L, D, device=DEVICE, gen=gen)
    k = randn(B, H, Lk, D, device=DEVICE, gen=gen)
    v = randn(B, H, Lk, D, device=DEVICE, gen=gen)
    outs, lses, start = [], [], 0
    for n in splits:
        o, l = reference_attention(q, k[:, :, start:start + n], v[:, :, start:start + n],
                                   causal=causal, q_pos=q_pos, kv_pos=start)
        outs.append(o.to(dtype))
        lses.append(l.float())
        start += n
    full_o, full_l = reference_attention(q, k, v, causal=causal, q_pos=q_pos, kv_pos=0)
    return outs, lses, full_o, full_l


@pytest.mark.parametrize("dtype", MERGE_DTYPES)
@pytest.mark.parametrize("splits", [(13,), (13, 20), (5, 1, 17, 9, 30)])
def test_merge_n_matches_full_softmax(dtype, splits):
    g = torch.Generator(device=DEVICE).manual_seed(len(splits))
    B, H, L, D = 2, 3, 37, 24  # D not a power of two: masked columns
    outs, lses, full_o, full_l = _partials(B, H, L, D, splits, dtype, g)
    inputs = [t.clone() for t in outs + lses]
    out = torch.full((B, H, L, D), float("nan"), dtype=dtype, device=DEVICE)
    lse = torch.full((B, H, L), float("nan"), device=DEVICE)
    o, l = merge_attention(outs, lses, out=out, lse=lse)
    assert o is out and l is lse
    assert not torch.isnan(o).any() and not torch.isnan(l).any(), "element not written"
    # Against the merge of the same rounded partials: one rounding to dtype.
    ref_o, ref_l = reference_merge(outs, lses)
    torch.testing.assert_close(o.double(), ref_o, **tol(ROUNDING, dtype))
    torch.testing.assert_close(l.double(), ref_l, **tol(ROUNDING, torch.float32))
    # Against softmax over the concatenation: partial rounding + merge rounding.
    torch.testing.assert_close(o.double(), full_o, **tol(ATTENTION, dtype))
    torch.testing.assert_close(l.double(), full_l, **tol(ROUNDING, torch.float32))
    for a, b in zip(inputs, outs + lses):
        assert torch.equal(a, b), "input modified"


@pytest.mark.parametrize("dtype", MERGE_DTYPES)
def test_merge_inplace_chain(dtype):
    g = torch.Generator(device=DEVICE).manual_seed(11)
    outs, lses, full_o, full_l = _partials(1, 4, 29, 32, (7, 16, 3), dtype, g)
    # (out, lse) live inside bigger buffers: strided views; the rest must stay untouched.
    big_o = torch.full((1, 4, 40, 32), 7.0, dtype=dtype, device=DEVICE)
    big_l = torch.full((1, 4, 40), 7.0, device=DEVICE)
    out, lse = big_o[:, :, 5:34], big_l[:, :, 5:34]
    out.copy_(outs[0])
    lse.copy_(lses[0])
    keep = [t.clone() for t in outs[1:] + lses[1:]]
    for o, l in zip(outs[1:], lses[1:]):
        r = merge_attention_(out, lse, o, l)
        assert r[0] is out and r[1] is lse
    for a, b in zip(keep, outs[1:] + lses[1:]):
        assert torch.equal(a, b), "other input modified"
    assert (big_o[:, :, :5] == 7).all() and (big_o[:, :, 34:] == 7).all()
    assert (big_l[:, :, :5] == 7).all() and (big_l[:, :, 34:] == 7).all()
    # Two roundings to dtype along the chain.
    atol, rtol = ROUNDING[dtype]
    torch.testing.assert_close(out.double(), full_o, atol=2 * atol + ATTENTION[dtype][0], rtol=2 * rtol)
    torch.testing.assert_close(lse.double(), full_l, **tol(ROUNDING, torch.float32))


# NaN * 0 inside the masked-out branch of tl.where warns in the interpreter's numpy.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_merge_masked_rows_and_garbage_partials():
    """-inf partials contribute nothing, even if their out is NaN/inf; all -inf -> 0, -inf."""
    B, H, L, D = 1, 2, 6, 16
    g = torch.Generator(device=DEVICE).manual_seed(12)
    o1, o2 = randn(B, H, L, D, device=DEVICE, gen=g), randn(B, H, L, D, device=DEVICE, gen=g)
    l1, l2 = randn(B, H, L, device=DEVICE, gen=g), randn(B, H, L, device=DEVICE, gen=g)
    ninf = float("-inf")
    l1[..., 0], l2[..., 0] = ninf, ninf   # row 0: nothing visible anywhere
    l1[..., 1] = ninf                     # row 1: only partial 2
    l2[..., 2] = ninf                     # row 2: only partial 1
    o1[..., 0, :], o2[..., 0, :] = float("nan"), float("inf")
    o1[..., 1, :] = float("nan")
    o2[..., 2, :] = float("inf")
    exp_o = torch.zeros(B, H, L, D, dtype=torch.float64, device=DEVICE)
    w1 = torch.exp(l1.double() - torch.logaddexp(l1.double(), l2.double()))
    mid = slice(3, L)
    exp_o[..., mid, :] = (w1[..., mid, None] * o1[..., mid, :].double()
                          + (1 - w1[..., mid, None]) * o2[..., mid, :].double())
    exp_o[..., 1, :] = o2[..., 1, :].double()
    exp_o[..., 2, :] = o1[..., 2, :].double()
    exp_l = torch.logaddexp(l1.double(), l2.double())

    o, l = merge_attention([o1, o2], [l1, l2])
    torch.testing.assert_close(o.double(), exp_o, **tol(ROUNDING, torch.float32))
    assert_close_inf(l, exp_l, **tol(ROUNDING, torch.float32))

    out, lse = o1.clone(), l1.clone()
    merge_attention_(out, lse, o2, l2)
    torch.testing.assert_close(out.double(), exp_o, **tol(ROUNDING, torch.float32))
    assert_close_inf(lse, exp_l, **tol(ROUNDING, torch.float32))


def test_merge_stacked_strided_and_large_lse():
    """Stacked non-contiguous input; lse values far apart (no overflow in exp)."""
    g = torch.Generator(device=DEVICE).manual_seed(13)
    S, B, H, L, D = 3, 2, 2, 9, 8
    outs = randn(B, L, S, H, D, device=DEVICE, gen=g).permute(2, 0, 3, 1, 4)  # [S, B, H, L, D]
    lses = randn(S, B, H, L, device=DEVICE, gen=g) * 300.0  # exp(300) overflows fp32
    assert not outs.is_contiguous()
    o, l = merge_attention(outs, lses)
    ref_o, ref_l = reference_merge(outs, lses)
    assert torch.isfinite(o).all() and torch.isfinite(l).all()
    torch.testing.assert_close(o.double(), ref_o, **tol(ROUNDING, torch.float32))
    torch.testing.assert_close(l.double(), ref_l, **tol(ROUNDING, torch.float32))


@pytest.mark.parametrize("world", [2, 3])
def test_ring_attention_emulation(world):
    """Load-balanced shards: each rank attends its queries to every rank's KV shard (with
    global positions) and merges in place; the unsharded result equals full causal attention."""
    seq_len, B, Hq, Hkv, D = 47, 1, 2, 1, 16
    g = torch.Generator(device=DEVICE).manual_seed(100 + world)
    q = randn(B, Hq, seq_len, D, dtype=ATTN_DTYPE, device=DEVICE, gen=g)
    k = randn(B, Hkv, seq_len, D, dtype=ATTN_DTYPE, device=DEVICE, gen=g)
    v = randn(B, Hkv, seq_len, D, dtype=ATTN_DTYPE, device=DEVICE, gen=g)
    pos = [shard_positions(seq_len, r, world, device=DEVICE) for r in range(world)]
    ks = [shard(k, r, world) for r in range(world)]
    vs = [shard(v, r, world) for r in range(world)]
    results = []
    for r in range(world):
        q_loc = shard(q, r, world)
        out = lse = None
        for step in range(world):  # ring order: own shard first, then the previous ranks'
            src = (r - step) % world
            o, l = attention_chunk(q_loc, ks[src], vs[src], causal=True, q_pos=pos[r], kv_pos=pos[src])
            if out is None:
                out, lse = o, l
            else:
                merge_attention_(out, lse, o, l)
        results.append(out)
    full = unshard(results, world)
    ref_o, _ = reference_attention(q, k, v, causal=True)
    atol, rtol = ATTENTION[ATTN_DTYPE]
    torch.testing.assert_close(full.double(), ref_o, atol=2 * atol, rtol=2 * rtol)


# ---------------------------------------------------------------------------- errors

def _pair(dtype=torch.float32, L=5):
    return torch.zeros(1, 2, L, 8, dtype=dtype, device=DEVICE), torch.zeros(1, 2, L, device=DEVICE)


@pytest.mark.parametrize("make,match", [
    (lambda: (*_pair(), _pair()[0], _pair()[1].half()), "lse_other must be float32"),
    (lambda: (*_pair(), *_pair(L=6)), "lse_other must have shape|out_other shape"),
    (lambda: (_pair()[0], _pair()[1][..., :4], *_pair()), r"lse must have shape \[1, 2, 5\]"),
    (lambda: (_pair()[0].double(), _pair()[1], *_pair()), "out must be float16"),
    (lambda: (*_pair(), _pair()[0].to("meta"), _pair()[1].to("meta")), "out_other is on meta"),
])
def test_merge_inplace_bad_inputs(make, match):
    with pytest.raises(ValueError, match=match):
        merge_attention_(*make())


@pytest.mark.parametrize("make,match", [
    (lambda: ([_pair()[0]] * 2, [_pair()[1]] * 3), "lses has 3 entries but outs has 2"),
    (lambda: ([_pair()[0], _pair(L=6)[0]], [_pair()[1]] * 2), r"outs\[1\]"),
    (lambda: ([_pair()[0]] * 2, [_pair()[1].double()] * 2), r"lses\[0\] must be float32"),
    (lambda: (torch.zeros(2, 1, 2, 5, 8, device=DEVICE), torch.zeros(2, 1, 2, 4, device=DEVICE)),
     "lses must have shape"),
    (lambda: ([], []), "at least one"),
    (lambda: (torch.zeros(1, 2, 5, 8, device=DEVICE), torch.zeros(1, 2, 5, device=DEVICE)), "5-D"),
])
def test_merge_n_bad_inputs(make, match):
    outs, lses = make()
    with pytest.raises(ValueError, match=match):
        merge_attention(outs, lses)


# ---------------------------------------------------------------------------- NaN partials

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_propagates_nan_but_not_no_key(dtype):
    """A partial that saw NaN (NaN lse, or NaN out with lse > -inf, even of negligible weight) makes
    the merged row / element NaN; a partial that saw no key (lse -inf) stays weight 0, whatever its out."""
    B, H, L, D, S = 1, 2, 8, 16, 3
    g = torch.Generator(device=DEVICE).manual_seed(14)
    outs = randn(S, B, H, L, D, dtype=dtype, device=DEVICE, gen=g)
    lses = randn(S, B, H, L, device=DEVICE, gen=g)
    nan, ninf = float("nan"), float("-inf")
    lses[1, 0, 0, 0] = nan                                       # row 0: NaN lse
    outs[2, 0, 0, 1, 5] = nan                                    # row 1: one NaN element
    lses[0, 0, 0, 2], outs[0, 0, 0, 2] = ninf, nan               # row 2: no key seen, garbage out
    lses[1, 0, 0, 3], outs[1, 0, 0, 3, 7] = -200.0, nan          # row 3: weight exp(-200) underflows
    lses[:, 0, 0, 4] = ninf                                      # row 4: nothing seen anywhere
    lses[0, 0, 0, 5], lses[1:, 0, 0, 5] = nan, ninf              # row 5: NaN and nothing else
    ref_o, ref_l = reference_merge(outs, lses)
    assert torch.isnan(ref_o[0, 0, 0]).all() and torch.isnan(ref_l[0, 0, 0])
    assert torch.isnan(ref_o[0, 0, 1]).sum() == 1 and not torch.isnan(ref_o[0, 0, 2]).any()
    assert torch.isnan(ref_o[0, 0, 3, 7]) and torch.isneginf(ref_l[0, 0, 4]) and torch.isnan(ref_l[0, 0, 5])

    o, l = merge_attention(outs, lses)
    assert_nan_close(o, ref_o, "merge_attention out", **tol(ROUNDING, dtype))
    assert_nan_close(l, ref_l, "merge_attention lse", **tol(ROUNDING, torch.float32))
    # Two-way in place, both orders: (0, 1) then 2, and (2, 1) then 0.
    for order in ((0, 1, 2), (2, 1, 0)):
        out, lse = outs[order[0]].clone(), lses[order[0]].clone()
        for s in order[1:]:
            merge_attention_(out, lse, outs[s], lses[s])
        assert_nan_close(out, ref_o, f"merge_attention_ {order} out", **tol(ROUNDING, dtype))
        assert_nan_close(lse, ref_l, f"merge_attention_ {order} lse", **tol(ROUNDING, torch.float32))
