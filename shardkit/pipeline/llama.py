"""A plain Llama stage: a contiguous run of decoder layers with its own KV cache.

The pipeline runtime gives each process one ``LlamaStage``; the single-device model is the stage
that holds every layer (``first=True, last=True``). It reads Hugging Face Llama checkpoints
(``config.json`` + ``model.safetensors``) without transformers, or makes random weights of any
Llama shape for timings. Semantics follow HF's ``LlamaForCausalLM``: RMSNorm in fp32 then cast,
rotate-half RoPE, grouped-query attention, SwiGLU, tied or separate LM head.

A stage is called slice by slice: ``forward(x, start)`` runs the tokens at positions
``start .. start + s - 1``; their keys and values go into the cache, and their queries see every
cached key before them (a causal mask aligned to the bottom right of the ``[s, start + s]`` score
block). Prefill in one call, prefill in slices, and decode (``s = 1``) are the same call.

Attention of a slice is two standard blocks merged by their log-sum-exp (as ring attention merges
chunks, ``shardkit.kernels.attention``): the slice's own keys, a square causal block, and the
cached prefix, fully visible. Both are shapes the fast kernels take as they are; the bottom-right
causal mask of the whole ``[s, start + s]`` block is not: torch sends it to FlashAttention-2 only
(about 320 TFLOP/s on an H200, where cuDNN's kernel runs the same work at about 600). The block
kernel (``ATTENTION_KERNELS``): ``"cudnn"`` for CUDA fp16/bf16 slices of ``CUDNN_MIN_QUERIES`` or
more tokens (cuDNN builds an execution plan per shape, cached; decode steps meet a new key length
every token, so short query blocks go to ``"flash"``), ``"flash"`` (FlashAttention-2 on CUDA, torch's
flash kernel on the CPU), or ``"math"`` (plain torch in fp32: CUDA fp32, where no kernel returns
the log-sum-exp, and head dims other than ``SUPPORTED_HEAD_DIMS``).

Shapes: ``x`` is ``[B, s]`` int64 token ids on the first stage, else hidden states
``[B, s, hidden]``; the output is hidden states, or logits ``[B, s, vocab]`` on the last stage.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from ..kernels.attention.chunk import SUPPORTED_HEAD_DIMS
from ..kernels.attention.sdpa import sdpa_backends, sdpa_with_lse
from ..models.checkpoint import read_safetensors

__all__ = ["LlamaConfig", "read_safetensors", "checkpoint_weights", "random_weights", "weight_names", "LlamaStage"]


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a Llama model (names as in HF's ``config.json`` where they differ)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rope_theta: float = 10000.0
    eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"LlamaConfig: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")

    @classmethod
    def from_hf(cls, path: str) -> "LlamaConfig":
        """Read a HF ``config.json`` (``path``: the file or its folder)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            c = json.load(f)
        if c.get("model_type", "llama") != "llama":
            raise ValueError(f"{path}: model_type must be 'llama', got {c.get('model_type')!r}")
        rope = c.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or c.get("rope_scaling"):
            raise ValueError(f"{path}: only the default RoPE is supported, got {rope or c.get('rope_scaling')}")
        heads = c["num_attention_heads"]
        return cls(vocab=c["vocab_size"], hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                   kv_heads=c.get("num_key_value_heads", heads),
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, ffn=c["intermediate_size"],
                   rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                   eps=float(c.get("rms_norm_eps", 1e-5)), tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def weight_names(config: LlamaConfig, layers: range, first: bool, last: bool) -> List[str]:
    """HF parameter names a stage holding ``layers`` needs."""
    names = []
    if first or (last and config.tie_embeddings):
        names.append("model.embed_tokens.weight")
    for i in layers:
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    if last:
        names.append("model.norm.weight")
        if not config.tie_embeddings:
            names.append("lm_head.weight")
    return names


def checkpoint_weights(folder: str, config: LlamaConfig, layers: range, first: bool, last: bool
                       ) -> Dict[str, torch.Tensor]:
    """A stage's weights from a HF checkpoint folder (one ``model.safetensors``)."""
    return read_safetensors(os.path.join(folder, "model.safetensors"), weight_names(config, layers, first, last))


def _shapes(config: LlamaConfig) -> Dict[str, tuple]:
    c = config
    return {"input_layernorm": (c.hidden,), "post_attention_layernorm": (c.hidden,),
            "self_attn.q_proj": (c.heads * c.head_dim, c.hidden), "self_attn.k_proj": (c.kv_heads * c.head_dim, c.hidden),
            "self_attn.v_proj": (c.kv_heads * c.head_dim, c.hidden), "self_attn.o_proj": (c.hidden, c.heads * c.head_dim),
            "mlp.gate_proj": (c.ffn, c.hidden), "mlp.up_proj": (c.ffn, c.hidden), "mlp.down_proj": (c.hidden, c.ffn)}


def random_weights(config: LlamaConfig, layers: range, first: bool, last: bool, *, seed: int = 0,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """Random weights for a stage, made on ``device``: layer ``i`` draws from a generator seeded with
    ``seed + i + 1`` (embedding and head from ``seed``), so any split of the layers into stages gives
    the same model. Matrices ~ N(0, 1/fan_in) (activations keep their scale through the layers),
    norm weights ~ 1 + N(0, 0.1)."""
    device = torch.device(device)

    def draw(gen: torch.Generator, shape: tuple) -> torch.Tensor:
        if len(shape) == 1:
            return (1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)).to(dtype)
        return (torch.randn(shape, generator=gen, device=device) * shape[1] ** -0.5).to(dtype)

    out: Dict[str, torch.Tensor] = {}
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    embed = draw(gen, (config.vocab, config.hidden))
    norm = draw(gen, (config.hidden,))
    head = draw(gen, (config.vocab, config.hidden)) if not config.tie_embeddings else None
    if first or (last and config.tie_embeddings):
        out["model.embed_tokens.weight"] = embed
    if last:
        out["model.norm.weight"] = norm
        if head is not None:
            out["lm_head.weight"] = head
    for i in layers:
        gen.manual_seed(seed + i + 1)
        for name, shape in _shapes(config).items():
            out[f"model.layers.{i}.{name}.weight"] = draw(gen, shape)
    return out


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF: normalise in fp32, cast back, then scale (the order matters for bf16 equality).
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


ATTENTION_KERNELS = ("auto", "cudnn", "flash", "math")
CUDNN_MIN_QUERIES = 64


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` ``[B, H, s, D]`` to ``k``, ``v`` ``[B, Hkv, L, D]`` in fp32 (``causal``: ``s == L``,
    key ``j`` visible to query ``i`` iff ``j <= i``). Returns ``out`` ``[B, H, s, D]`` in q's dtype and
    the fp32 log-sum-exp ``[B, H, s]`` of the scaled scores."""
    B, H, s, D = q.shape
    qg = q.float().unflatten(1, (k.shape[1], H // k.shape[1]))  # [B, Hkv, G, s, D]: a q head reads its kv head
    scores = (qg @ k.float()[:, :, None].transpose(-1, -2)) * D ** -0.5  # [B, Hkv, G, s, L]
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    out = (scores - lse[..., None]).exp() @ v.float()[:, :, None]
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def _merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each one's ``(out, lse)``: the softmax
    weights of the two parts are ``exp(lse_a - lse)`` and ``exp(lse_b - lse)`` with ``lse`` their
    log-add-exp, i.e. ``w_b = sigmoid(lse_b - lse_a)`` and ``w_a = 1 - w_b``, so the merged output is
    ``out_a + w_b (out_b - out_a)`` (one ``lerp``). Both parts see at least one key here (the slice
    sees itself), so no ``lse`` is ``-inf``."""
    w_b = torch.sigmoid(lse_b - lse_a).unsqueeze(-1)
    return torch.lerp(out_a, out_b, w_b.to(out_a.dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _Layer:
    ln1: torch.Tensor   # [hidden]
    wqkv: torch.Tensor  # [(heads + 2 kv_heads) head_dim, hidden]: q, k, v projections in one matmul
    wo: torch.Tensor    # [hidden, heads head_dim]
    ln2: torch.Tensor   # [hidden]
    wgu: torch.Tensor   # [2 ffn, hidden]: gate and up in one matmul
    wdown: torch.Tensor  # [hidden, ffn]


class LlamaStage:
    """Decoder layers ``layers`` of a Llama model, with the embedding if ``first`` and the final
    norm + LM head if ``last``, and a KV cache of ``max_tokens`` positions for ``batch`` sequences.

    Args:
        config: the model's shape.
        weights: HF-named tensors (``checkpoint_weights`` / ``random_weights``); at least this
            stage's (``weight_names``). Copied to ``device`` in ``dtype``; the caller's are untouched.
        layers: the contiguous decoder layers of this stage, e.g. ``range(0, 4)``.
        first, last: whether the stage takes token ids / produces logits.
        device, dtype: where and in what precision the stage computes (also its KV cache and output).
        max_tokens: KV cache length (prompt + generated tokens).
        batch: sequences per call.
        attention: the kernel of the two attention blocks (module docstring): ``"auto"`` (the
            fastest this device and dtype have), or ``"cudnn"``, ``"flash"``, ``"math"`` to force one.
    """

    def __init__(self, config: LlamaConfig, weights: Dict[str, torch.Tensor], layers: range, *, first: bool,
                 last: bool, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_tokens: int, batch: int = 1, attention: str = "auto") -> None:
        if not isinstance(layers, range) or layers.step != 1 or not (0 <= layers.start <= layers.stop <= config.layers):
            raise ValueError(f"layers must be a contiguous range within 0..{config.layers}, got {layers!r}")
        if max_tokens < 1 or batch < 1:
            raise ValueError(f"max_tokens and batch must be >= 1, got max_tokens={max_tokens}, batch={batch}")
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
        missing = [n for n in weight_names(config, layers, first, last) if n not in weights]
        if missing:
            raise KeyError(f"weights lack {len(missing)} tensors this stage needs, e.g. {missing[0]!r}")
        shapes = _shapes(config)
        for i in layers:
            for name, shape in shapes.items():
                got = tuple(weights[f"model.layers.{i}.{name}.weight"].shape)
                if got != shape:
                    raise ValueError(f"weight model.layers.{i}.{name}.weight has shape {got}, config says {shape}")
        self.config, self.layers, self.first, self.last = config, layers, first, last
        self.device, self.dtype, self.max_tokens, self.batch = torch.device(device), dtype, max_tokens, batch
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current device, by index
            self.device = torch.device("cuda", torch.cuda.current_device())
        available = sdpa_backends(self.device, dtype) if config.head_dim in SUPPORTED_HEAD_DIMS else ()
        if attention not in ("auto", "math") and attention not in available:
            raise ValueError(f"attention={attention!r} is not available for {dtype} on {self.device} "
                             f"(available: {available + ('math',)})")
        # (kernel of slices of CUDNN_MIN_QUERIES tokens or more, of shorter ones): what the stage runs
        self.attention_kernels = (attention, attention) if attention != "auto" else \
            ("cudnn" if "cudnn" in available else "flash" if "flash" in available else "math",
             "flash" if "flash" in available else "math")  # (long query blocks, short ones)

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=self.device, dtype=dtype)

        self._layers: List[_Layer] = []
        for i in layers:
            p = f"model.layers.{i}."
            self._layers.append(_Layer(
                ln1=w(p + "input_layernorm.weight"),
                wqkv=torch.cat([w(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
                wo=w(p + "self_attn.o_proj.weight"),
                ln2=w(p + "post_attention_layernorm.weight"),
                wgu=torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]),
                wdown=w(p + "mlp.down_proj.weight")))
        self.embed = w("model.embed_tokens.weight") if first else None
        if last:
            self.norm = w("model.norm.weight")
            self.head = w("model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight")
        c = config
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        angles = torch.outer(torch.arange(max_tokens, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # [max_tokens, head_dim]: the rotate-half layout
        self._cos = angles.cos().to(device=self.device, dtype=dtype)
        self._sin = angles.sin().to(device=self.device, dtype=dtype)
        cache_shape = (batch, c.kv_heads, max_tokens, c.head_dim)
        self._k = [torch.zeros(cache_shape, device=self.device, dtype=dtype) for _ in layers]
        self._v = [torch.zeros(cache_shape, device=self.device, dtype=dtype) for _ in layers]
        self.length = 0  # positions of the cache filled so far

    @property
    def out_features(self) -> int:
        """Last dim of the output: vocab on the last stage, else hidden."""
        return self.config.vocab if self.last else self.config.hidden

    def reset(self) -> None:
        """Forget the cached sequence (the next call must start at position 0)."""
        self.length = 0

    def forward(self, x: torch.Tensor, start: int, head: bool = True) -> torch.Tensor:
        """Run the tokens at positions ``start .. start + s - 1`` through this stage.

        ``start`` must equal the number of positions cached so far (slices arrive in order);
        ``start = 0`` starts a new sequence. Returns new ``[B, s, hidden]`` hidden states or, on
        the last stage with ``head`` (default), ``[B, s, vocab]`` logits (``head=False`` skips the
        LM head for slices whose logits nobody reads and returns the hidden states).
        """
        if self.first:
            if x.dtype != torch.int64 or x.dim() != 2:
                raise ValueError(f"x: the first stage takes int64 token ids [B, s], got {x.dtype} {tuple(x.shape)}")
        elif x.dim() != 3 or x.shape[-1] != self.config.hidden or x.dtype != self.dtype:
            raise ValueError(f"x: hidden states [B, s, {self.config.hidden}] in {self.dtype} expected, "
                             f"got {x.dtype} {tuple(x.shape)}")
        if x.shape[0] != self.batch or x.shape[1] < 1 or x.device != self.device:
            raise ValueError(f"x: batch {self.batch}, >= 1 token, on {self.device} expected, "
                             f"got shape {tuple(x.shape)} on {x.device}")
        s = x.shape[1]
        if start not in (0, self.length):
            raise ValueError(f"start must be 0 or the cached length {self.length}, got {start}")
        if start + s > self.max_tokens:
            raise ValueError(f"positions {start}..{start + s - 1} exceed the KV cache of {self.max_tokens} tokens")
        h = F.embedding(x, self.embed) if self.first else x
        cos, sin = self._cos[start:start + s], self._sin[start:start + s]
        for layer, k_cache, v_cache in zip(self._layers, self._k, self._v):
            h = self._layer(layer, h, cos, sin, k_cache, v_cache, start)
        self.length = start + s
        return self.logits(h) if self.last and head else h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and LM head (last stage only): ``[B, s, hidden]`` -> ``[B, s, vocab]``."""
        if not self.last:
            raise ValueError("logits: only the last stage holds the LM head")
        return _rms_norm(h, self.norm, self.config.eps) @ self.head.T

    def _layer(self, w: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, start: int) -> torch.Tensor:
        c = self.config
        B, s, _ = h.shape
        end = start + s
        qkv = (_rms_norm(h, w.ln1, c.eps) @ w.wqkv.T).view(B, s, c.heads + 2 * c.kv_heads, c.head_dim).transpose(1, 2)
        qk = _rotate(qkv[:, :c.heads + c.kv_heads], cos, sin)  # q and k heads in one chain of kernels
        q = qk[:, :c.heads]
        k_cache[:, :, start:end] = qk[:, c.heads:]
        v_cache[:, :, start:end] = qkv[:, c.heads + c.kv_heads:]
        attn = self._attention(q, k_cache, v_cache, start, end)
        h = h + attn.transpose(1, 2).reshape(B, s, c.heads * c.head_dim) @ w.wo.T
        gate, up = (_rms_norm(h, w.ln2, c.eps) @ w.wgu.T).chunk(2, dim=-1)
        return h + (F.silu(gate) * up) @ w.wdown.T

    def _attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, end: int
                   ) -> torch.Tensor:
        """``q`` ``[B, H, s, D]`` at positions ``start..end-1`` over the cached keys ``0..end-1``: the
        square causal block of the slice's own keys, merged with the fully visible prefix."""
        kernel = self.attention_kernels[0 if end - start >= CUDNN_MIN_QUERIES else 1]
        try:
            out, lse = self._block(kernel, q, k_cache[:, :, start:end], v_cache[:, :, start:end], causal=True)
            if start:
                out_p, lse_p = self._block(kernel, q, k_cache[:, :, :start], v_cache[:, :, :start], causal=False)
                out = _merge(out, lse, out_p, lse_p)
        except RuntimeError as e:
            if kernel != "cudnn" or isinstance(e, torch.OutOfMemoryError):
                raise
            # A cuDNN that refuses these shapes or strides: flash from now on, said once.
            warnings.warn(f"LlamaStage: cuDNN attention failed ({str(e).splitlines()[0][:200]}); using flash")
            self.attention_kernels = tuple("flash" if k == "cudnn" else k for k in self.attention_kernels)
            return self._attention(q, k_cache, v_cache, start, end)
        return out

    @staticmethod
    def _block(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        if kernel == "math":
            return _math_attention(q, k, v, causal)
        # The model's activations hold no NaN to place exactly: skip sdpa_with_lse's NaN bookkeeping.
        return sdpa_with_lse(q, k, v, causal=causal, backend=kernel, nan_exact=False)
