"""Meta's pass-KV / pass-Q cost model (shardkit.collectives.attention.variant) and its use by auto."""
import math

import pytest

from shardkit.collectives.attention.plan import make_plan
from shardkit.collectives.attention.variant import RingCosts, choose_variant_by_model, predicted_ms

COSTS = RingCosts(attention_tflops=500.0, p2p_gbps=250.0)
LLAMA = dict(world=4, q_heads=32, kv_heads=8, head_dim=128, elem_bytes=2, costs=COSTS)


def test_prediction_by_hand():
    # Non-causal, T = 4096, P = 12288, 4 ranks: per rank 1024 queries, 4096 keys.
    T, P, N = 4096, 12288, 4
    compute = 4 * 1024 * 4096 * 32 * 128 / 500e12
    kv = 2 * 4096 * 8 * 128 * 2 / 250e9
    q = 1024 * 32 * 128 * 2 / 250e9
    a2a = 3 / 4 * 1024 * 32 * (128 * 2 + 4) / 250e9
    assert math.isclose(predicted_ms("pass_kv", T, P, causal=False, **LLAMA), 1e3 * (compute + 3 * max(compute, kv)))
    assert math.isclose(predicted_ms("pass_q", T, P, causal=False, **LLAMA), 1e3 * (compute + 3 * max(compute, q) + a2a))
    # Causal: every new query sees all P cached keys and half of the T new ones on average.
    causal_compute = 4 * (T * P + T * T / 2) / N ** 2 * 32 * 128 / 500e12
    assert math.isclose(predicted_ms("pass_kv", T, P, **LLAMA), 1e3 * (causal_compute + 3 * max(causal_compute, kv)))


def test_algorithm_1_hidden_transfer_condition():
    # Without a mask pass-KV's transfer is hidden iff T >= N C Hkv e / (2 Hq BW), whatever P is;
    # from there on the all-to-all makes pass-Q the slower one.
    t_hide = 4 * 500e12 * 8 * 2 / (2 * 32 * 250e9)  # 32000 tokens
    for P in (0, 10 ** 6, 10 ** 7):
        assert choose_variant_by_model(int(t_hide) + 64, P, causal=False, **LLAMA) == "pass_kv"
    # Far below it, with most of the context cached, the queries are the cheaper thing to move.
    assert choose_variant_by_model(256, 10 ** 6, causal=False, **LLAMA) == "pass_q"


def test_miss_rate_bound_two_kv_over_q_heads():
    # Transfer-bound (tiny compute): pass-Q wins below a miss rate of about 2 Hkv / Hq = 50%
    # (minus the all-to-all), pass-KV above.
    slow_net = dict(LLAMA, costs=RingCosts(attention_tflops=1e6, p2p_gbps=1.0))
    N = 10 ** 6
    assert choose_variant_by_model(int(0.3 * N), N - int(0.3 * N), **slow_net) == "pass_q"
    assert choose_variant_by_model(int(0.6 * N), N - int(0.6 * N), **slow_net) == "pass_kv"


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        predicted_ms("ring", 1, 1, **LLAMA)
    with pytest.raises(ValueError, match="new_tokens"):
        predicted_ms("pass_kv", -1, 1, **LLAMA)
    with pytest.raises(ValueError, match="world"):
        predicted_ms("pass_kv", 1, 1, **dict(LLAMA, world=0))
    with pytest.raises(ValueError, match="p2p_gbps"):
        RingCosts(attention_tflops=1.0, p2p_gbps=0.0)


def _metas(world, q_len, cache_len, variant=2):  # variant index 2 = "auto"
    return [dict(error=0, device_cuda=1, dtype=1, batch=1, q_heads=32, kv_heads=8, head_dim=128, causal=1,
                 variant=variant, scale_bits=0, threshold_bits=0, model_tflops_bits=1, model_gbps_bits=2,
                 has_cache=1, has_pos=0, q_len=q_len[r], kv_len=q_len[r], cache_len=cache_len[r],
                 q_pos_max=0, kv_pos_min=0, cache_pos_min=0, unsorted=0) for r in range(world)]


def test_auto_uses_the_model_when_given():
    # 2 ranks, 256 new tokens after 2M cached ones (miss rate ~0.01%): the model picks pass-Q,
    # and a threshold of 0 (never pass-Q) is ignored when the model decides.
    q_len, cache_len = [128, 128], [10 ** 6, 10 ** 6]
    metas = _metas(2, q_len, cache_len)
    assert make_plan(metas, True, True, 0.0, COSTS).variant == "pass_q"
    assert make_plan(metas, True, True, 0.0, None).variant == "pass_kv"
    # A large prefill with little cached: pass-KV by the model.
    metas = _metas(2, [64000, 64000], [10, 10])
    assert make_plan(metas, True, True, 1.0, COSTS).variant == "pass_kv"
