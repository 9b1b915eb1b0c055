"""Sync-Point Drop math and tools (shardkit/models/spd.py) in one process: the SPD block against a
hand-written per-rank float64 reference, head similarity and grouping, distillation, checkpoint reading."""
import dataclasses
import itertools
import json
import os

import pytest
import torch
import torch.nn.functional as F

from shardkit import ShardkitError
from shardkit.models import load_llama
from shardkit.models.checkpoint import LlamaConfig, read_safetensors
from shardkit.models.llama_tp import local_kv_heads, rope_tables
from shardkit.models.spd import (SimulatedTP, SPDPlan, balanced_partitions, block_forward, classify, distill_block,
                                 group_heads, head_similarity, sensitivity)

from .tp_checks import HAVE_MODEL, MODEL_DIR, build, relative_error


def spd_block_reference(config, layer, x, world, heads):
    """float64, written out rank by rank: Y_r from rank r's heads only (each with its own KV head),
    FFN_r on RMSNorm(X + Y_r + o_bias), out = X + sum_r (Y_r + FFN_r) + biases once."""
    L = layer.map(lambda t: t.double())
    x = x.double()
    batch, length, hidden = x.shape
    hd, eps, per_kv = config.head_dim, config.rms_norm_eps, config.num_heads // config.num_kv_heads
    cos, sin = (t.double() for t in rope_tables(config, length))

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    def rot(t):
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    def maybe(b, idx):
        return 0 if b is None else b[idx]

    n = rms(x, L.input_norm)
    out = x.clone()
    ffn = config.intermediate_size // world
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for r in range(world):
        y = torch.zeros_like(x)
        for h in heads[r]:
            qs, ks = slice(h * hd, (h + 1) * hd), slice((h // per_kv) * hd, (h // per_kv + 1) * hd)
            q = rot(n @ L.q[qs].T + maybe(L.q_bias, qs))
            k = rot(n @ L.k[ks].T + maybe(L.k_bias, ks))
            v = n @ L.v[ks].T + maybe(L.v_bias, ks)
            p = (q @ k.transpose(-1, -2) / hd ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
            y = y + (p @ v) @ L.o[:, qs].T
        f = slice(r * ffn, (r + 1) * ffn)
        m = rms(x + y + maybe(L.o_bias, slice(None)), L.post_norm)
        z = (F.silu(m @ L.gate[f].T + maybe(L.gate_bias, f)) * (m @ L.up[f].T + maybe(L.up_bias, f))) @ L.down[:, f].T
        out = out + y + z
    return out + maybe(L.o_bias, slice(None)) + maybe(L.down_bias, slice(None))


@pytest.mark.parametrize("world, heads", [(2, None), (2, [[1, 2, 5, 6], [0, 3, 4, 7]]), (4, None),
                                          (4, [[0, 7], [1, 6], [2, 5], [3, 4]])])
def test_spd_block_matches_per_rank_reference(world, heads):
    config, weights = build(("random", True, 3, 1))
    x = torch.randn(2, 7, config.hidden_size, generator=torch.Generator().manual_seed(world))
    cos, sin = rope_tables(config, 7)
    got = block_forward(config, weights.layers[0], x, cos, sin, spd=True, world=world, heads=heads)
    placed = heads or [list(range(r * 8 // world, (r + 1) * 8 // world)) for r in range(world)]
    ref = spd_block_reference(config, weights.layers[0], x, world, placed)
    assert relative_error(got, ref) <= 1e-6
    normal = block_forward(config, weights.layers[0], x, cos, sin)
    assert relative_error(normal, ref) > 1e-3  # SPD is a different function


def test_one_rank_spd_is_the_normal_block():
    config, weights = build(("random", True, 4, 1))
    x = torch.randn(1, 5, config.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_tables(config, 5)
    a = block_forward(config, weights.layers[0], x, cos, sin, spd=True, world=1)
    b = block_forward(config, weights.layers[0], x, cos, sin)
    assert relative_error(a, b) <= 1e-6


def test_local_kv_heads():
    config = build(("random", False, 0, 1))[0]  # 8 heads on 4 KV heads
    assert local_kv_heads(config, [0, 1, 2, 3]) == [0, 1]
    assert local_kv_heads(config, [2, 3]) == [1]
    assert local_kv_heads(config, [0, 2, 4, 6]) == [0, 1, 2, 3]
    assert local_kv_heads(config, [0, 1, 2, 5]) == [0, 0, 1, 2]  # uneven runs: one KV copy per query head


def test_partitions_and_grouping():
    parts = list(balanced_partitions(range(8), 2))
    assert len(parts) == 35 and len(list(balanced_partitions(range(8), 4))) == 105
    for p in parts:
        assert sorted(sum(p, [])) == list(range(8)) and all(len(g) == 4 for g in p)
    planted = [[0, 3, 5, 6], [1, 2, 4, 7]]
    sim = torch.full((8, 8), 0.1, dtype=torch.float64)
    for g in planted:
        for a, b in itertools.product(g, g):
            sim[a, b] = 0.9
    assert group_heads(sim, 2, together=True) == planted
    apart = group_heads(sim, 2, together=False)
    assert all(len(set(g) & set(planted[0])) == 2 for g in apart)


def test_head_similarity_is_an_overlap():
    config, weights = build(("random", False, 6, 1))
    x = torch.randn(2, 9, config.hidden_size, generator=torch.Generator().manual_seed(1))
    sim = head_similarity(config, weights.layers[0], x)
    assert sim.shape == (8, 8) and torch.isfinite(sim).all()
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(8, dtype=torch.float64))
    assert (sim > 0).all() and (sim <= 1 + 1e-9).all()


def test_distillation_reduces_the_spd_error_and_leaves_the_original():
    config, weights = build(("random", False, 7, 1))
    layer = weights.layers[0]
    before = {k: v.clone() for k, v in layer.tensors().items()}
    gen = torch.Generator().manual_seed(2)
    inputs = torch.randn(8, 12, config.hidden_size, generator=gen)
    cos, sin = rope_tables(config, 12)
    targets = block_forward(config, layer, inputs, cos, sin).detach()
    student, losses = distill_block(config, layer, inputs, targets, world=4, steps=20, lr=3e-3, batch=8)
    assert all(torch.equal(before[k], v) for k, v in layer.tensors().items())
    assert losses[-1] < 0.5 * losses[0], losses
    err = [F.mse_loss(block_forward(config, w, inputs, cos, sin, spd=True, world=4), targets).item()
           for w in (layer, student)]
    assert err[1] < 0.5 * err[0], err


def test_sensitivity_classes_and_plan():
    config, weights = build(("random", False, 8, 2))
    model = SimulatedTP(config, weights, 2)
    seqs = torch.randint(0, config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(3))
    delta = sensitivity(model, seqs)
    assert len(delta) == 2 and all(d == d for d in delta)
    assert classify([0.001, 0.01, 0.1], 0.002, 0.05) == ["ISB", "SB", "ESB"]
    base = model.evaluate(seqs)
    plan = SPDPlan.none(2)
    plan.spd[1] = True
    spd = model.evaluate(seqs, plan, reference=base["argmax"])
    assert abs(spd["nll"] - base["nll"] - delta[1]) < 1e-9 and 0 <= spd["agreement"] <= 1
    assert model.evaluate(seqs, reference=base["argmax"])["agreement"] == 1.0


@pytest.mark.skipif(not HAVE_MODEL, reason=f"no checkpoint at {MODEL_DIR}")
def test_checkpoint_reader():
    config, weights = load_llama(MODEL_DIR, torch.float32)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (8, 512, 8, 4)
    assert config.tie_word_embeddings and weights.lm_head is weights.embed
    assert weights.layers[0].q.shape == (512, 512) and weights.layers[0].k.shape == (256, 512)
    try:
        from safetensors.torch import load_file
    except ImportError:
        return
    ref = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
    mine = read_safetensors(os.path.join(MODEL_DIR, "model.safetensors"))
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ShardkitError, match="no config.json"):
        load_llama(str(tmp_path))
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-5}
    assert LlamaConfig.from_dict(base).head_dim == 4
    for change, text in (({"model_type": "mistral"}, "expected a LlamaForCausalLM"),
                         ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
                         ({"rope_scaling": {"rope_type": "llama3"}}, "only the default RoPE")):
        with pytest.raises(ShardkitError, match=text):
            LlamaConfig.from_dict({**base, **change})
    (tmp_path / "config.json").write_text(json.dumps(base))
    with pytest.raises(ShardkitError, match="neither model.safetensors"):
        load_llama(str(tmp_path))


@pytest.mark.skipif(not HAVE_MODEL, reason=f"no checkpoint at {MODEL_DIR}")
def test_regrouping_changes_nothing_without_spd():
    config, weights = build(("real", 2))
    model = SimulatedTP(config, weights, 2)
    tokens = torch.tensor([[11, 400, 7, 3001, 42, 9]])
    regrouped = SPDPlan([False, False], [None, None], [[[0, 2, 5, 7], [1, 3, 4, 6]], None])
    assert torch.equal(model.logits(tokens), model.logits(tokens, regrouped))
    moved = dataclasses.replace(regrouped, spd=[True, False])
    assert not torch.equal(model.logits(tokens, moved), model.logits(tokens, SPDPlan([True, False], [None] * 2,
                                                                                    [None] * 2)))
