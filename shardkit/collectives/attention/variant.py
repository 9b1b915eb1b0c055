"""Choosing pass-KV or pass-Q for ring attention: a measured threshold, or Meta's cost model.

Meta (arXiv 2411.01783, Algorithm 1, with the all-to-all term of Algorithm 5) picks the ring
variant from a cost model of one ring step. Per rank, with ``N`` ranks, ``T`` new and ``P``
cached tokens over the group, ``Hq``/``Hkv`` heads, head dim ``D`` and ``e`` bytes per element:

* compute of one chunk pair (the same in both variants):  ``4 (T/N) ((T+P)/N) Hq D / C``, or
  with a causal mask ``4 (T P + T^2 / 2) / N^2 Hq D / C`` (every new query sees every cached key
  and, on average, half of the new ones)
* pass-KV transfer per step (keys and values of a shard): ``2 ((T+P)/N) Hkv D e / BW``
* pass-Q transfer per step (queries of a shard):          ``(T/N) Hq D e / BW``
* pass-Q's all-to-all of partial outputs and LSEs after the ring, not overlapped (Algorithm 5):
  ``((N-1)/N) (T/N) Hq (D e + 4) / BW``

A ring of ``N`` steps overlaps each transfer with a compute step, so it takes
``compute + (N-1) max(compute, transfer)`` (+ the all-to-all for pass-Q). Pass-KV's transfer is
hidden once ``T >= N C Hkv e / (2 Hq BW)`` (Algorithm 1's first test, independent of ``P``;
without a mask, and about so with one when ``P >> T``);
below that, pass-Q wins when its smaller exposed transfer outweighs the all-to-all, i.e.
roughly when the miss rate ``T / (T + P)`` is below ``2 Hkv / Hq`` (Algorithm 1's second test).

Meta's paper plugs datasheet numbers into ``C`` and ``BW``; here they are *measured*:
``C`` is the local attention kernel's TFLOP/s (``bench/attention_chunk_bench.py
--write-thresholds``) and ``BW`` one ring step's NCCL P2P rate (``bench/ring_transfer_bench.py
--write-thresholds``), stored per GPU in ``thresholds.json`` under ``"ring_model"``.

The model ignores what a transfer costs the compute it overlaps (NCCL takes SMs and HBM
bandwidth): on 2xH200 at 128K tokens, the measured sweep found pass-Q faster up to a 20% miss
rate although the model calls pass-KV's transfer hidden from 1% on. So ``ring_attention``'s
``auto`` uses, in order: a crossover measured by ``bench/ring_attention_bench.py
--write-thresholds`` for this GPU and group size; else this model with the GPU's measured
costs; else Meta's published 5% miss rate.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RingCosts", "predicted_ms", "choose_variant_by_model"]


@dataclass(frozen=True)
class RingCosts:
    """Measured rates of one GPU model: the local attention kernel and one ring step's transfer."""

    attention_tflops: float  # achieved TFLOP/s of the local chunk kernel (bf16)
    p2p_gbps: float          # achieved GB/s of one ring step (each rank sends to the next)

    def __post_init__(self) -> None:
        for name in ("attention_tflops", "p2p_gbps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"RingCosts.{name} must be a positive number, got {v!r}")


def predicted_ms(variant: str, new_tokens: int, cached_tokens: int, world: int, q_heads: int, kv_heads: int,
                 head_dim: int, elem_bytes: int, costs: RingCosts, causal: bool = True) -> float:
    """Modelled milliseconds of one ring-attention call (``variant`` "pass_kv" or "pass_q")."""
    if variant not in ("pass_kv", "pass_q"):
        raise ValueError(f"variant must be 'pass_kv' or 'pass_q', got {variant!r}")
    for name, v in (("new_tokens", new_tokens), ("cached_tokens", cached_tokens)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    for name, v in (("world", world), ("q_heads", q_heads), ("kv_heads", kv_heads), ("head_dim", head_dim),
                    ("elem_bytes", elem_bytes)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    flops_s, bytes_s = costs.attention_tflops * 1e12, costs.p2p_gbps * 1e9
    q_tokens, kv_tokens = new_tokens / world, (new_tokens + cached_tokens) / world
    T, P = new_tokens, cached_tokens
    pairs = (T * P + T * T / 2) / world ** 2 if causal else q_tokens * kv_tokens  # visible (query, key) pairs
    compute = 4.0 * pairs * q_heads * head_dim / flops_s
    if variant == "pass_kv":
        transfer, tail = 2.0 * kv_tokens * kv_heads * head_dim * elem_bytes / bytes_s, 0.0
    else:
        transfer = q_tokens * q_heads * head_dim * elem_bytes / bytes_s
        tail = (world - 1) / world * q_tokens * q_heads * (head_dim * elem_bytes + 4) / bytes_s
    return 1e3 * (compute + (world - 1) * max(compute, transfer) + tail)


def choose_variant_by_model(new_tokens: int, cached_tokens: int, world: int, q_heads: int, kv_heads: int,
                            head_dim: int, elem_bytes: int, costs: RingCosts, causal: bool = True) -> str:
    """``"pass_q"`` if the model predicts it strictly faster, else ``"pass_kv"``."""
    args = (new_tokens, cached_tokens, world, q_heads, kv_heads, head_dim, elem_bytes, costs, causal)
    return "pass_q" if predicted_ms("pass_q", *args) < predicted_ms("pass_kv", *args) else "pass_kv"
