"""A Mixtral-architecture MoE language model in plain torch, without transformers: the checkpoint
reader, the decoder (GQA attention with RoPE and a KV cache) and a pluggable MoE block.

    config, weights = load_mixtral("../shared/models/tiny-moe-pycode", dtype=torch.float32)
    model = Mixtral(config, weights)                 # every expert in this process (LocalMoE)
    cache = model.new_cache(batch=2, max_len=64)
    logits = model.forward(tokens, cache, start=0)   # prefill: tokens [B, S] -> logits [B, S, vocab]
    logits = model.forward(next_ids, cache, start=S) # decode: [B, 1]

The MoE step of every layer goes through ``model.moe`` (an object with ``__call__(layer, x, router) ->
(out, routing)``): ``LocalMoE`` here, the expert-parallel layer of ``ep.py``, the capacity-factor and
the expert-buffered variants of ``gating.py`` / ``buffering.py``. Attention is the same for all of
them, so the logits of two MoE blocks differ only where their expert math differs.

Routing follows Mixtral (``MixtralTopKRouter``): softmax of the router logits in fp32, the top-k
probabilities, renormalised to sum to 1.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Protocol

import torch

from ...errors import ShardkitError
from ..checkpoint import read_safetensors
from .experts import offsets_of, swiglu_experts


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """The architecture fields of a Mixtral ``config.json`` that the forward pass depends on."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    topk: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_dict(cls, cfg: dict) -> "MixtralConfig":
        """From a parsed ``config.json``; raises ShardkitError for what this code does not run."""
        if cfg.get("model_type") != "mixtral":
            raise ShardkitError(f"load_mixtral: expected model_type 'mixtral', got {cfg.get('model_type')!r}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ShardkitError(f"load_mixtral: hidden_act must be 'silu', got {cfg['hidden_act']!r}")
        if cfg.get("sliding_window") is not None:
            raise ShardkitError(f"load_mixtral: sliding-window attention is not implemented "
                                f"(sliding_window={cfg['sliding_window']})")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ShardkitError(f"load_mixtral: only the default RoPE is implemented, got {rope}")
        heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
        return cls(vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                   intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads), num_experts=int(cfg["num_local_experts"]),
                   topk=int(cfg["num_experts_per_tok"]), rms_norm_eps=float(cfg["rms_norm_eps"]),
                   rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                   max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


@dataclasses.dataclass
class MixtralLayer:
    """One decoder block, Hugging Face layout: q [heads*hd, hidden], k/v [kv_heads*hd, hidden],
    o [hidden, heads*hd], norms [hidden], router [E, hidden]; experts stacked as in transformers 5:
    gate_up [E, 2 * ffn, hidden] (gate rows, then up rows), down [E, hidden, ffn]."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    router: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "MixtralLayer":
        return MixtralLayer(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclasses.dataclass
class MixtralWeights:
    """embed [vocab, hidden], final norm [hidden], lm_head [vocab, hidden] (the embedding when tied)."""
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[MixtralLayer]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "MixtralWeights":
        """A copy on ``device`` in ``dtype`` (a tied head stays tied)."""
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        embed = move(self.embed)
        return MixtralWeights(embed=embed, norm=move(self.norm),
                              lm_head=embed if self.lm_head is self.embed else move(self.lm_head),
                              layers=[layer.map(move) for layer in self.layers])


def load_mixtral(path: str, dtype: torch.dtype = torch.float32) -> tuple[MixtralConfig, MixtralWeights]:
    """Config and full weights (cast to ``dtype``, on the CPU) of the checkpoint folder ``path``
    (``config.json`` + ``model.safetensors``, Mixtral names: ``block_sparse_moe.experts.j.w1/w3/w2``
    = gate/up/down, or the stacked ``mlp.experts.gate_up_proj/down_proj`` of transformers 5)."""
    config_path, weights_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for p in (config_path, weights_path):
        if not os.path.exists(p):
            raise ShardkitError(f"load_mixtral: {p} does not exist (expected a Hugging Face Mixtral folder)")
    with open(config_path) as f:
        config = MixtralConfig.from_dict(json.load(f))
    raw = read_safetensors(weights_path)

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise ShardkitError(f"load_mixtral: {weights_path}: tensor {name!r} missing")
        return raw[name].to(dtype)

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        if f"{p}mlp.experts.gate_up_proj" in raw:  # transformers >= 5 stacked layout
            router, gate_up, down = (take(f"{p}mlp.gate.weight"), take(f"{p}mlp.experts.gate_up_proj"),
                                     take(f"{p}mlp.experts.down_proj"))
        else:
            moe = f"{p}block_sparse_moe."
            router = take(f"{moe}gate.weight")
            experts = range(config.num_experts)
            gate_up = torch.stack([torch.cat([take(f"{moe}experts.{j}.w1.weight"), take(f"{moe}experts.{j}.w3.weight")])
                                   for j in experts])
            down = torch.stack([take(f"{moe}experts.{j}.w2.weight") for j in experts])
        layers.append(MixtralLayer(q=take(f"{p}self_attn.q_proj.weight"), k=take(f"{p}self_attn.k_proj.weight"),
                                   v=take(f"{p}self_attn.v_proj.weight"), o=take(f"{p}self_attn.o_proj.weight"),
                                   input_norm=take(f"{p}input_layernorm.weight"),
                                   post_norm=take(f"{p}post_attention_layernorm.weight"),
                                   router=router.contiguous(), gate_up=gate_up.contiguous(), down=down.contiguous()))
    embed = take("model.embed_tokens.weight")
    head = embed if config.tie_word_embeddings else take("lm_head.weight")
    return config, MixtralWeights(embed=embed, norm=take("model.norm.weight"), lm_head=head, layers=layers)


def random_mixtral(config: MixtralConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> MixtralWeights:
    """Random weights of ``config``'s shapes (std 0.02, norms near 1) for tests and timing."""
    gen = torch.Generator().manual_seed(seed)
    h, f, e, hd = config.hidden_size, config.intermediate_size, config.num_experts, config.head_dim

    def draw(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(h, generator=gen)).to(dtype)

    layers = [MixtralLayer(q=draw(config.num_heads * hd, h), k=draw(config.num_kv_heads * hd, h),
                           v=draw(config.num_kv_heads * hd, h), o=draw(h, config.num_heads * hd), input_norm=norm(),
                           post_norm=norm(), router=draw(e, h, std=0.5), gate_up=draw(e, 2 * f, h), down=draw(e, h, f))
              for _ in range(config.num_layers)]
    embed = draw(config.vocab_size, h, std=1.0)
    head = embed if config.tie_word_embeddings else draw(config.vocab_size, h)
    return MixtralWeights(embed=embed, norm=norm(), lm_head=head, layers=layers)


# ---------------------------------------------------------------- building blocks

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 (or fp64 for fp64 inputs), cast back to x's dtype, times weight (as transformers)."""
    acc = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return weight * (acc * torch.rsqrt(acc.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(config: MixtralConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(positions), head_dim] of the default RoPE (frequencies repeated for both halves)."""
    inv = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64,
                                                   device=positions.device) / config.head_dim)
    angles = positions.to(torch.float64)[:, None] * inv[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, hd] rotated by position (rotate-half convention of transformers)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclasses.dataclass
class Routing:
    """A layer's routing of T tokens: logits [T, E] (fp32), topk_idx [T, K] int64, topk_weights
    [T, K] fp32 (renormalised to sum 1)."""
    logits: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


def route(x: torch.Tensor, router: torch.Tensor, topk: int) -> Routing:
    """Mixtral's router on normalised rows x [T, hidden]: softmax in fp32 (fp64 for fp64 x), top-k,
    renormalise."""
    logits = x @ router.t()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(acc), dim=-1)
    top, idx = torch.topk(probs, topk, dim=-1)
    return Routing(logits=logits.to(acc), topk_idx=idx, topk_weights=top / top.sum(-1, keepdim=True))


class MoEBlock(Protocol):
    """The MoE step of the decoder: ``block(layer_index, x, layer) -> (out, routing)``, x [T, hidden]
    the post-attention-normalised rows, out [T, hidden] the weighted sum of their experts' outputs."""

    def __call__(self, layer_index: int, x: torch.Tensor, layer: MixtralLayer) -> tuple[torch.Tensor, Routing]: ...

    # optional: after_layer(layer_index, h [T, hidden] the residual after the layer, next MixtralLayer),
    # called between layers (SpeculativeEPMoE predicts the next layer's destinations there)


class LocalMoE:
    """Every expert in this process: route, then ``combine_local`` (``backend``: see experts.py)."""

    def __init__(self, topk: int, backend: str = "loop") -> None:
        self.topk, self.backend = topk, backend

    def __call__(self, layer_index: int, x: torch.Tensor, layer: MixtralLayer) -> tuple[torch.Tensor, Routing]:
        routing = route(x, layer.router, self.topk)
        return combine_local(x, routing.topk_idx, routing.topk_weights, layer.gate_up, layer.down,
                             self.backend), routing


def combine_local(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, backend: str = "loop") -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_idx[t, k]}(x[t]) for every token, all experts local:
    ``group_slots``, the experts grouped (``backend``: see experts.py), ``weighted_sum``. Ids < 0
    contribute nothing. No host sync with the grouped_mm backend. x [T, hidden]; gate_up/down stacked
    over all experts. Returns [T, hidden] in x's dtype."""
    order, counts = group_slots(topk_idx, gate_up.shape[0])
    y = swiglu_experts(x[order // topk_idx.shape[1]], gate_up, down, offsets_of(counts), backend)
    return weighted_sum(y, order, topk_idx, topk_weights, x.dtype)


def group_slots(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs sorted by expert (stable: token order within an expert): flat slot
    indices [T*K] and counts per expert [E] (an id < 0 counts as expert 0; ``weighted_sum`` zeroes it)."""
    safe = topk_idx.reshape(-1).clamp(min=0)
    counts = torch.zeros(num_experts, dtype=torch.long, device=safe.device).scatter_add_(0, safe, torch.ones_like(safe))
    return torch.argsort(safe, stable=True), counts  # (bincount would read the max on the host: no graphs)


def weighted_sum(y: torch.Tensor, order: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """Expert outputs y [T*K, hidden] in ``order`` -> per token, sum over slots in k order of weight *
    output, in fp32 (fp64 for fp64), cast to ``dtype``. Slots with id < 0 add nothing."""
    tokens, k = topk_idx.shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.where(topk_idx.reshape(-1) >= 0, topk_weights.reshape(-1).to(acc), 0.0)[order]
    per_slot = torch.empty(tokens * k, y.shape[1], dtype=acc, device=y.device)
    per_slot[order] = y.to(acc) * weight[:, None]
    return per_slot.view(tokens, k, y.shape[1]).sum(1).to(dtype)


# ---------------------------------------------------------------- the model

class KVCache:
    """Per-layer keys and values [B, kv_heads, max_len, head_dim] written at absolute positions."""

    def __init__(self, config: MixtralConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.batch, self.max_len = batch, max_len


class Mixtral:
    """The decoder over a pluggable MoE block (default ``LocalMoE``: all experts here). Runs in the
    weights' dtype and device. ``trace``, when a list, receives one ``(layer, x, routing, h)`` per layer
    and call for the routing studies: x the MoE input rows [B*S, hidden], h the residual stream after
    the layer [B*S, hidden]."""

    def __init__(self, config: MixtralConfig, weights: MixtralWeights, moe: MoEBlock | None = None) -> None:
        if len(weights.layers) != config.num_layers:
            raise ShardkitError(f"Mixtral: weights have {len(weights.layers)} layers, config {config.num_layers}")
        self.config, self.weights = config, weights
        self.moe = moe if moe is not None else LocalMoE(config.topk)
        self.dtype, self.device = weights.embed.dtype, weights.embed.device
        self.trace: list | None = None

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int | torch.Tensor = 0,
                ) -> torch.Tensor:
        """tokens [B, S] int64 at positions start..start+S-1 -> logits [B, S, vocab] (fp32, or fp64).

        Without a cache, attention covers these S tokens (start must be 0). With one, their keys and
        values are written into it and attention covers positions [0, start + S); ``start`` may be a
        0-dim device tensor (decode in a CUDA graph: attention then spans the whole cache, masked)."""
        if tokens.dim() != 2:
            raise ValueError(f"Mixtral.forward: tokens must be [batch, seq], got {tuple(tokens.shape)}")
        b, s = tokens.shape
        if cache is None and not (isinstance(start, int) and start == 0):
            raise ValueError("Mixtral.forward: start > 0 needs a cache")
        if cache is not None:
            if cache.batch != b:
                raise ValueError(f"Mixtral.forward: cache was made for batch {cache.batch}, tokens have {b}")
            if isinstance(start, int) and start + s > cache.max_len:
                raise ValueError(f"Mixtral.forward: positions up to {start + s} exceed the cache ({cache.max_len})")
        cfg, w = self.config, self.weights
        positions = torch.arange(s, device=self.device) + start
        cos, sin = rope_tables(cfg, positions, self.dtype)
        h = w.embed[tokens]
        after_layer = getattr(self.moe, "after_layer", None)  # a block that looks one layer ahead (sts.py)
        for i, layer in enumerate(w.layers):
            h = h + self._attention(i, rms_norm(h, layer.input_norm, cfg.rms_norm_eps), layer, cos, sin, positions,
                                    cache, start)
            x = rms_norm(h, layer.post_norm, cfg.rms_norm_eps).reshape(b * s, cfg.hidden_size)
            out, routing = self.moe(i, x, layer)
            h = h + out.view(b, s, cfg.hidden_size)
            if self.trace is not None:
                self.trace.append((i, x, routing, h.reshape(b * s, cfg.hidden_size)))
            if after_layer is not None and i + 1 < cfg.num_layers:
                after_layer(i, h.reshape(b * s, cfg.hidden_size), w.layers[i + 1])
        h = rms_norm(h, w.norm, cfg.rms_norm_eps)
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        return (h @ w.lm_head.t()).to(acc)

    def _attention(self, i: int, x: torch.Tensor, layer: MixtralLayer, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, cache: KVCache | None, start: int | torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b, s, _ = x.shape
        hd, heads, kv_heads = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = apply_rope((x @ layer.q.t()).view(b, s, heads, hd).transpose(1, 2), cos, sin)
        k = apply_rope((x @ layer.k.t()).view(b, s, kv_heads, hd).transpose(1, 2), cos, sin)
        v = (x @ layer.v.t()).view(b, s, kv_heads, hd).transpose(1, 2)
        if cache is not None:
            cache.k[i].index_copy_(2, positions, k)
            cache.v[i].index_copy_(2, positions, v)
            kv_len = start + s if isinstance(start, int) else cache.max_len
            k, v = cache.k[i][:, :, :kv_len], cache.v[i][:, :, :kv_len]
        key_pos = torch.arange(k.shape[2], device=x.device)
        mask = key_pos[None, :] <= positions[:, None]  # causal; masks the unwritten tail of the cache too
        groups = heads // kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        probs = torch.softmax(scores.to(acc).masked_fill(~mask, float("-inf")), dim=-1).to(x.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, s, heads * hd)
        return out @ layer.o.t()
