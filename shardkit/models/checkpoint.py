"""Reading a Hugging Face ``LlamaForCausalLM`` checkpoint without transformers: ``config.json`` and
``model.safetensors`` (one file or an index of shards), parsed here.

    config, weights = load_llama("path/to/model", dtype=torch.float32)

``weights`` is a ``LlamaWeights``: full (unsharded) tensors in Hugging Face's layout, ``[out, in]``
for linear layers; ``shardkit.models.llama_tp.shard_llama`` cuts it per rank and
``shardkit.models.spd`` trains copies of its blocks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Iterable

import torch

from ..errors import ShardkitError

# safetensors dtype names -> torch dtypes (the ones these checkpoints use)
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture fields of a Llama ``config.json`` that the forward pass depends on."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_dict(cls, cfg: dict) -> "LlamaConfig":
        """From a parsed ``config.json``; raises ShardkitError for architectures this code does not run."""
        arch = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in arch:
            raise ShardkitError(f"load_llama: expected a LlamaForCausalLM checkpoint, got model_type="
                                f"{cfg.get('model_type')!r}, architectures={arch}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ShardkitError(f"load_llama: hidden_act must be 'silu', got {cfg['hidden_act']!r}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ShardkitError(f"load_llama: only the default RoPE is implemented, got rope_type={rope_type!r}")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                   intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads), rms_norm_eps=float(cfg["rms_norm_eps"]),
                   rope_theta=float(theta), max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)))


@dataclasses.dataclass
class LayerWeights:
    """One decoder block, Hugging Face layout: q [heads*hd, hidden], k/v [kv_heads*hd, hidden],
    o [hidden, heads*hd], gate/up [ffn, hidden], down [hidden, ffn], norms [hidden]; biases or None."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """name -> tensor for the fields that are set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def map(self, fn) -> "LayerWeights":
        """A copy with ``fn`` applied to every tensor that is set."""
        return LayerWeights(**{name: fn(t) for name, t in self.tensors().items()})


@dataclasses.dataclass
class LlamaWeights:
    """The whole model: embed [vocab, hidden], final norm [hidden], lm_head [vocab, hidden] (the
    embedding itself when tied), layers."""
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[LayerWeights]

    def to(self, device: torch.device | str) -> "LlamaWeights":
        """A copy on ``device`` (a tied LM head stays the embedding)."""
        embed = self.embed.to(device)
        return LlamaWeights(embed=embed, norm=self.norm.to(device),
                            lm_head=embed if self.lm_head is self.embed else self.lm_head.to(device),
                            layers=[layer.map(lambda t: t.to(device)) for layer in self.layers])


def read_safetensors(path: str, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``names`` (default: all) of a ``.safetensors`` file, as CPU tensors.

    The format is an 8-byte little-endian header length, a JSON header mapping each name to its
    dtype, shape and byte range, then the raw little-endian data; only the requested ranges are read,
    so a pipeline stage loads just its own layers. A name the file lacks raises KeyError.
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        wanted = list(header) if names is None else list(names)
        missing = [n for n in wanted if n not in header]
        if missing:
            raise KeyError(f"{path}: no tensor named {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        tensors = {}
        for name in wanted:
            info = header[name]
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ShardkitError(f"read_safetensors: {path}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            f.seek(8 + header_len + begin)
            data = bytearray(f.read(end - begin))
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(info["shape"])
    return tensors


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return read_safetensors(single)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for name in files:
            tensors.update(read_safetensors(os.path.join(path, name)))
        return tensors
    raise ShardkitError(f"load_llama: {path} has neither model.safetensors nor model.safetensors.index.json")


def load_llama(path: str, dtype: torch.dtype = torch.float32) -> tuple[LlamaConfig, LlamaWeights]:
    """Config and full weights (cast to ``dtype``, on the CPU) of the checkpoint folder ``path``."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ShardkitError(f"load_llama: no config.json in {path!r}")
    with open(config_path) as f:
        config = LlamaConfig.from_dict(json.load(f))
    raw = _read_checkpoint(path)

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise ShardkitError(f"load_llama: {path}: tensor {name!r} missing from the checkpoint")
        return raw[name].to(dtype).contiguous()

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attn = {n: take(f"{p}self_attn.{n}_proj.weight") for n in "qkvo"}
        mlp = {n: take(f"{p}mlp.{n}_proj.weight") for n in ("gate", "up", "down")}
        biases = {}
        if config.attention_bias:
            biases.update({f"{n}_bias": take(f"{p}self_attn.{n}_proj.bias") for n in "qkvo"})
        if config.mlp_bias:
            biases.update({f"{n}_bias": take(f"{p}mlp.{n}_proj.bias") for n in ("gate", "up", "down")})
        layers.append(LayerWeights(**attn, **mlp, input_norm=take(f"{p}input_layernorm.weight"),
                                   post_norm=take(f"{p}post_attention_layernorm.weight"), **biases))
    embed = take("model.embed_tokens.weight")
    head = embed if config.tie_word_embeddings else take("lm_head.weight")
    return config, LlamaWeights(embed=embed, norm=take("model.norm.weight"), lm_head=head, layers=layers)
