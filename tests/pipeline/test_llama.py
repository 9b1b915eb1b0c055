"""The plain Llama stage: tiny-llama-pycode against an independent float64 forward (whole prompt,
sliced prefill with the KV cache, stages chained), the safetensors reader, bad input, and HF
transformers as a second reference where it is installed."""
import importlib.util

import pytest
import torch

from shardkit.pipeline.llama import LlamaConfig, LlamaStage, random_weights, read_safetensors, weight_names

from ._model import MODEL_DIR, config, needs_model, prompt, reference, relative_error, weights
from .reference_llama import reference_logits

SMALL = LlamaConfig(vocab=97, hidden=48, layers=5, heads=6, kv_heads=2, head_dim=16, ffn=80, rope_theta=500.0,
                    eps=1e-6, tie_embeddings=False)


def run_slices(stages, ids, slices):
    """Feed ``ids`` slice by slice through a chain of stages; logits of every slice, concatenated."""
    outs, pos = [], 0
    for s in slices:
        x = ids[:, pos:pos + s]
        for st in stages:
            x = st.forward(x, pos)
        outs.append(x)
        pos += s
    return torch.cat(outs, dim=1)


@needs_model
@pytest.mark.parametrize("slices", [(70,), (1, 33, 20, 16), (35, 35)])
def test_checkpoint_matches_float64(slices):
    cfg = config()
    stage = LlamaStage(cfg, weights(), range(cfg.layers), first=True, last=True, max_tokens=80)
    with torch.no_grad():
        got = run_slices([stage], prompt(), slices)
    assert relative_error(got, reference()[0]) <= 1e-4


@needs_model
def test_checkpoint_loads_only_its_layers():
    cfg = config()
    w = read_safetensors(f"{MODEL_DIR}/model.safetensors", weight_names(cfg, range(2, 4), False, True))
    assert sorted({k.split(".")[2] for k in w if k.startswith("model.layers.")}) == ["2", "3"]
    assert "model.embed_tokens.weight" in w  # tied: the last stage's LM head
    assert w["model.layers.2.mlp.down_proj.weight"].shape == (cfg.hidden, cfg.ffn)
    with pytest.raises(KeyError, match="no tensor named"):
        read_safetensors(f"{MODEL_DIR}/model.safetensors", ["model.layers.99.mlp.up_proj.weight"])


@pytest.mark.parametrize("attention", ["auto", "flash", "math"])
def test_random_model_chained_stages_and_float64(attention):
    # Untied head, GQA 3:1, odd sizes; any cut of the layers gives the same model; every attention
    # kernel of the CPU (the slice's causal block merged with the cached prefix).
    ids = torch.randint(0, SMALL.vocab, (2, 19), generator=torch.Generator().manual_seed(0))
    full = random_weights(SMALL, range(SMALL.layers), True, True, seed=5, dtype=torch.float32)
    want = reference_logits(SMALL, full, ids)
    cuts = [(0, 2), (2, 3), (3, 5)]
    stages = [LlamaStage(SMALL, random_weights(SMALL, range(a, b), a == 0, b == 5, seed=5, dtype=torch.float32),
                         range(a, b), first=a == 0, last=b == 5, max_tokens=19, batch=2, attention=attention)
              for a, b in cuts]
    with torch.no_grad():
        got = run_slices(stages, ids, (4, 9, 1, 5))
    assert relative_error(got, want) <= 1e-5


def test_attention_kernel_choice():
    w = random_weights(SMALL, range(1), False, False, dtype=torch.float32)
    odd = LlamaConfig(**{**SMALL.__dict__, "head_dim": 10})
    assert LlamaStage(SMALL, w, range(1), first=False, last=False, max_tokens=4).attention_kernels == ("flash", "flash")
    w_odd = random_weights(odd, range(1), False, False, dtype=torch.float32)
    assert LlamaStage(odd, w_odd, range(1), first=False, last=False, max_tokens=4).attention_kernels == ("math", "math")
    with pytest.raises(ValueError, match="attention='cudnn' is not available"):
        LlamaStage(SMALL, w, range(1), first=False, last=False, max_tokens=4, attention="cudnn")
    with pytest.raises(ValueError, match="attention must be one of"):
        LlamaStage(SMALL, w, range(1), first=False, last=False, max_tokens=4, attention="sdpa")


def test_head_false_returns_hidden():
    w = random_weights(SMALL, range(SMALL.layers), True, True, dtype=torch.float32)
    st = LlamaStage(SMALL, w, range(SMALL.layers), first=True, last=True, max_tokens=8)
    ids = torch.arange(8).view(1, 8)
    h = st.forward(ids[:, :5], 0, head=False)
    assert h.shape == (1, 5, SMALL.hidden)
    assert st.forward(ids[:, 5:], 5).shape == (1, 3, SMALL.vocab)
    st.reset()
    assert torch.equal(st.logits(st.forward(ids, 0, head=False)), st.forward(ids, 0))


def test_bad_input():
    w = random_weights(SMALL, range(SMALL.layers), True, True, dtype=torch.float32)
    st = LlamaStage(SMALL, w, range(0, 2), first=True, last=False, max_tokens=8)
    ids = torch.zeros((1, 4), dtype=torch.int64)
    with pytest.raises(ValueError, match="int64 token ids"):
        st.forward(ids.float(), 0)
    with pytest.raises(ValueError, match="batch 1"):
        st.forward(torch.zeros((2, 4), dtype=torch.int64), 0)
    st.forward(ids, 0)
    with pytest.raises(ValueError, match="cached length 4"):
        st.forward(ids, 2)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        st.forward(torch.zeros((1, 5), dtype=torch.int64), 4)
    mid = LlamaStage(SMALL, w, range(2, 3), first=False, last=False, max_tokens=8)
    with pytest.raises(ValueError, match="hidden states"):
        mid.forward(torch.zeros((1, 3, SMALL.hidden), dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="contiguous range"):
        LlamaStage(SMALL, w, range(3, 9), first=False, last=True, max_tokens=8)
    with pytest.raises(KeyError, match="weights lack"):
        LlamaStage(SMALL, {}, range(0, 1), first=True, last=False, max_tokens=8)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        LlamaConfig(vocab=10, hidden=8, layers=1, heads=3, kv_heads=2, head_dim=4, ffn=8)


@needs_model
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_matches_transformers():
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(MODEL_DIR, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(prompt()).logits
    cfg = config()
    stage = LlamaStage(cfg, weights(), range(cfg.layers), first=True, last=True, max_tokens=80)
    with torch.no_grad():
        got = run_slices([stage], prompt(), (40, 30))
    assert relative_error(got, want) <= 1e-4


@pytest.mark.gpu
@needs_model
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sliced_prefill(dtype):
    # On CUDA, slices after the first take the bottom-right causal mask (flash attention in bf16).
    cfg = config()
    stage = LlamaStage(cfg, weights(), range(cfg.layers), first=True, last=True, device="cuda", dtype=dtype,
                       max_tokens=80)
    with torch.no_grad():
        whole = run_slices([stage], prompt().cuda(), (70,)).float().cpu()
        stage.reset()
        sliced = run_slices([stage], prompt().cuda(), (24, 30, 16)).float().cpu()
    want = reference()[0]
    if dtype == torch.float32:
        assert relative_error(sliced, want) <= 1e-4
    else:  # bf16: slicing must not cost accuracy against the whole prompt in one call
        assert relative_error(sliced, want) <= max(2 * relative_error(whole, want), 1e-2)


def test_cudnn_refusal_falls_back_to_flash(monkeypatch):
    # A cuDNN that raises for some shape: the stage warns once, runs flash from then on, same result.
    import shardkit.pipeline.llama as llama
    real = llama.sdpa_with_lse

    def refusing(q, k, v, *, backend, **kw):
        if backend == "cudnn":
            raise RuntimeError("cuDNN refuses this shape")
        return real(q, k, v, backend=backend, **kw)

    monkeypatch.setattr(llama, "sdpa_with_lse", refusing)
    monkeypatch.setattr(llama, "CUDNN_MIN_QUERIES", 1)
    ids = torch.randint(0, SMALL.vocab, (1, 12), generator=torch.Generator().manual_seed(3))
    full = random_weights(SMALL, range(SMALL.layers), True, True, seed=2, dtype=torch.float32)
    st = LlamaStage(SMALL, full, range(SMALL.layers), first=True, last=True, max_tokens=12)
    st.attention_kernels = ("cudnn", "flash")  # as on a GPU
    with pytest.warns(UserWarning, match="cuDNN attention failed"), torch.no_grad():
        got = run_slices([st], ids, (5, 7))
    assert st.attention_kernels == ("flash", "flash")
    assert relative_error(got, reference_logits(SMALL, full, ids)) <= 1e-5
