"""An independent float64 Llama forward for the pipeline tests: the whole sequence at once, no KV
cache, explicit masks, HF-named weights. Slow and simple on purpose."""
from __future__ import annotations

import math
from typing import Dict

import torch


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def reference_logits(cfg, weights: Dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """float64 logits ``[B, L, vocab]`` of token ids ``[B, L]``."""
    W = {k: v.to(torch.float64) for k, v in weights.items()}
    B, L = ids.shape
    D, Hq, Hkv = cfg.head_dim, cfg.heads, cfg.kv_heads
    pos = torch.arange(L, dtype=torch.float64)
    freqs = cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos[:, None] * freqs[None, :]                          # [L, D/2]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(t: torch.Tensor) -> torch.Tensor:                   # t: [B, H, L, D], pairs (i, i + D/2)
        a, b = t[..., :D // 2], t[..., D // 2:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    visible = torch.tril(torch.ones(L, L, dtype=torch.bool))
    h = W["model.embed_tokens.weight"][ids]
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        x = _norm(h, W[p + "input_layernorm.weight"], cfg.eps)
        q = (x @ W[p + "self_attn.q_proj.weight"].T).view(B, L, Hq, D).permute(0, 2, 1, 3)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).view(B, L, Hkv, D).permute(0, 2, 1, 3)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(B, L, Hkv, D).permute(0, 2, 1, 3)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        scores = scores.masked_fill(~visible, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v                     # [B, Hq, L, D]
        h = h + att.permute(0, 2, 1, 3).reshape(B, L, Hq * D) @ W[p + "self_attn.o_proj.weight"].T
        x = _norm(h, W[p + "post_attention_layernorm.weight"], cfg.eps)
        g = x @ W[p + "mlp.gate_proj.weight"].T
        u = x @ W[p + "mlp.up_proj.weight"].T
        h = h + (g * torch.sigmoid(g) * u) @ W[p + "mlp.down_proj.weight"].T
    head = W["model.embed_tokens.weight"] if cfg.tie_embeddings else W["lm_head.weight"]
    return _norm(h, W["model.norm.weight"], cfg.eps) @ head.T
