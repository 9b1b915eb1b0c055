"""The plain-torch Mixtral (shardkit.models.moe.mixtral) against transformers' MixtralForCausalLM on the
real checkpoint, its KV cache against the cache-free forward, the grouped expert backends against each
other, and the loader's errors."""
import os

import pytest
import torch

from shardkit.errors import ShardkitError
from shardkit.models.moe.experts import has_grouped_mm, swiglu_experts
from shardkit.models.moe.mixtral import LocalMoE, Mixtral, combine_local, load_mixtral, random_mixtral, route

from .moe_ep_checks import MODEL, SMALL

HAVE_MODEL = os.path.exists(os.path.join(MODEL, "model.safetensors"))
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason=f"no checkpoint at {MODEL}")
try:
    import transformers  # noqa: F401
    HAVE_HF = True
except ImportError:
    HAVE_HF = False
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers is not installed (the independent reference)")


@needs_model
@needs_hf
def test_logits_and_routing_match_transformers():
    from transformers import AutoModelForCausalLM
    tokens = torch.randint(0, 8192, (2, 13), generator=torch.Generator().manual_seed(0))
    config, weights = load_mixtral(MODEL, torch.float32)
    model = Mixtral(config, weights)
    model.trace = []
    with torch.no_grad():
        ours = model.forward(tokens)
        hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
        ref = hf(tokens, output_router_logits=True)
    torch.testing.assert_close(ours, ref.logits, atol=1e-4, rtol=1e-4)
    for (_, _, routing, _), logits in zip(model.trace, ref.router_logits):
        torch.testing.assert_close(routing.logits, logits.float().view(-1, config.num_experts), atol=1e-4, rtol=1e-4)


def small_model(dtype=torch.float64, seed=0):
    return Mixtral(SMALL, random_mixtral(SMALL, seed, dtype))


def test_kv_cache_prefill_decode_and_chunks_equal_one_pass():
    model = small_model()
    tokens = torch.randint(0, SMALL.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    whole = model.forward(tokens)
    cache = model.new_cache(3, 16)
    parts = [model.forward(tokens[:, :7], cache, 0), model.forward(tokens[:, 7:8], cache, 7),
             model.forward(tokens[:, 8:9], cache, torch.tensor(8)),  # device-position path (CUDA-graph decode)
             model.forward(tokens[:, 9:12], cache, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-12, rtol=1e-12)


def test_local_moe_equals_per_token_float64_loop():
    layer = random_mixtral(SMALL, 2, torch.float64).layers[0]
    x = torch.randn(23, SMALL.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    r = route(x, layer.router, SMALL.topk)
    idx = r.topk_idx.clone()
    idx[4, 2] = -1  # a dropped slot contributes nothing
    got = combine_local(x, idx, r.topk_weights, layer.gate_up, layer.down)
    want = torch.zeros_like(x)
    f = SMALL.intermediate_size
    for t in range(x.shape[0]):
        for k in range(SMALL.topk):
            e = int(idx[t, k])
            if e >= 0:
                h = layer.gate_up[e] @ x[t]
                want[t] += r.topk_weights[t, k] * (layer.down[e] @ (torch.nn.functional.silu(h[:f]) * h[f:]))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert torch.allclose(r.topk_weights.sum(1), torch.ones(23, dtype=torch.float64))


@pytest.mark.skipif(not has_grouped_mm(torch.float32, torch.device("cpu")), reason="no torch._grouped_mm on CPU")
def test_grouped_mm_backend_equals_loop():
    layer = random_mixtral(SMALL, 4, torch.float32).layers[1]
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(50, SMALL.hidden_size, generator=gen)
    offsets = torch.tensor([0, 3, 3, 19, 19, 19, 20, 33, 33, 34, 40, 40, 41, 45, 45, 48, 48])  # empty groups, 2 spare rows
    loop = swiglu_experts(rows, layer.gate_up, layer.down, offsets, "loop")
    grouped = swiglu_experts(rows, layer.gate_up, layer.down, offsets, "grouped_mm")
    torch.testing.assert_close(grouped[:48], loop[:48], atol=1e-5, rtol=1e-5)
    model = Mixtral(SMALL, random_mixtral(SMALL, 4, torch.float32), LocalMoE(SMALL.topk, "grouped_mm"))
    tokens = torch.randint(0, SMALL.vocab_size, (2, 9), generator=gen)
    torch.testing.assert_close(model.forward(tokens), Mixtral(SMALL, model.weights).forward(tokens), atol=1e-5,
                               rtol=1e-5)


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ShardkitError, match="config.json"):
        load_mixtral(str(tmp_path))
    model = small_model()
    with pytest.raises(ValueError, match="tokens must be"):
        model.forward(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed the cache"):
        model.forward(torch.zeros(1, 5, dtype=torch.long), model.new_cache(1, 4))
    with pytest.raises(ValueError, match="offsets must have"):
        swiglu_experts(torch.zeros(4, SMALL.hidden_size, dtype=torch.float64), model.weights.layers[0].gate_up,
                       model.weights.layers[0].down, torch.tensor([0, 4]))
