"""The local Llama block kernels of the TP model (kernels/llama): RoPE + KV-cache write from the fused
q/k/v projection, and SwiGLU, against plain torch in float64 (interpreter on CPU, or the GPU)."""
import pytest
import torch
import torch.nn.functional as F

from shardkit.kernels.llama import rope_qkv_into_cache, swiglu
from shardkit.models.checkpoint import LlamaConfig
from shardkit.models.llama_tp import rope_tables
from shardkit.models.spd import apply_rope

from ..tolerances import ROUNDING, tol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def config(hd: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                       head_dim=hd, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=8,
                       tie_word_embeddings=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, length, start, nq, nkv, hd", [(1, 1, 6, 4, 2, 16), (3, 5, 2, 4, 4, 8),
                                                               (2, 3, 0, 9, 3, 12)])
def test_rope_and_cache_write_match_torch(dtype, batch, length, start, nq, nkv, hd):
    gen = torch.Generator().manual_seed(batch * 100 + length)
    cache_len, b_max = 12, batch + 1
    qkv = torch.randn(batch, length, (nq + 2 * nkv) * hd, generator=gen).to(dtype).to(DEVICE)
    cos, sin = (t.to(dtype).to(DEVICE) for t in rope_tables(config(hd), cache_len))
    positions = torch.arange(start, start + length, device=DEVICE)
    k_cache = torch.randn(b_max, nkv, cache_len, hd, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(b_max, nkv, cache_len, hd, generator=gen).to(dtype).to(DEVICE)
    k_before, v_before, qkv_before = k_cache.clone(), v_cache.clone(), qkv.clone()
    q_out = torch.full((batch, length, nq, hd), float("nan"), dtype=dtype, device=DEVICE)
    got = rope_qkv_into_cache(qkv, positions, cos, sin, k_cache, v_cache, nq, q_out=q_out)
    assert got is q_out and torch.equal(qkv, qkv_before)
    # reference: float64 rotate-half on the same (rounded) tables, cache rows written by index
    q, k, v = qkv.double().split([nq * hd, nkv * hd, nkv * hd], dim=-1)
    c, s = cos[positions].double(), sin[positions].double()
    ref_q = apply_rope(q.view(batch, length, nq, hd).transpose(1, 2), c, s).transpose(1, 2)
    ref_k = apply_rope(k.view(batch, length, nkv, hd).transpose(1, 2), c, s)
    ref_kc, ref_vc = k_before.double(), v_before.double()
    ref_kc[:batch, :, start:start + length] = ref_k
    ref_vc[:batch, :, start:start + length] = v.view(batch, length, nkv, hd).transpose(1, 2)
    assert torch.isfinite(q_out).all(), "a q element was not written"
    torch.testing.assert_close(q_out.double(), ref_q, **tol(ROUNDING, dtype))
    torch.testing.assert_close(k_cache.double(), ref_kc, **tol(ROUNDING, dtype))
    torch.testing.assert_close(v_cache.double(), ref_vc, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2 * 100), (3, 2, 2 * 2500)])
def test_swiglu_matches_torch(dtype, shape):
    gate_up = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device=DEVICE)
    assert swiglu(gate_up, out) is out
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(out.double(), F.silu(gate) * up, **tol(ROUNDING, dtype))


def test_bad_arguments():
    qkv = torch.zeros(1, 1, 4 * 8, device=DEVICE)
    cache = torch.zeros(1, 1, 4, 8, device=DEVICE)
    pos = torch.zeros(1, dtype=torch.long, device=DEVICE)
    tab = torch.zeros(4, 8, device=DEVICE)
    cases = [(lambda: rope_qkv_into_cache(qkv, pos, tab, tab, cache, cache, 3), "qkv must be contiguous"),
             (lambda: rope_qkv_into_cache(torch.zeros(1, 1, 4 * 7, device=DEVICE), pos, tab[:, :7], tab[:, :7],
                                          cache[..., :7].contiguous(), cache[..., :7].contiguous(), 2), "even"),
             (lambda: rope_qkv_into_cache(qkv, pos.int(), tab, tab, cache, cache, 2), "positions must be int64"),
             (lambda: rope_qkv_into_cache(qkv, pos, tab[:2], tab, cache, cache, 2), "cos and sin"),
             (lambda: rope_qkv_into_cache(qkv, pos, tab, tab, cache.half(), cache, 2), "k_cache must be"),
             (lambda: swiglu(torch.zeros(3, 5, device=DEVICE)), "[..., 2F]"),
             (lambda: swiglu(torch.zeros(3, 4, device=DEVICE).t()), "contiguous")]
    for case, text in cases:
        with pytest.raises(ValueError) as info:
            case()
        assert text in str(info.value), (text, str(info.value))
