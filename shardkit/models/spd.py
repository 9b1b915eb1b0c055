"""Sync-Point Drop (SPD, Kim et al. 2025, arXiv 2502.20727) on a Llama: the math in plain torch with
every rank simulated in one process (autograd works, so blocks can be trained), and the tools that
decide where SPD goes and repair the blocks that suffer:

* ``block_forward``    one block, normal or SPD, for any tensor-parallel degree and head placement;
                       the plain-torch reference of ``llama_tp.TPLlama``'s blocks.
* ``SimulatedTP``      the whole model on those blocks: per-block SPD switch, per-block weights
                       (distilled copies) and head placement; ``nll`` for perplexity / agreement.
* ``sensitivity``      per block, the calibration loss increase of a zero-shot SPD of that block alone;
  ``classify``         -> in-sensitive (ISB: drop as is), sensitive (SB: distil), extremely sensitive
                       (ESB: regroup heads, then distil).
* ``distill_block``    block-to-block distillation: train only the SPD block to match the original
                       block's output (MSE) on calibration activations.
* ``head_similarity``  attention-score overlap between query heads, and ``group_heads``: the head
                       placement across ranks that keeps similar heads together (or apart) -- the
                       seed's "head grouping initialization" before distillation of an ESB.

SPD block on rank r of W (X: block input, i.e. the residual stream):
    Y_r = o_r(attention of rank r's heads on RMSNorm_in(X))        (partial: not reduced)
    Z_r = FFN_r(RMSNorm_post(X + Y_r + o_bias))                    (FFN_r: rank r's FFN slice)
    out = X + sum_r (Y_r + Z_r) + o_bias + down_bias               (the block's one all-reduce)
against the normal block's X + Y + FFN(RMSNorm_post(X + Y)), Y = sum_r Y_r.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .checkpoint import LayerWeights, LlamaConfig, LlamaWeights
from .llama_tp import HeadGroups, check_head_groups, contiguous_head_groups, rope_tables


# ---------------------------------------------------------------------------------------------- forward
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, hd] rotated by cos/sin [T, hd] (rotate-half convention, as Hugging Face Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def attention_heads(config: LlamaConfig, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of every query head on the block input ``x`` [B, T, hidden]:
    per-head outputs [B, T, heads, hd] (before o_proj)."""
    batch, length, _ = x.shape
    hd, nq, nkv = config.head_dim, config.num_heads, config.num_kv_heads
    n = _rms(x, layer.input_norm, config.rms_norm_eps)
    q = _linear(n, layer.q, layer.q_bias).view(batch, length, nq, hd).transpose(1, 2)
    k = _linear(n, layer.k, layer.k_bias).view(batch, length, nkv, hd).transpose(1, 2)
    v = _linear(n, layer.v, layer.v_bias).view(batch, length, nkv, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def _ffn(config: LlamaConfig, layer: LayerWeights, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """FFN (or its slice ``rows`` of the FFN dimension, without the down bias) on RMSNorm'ed ``x``."""
    gate = _linear(x, layer.gate[rows], None if layer.gate_bias is None else layer.gate_bias[rows])
    up = _linear(x, layer.up[rows], None if layer.up_bias is None else layer.up_bias[rows])
    return F.linear(F.silu(gate) * up, layer.down[:, rows])


def block_forward(config: LlamaConfig, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  *, spd: bool = False, world: int = 1, heads: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """One block on the residual stream ``x`` [B, T, hidden] (positions 0..T-1; cos/sin [T, hd]).

    spd: the Sync-Point Drop form for tensor-parallel degree ``world`` with query ``heads[r]`` on rank r
    (default contiguous); the normal block does not depend on ``world`` or ``heads``.
    """
    hd, eps = config.head_dim, config.rms_norm_eps
    attn = attention_heads(config, layer, x, cos, sin)  # [B, T, heads, hd]
    biases = [b for b in (layer.o_bias, layer.down_bias) if b is not None]
    if not spd:
        h = x + _linear(attn.flatten(-2), layer.o, layer.o_bias)
        out = h + _ffn(config, layer, _rms(h, layer.post_norm, eps))
        return out + layer.down_bias if layer.down_bias is not None else out
    heads = contiguous_head_groups(config, world)[0] if heads is None else heads
    ffn = config.intermediate_size // world
    out = x
    for r, group in enumerate(heads):
        cols = torch.tensor([h * hd + d for h in group for d in range(hd)], device=x.device)
        y = F.linear(attn[:, :, list(group)].flatten(-2), layer.o[:, cols])
        local = x + y if layer.o_bias is None else x + y + layer.o_bias
        z = _ffn(config, layer, _rms(local, layer.post_norm, eps), slice(r * ffn, (r + 1) * ffn))
        out = out + (y + z)
    for b in biases:
        out = out + b
    return out


@dataclasses.dataclass
class SPDPlan:
    """Where SPD goes and with what: per block, the switch, the weights (None: the original ones)
    and the head placement (None: contiguous)."""
    spd: list[bool]
    layers: list[LayerWeights | None]
    heads: list[list[list[int]] | None]

    @classmethod
    def none(cls, num_layers: int) -> "SPDPlan":
        return cls([False] * num_layers, [None] * num_layers, [None] * num_layers)

    def head_groups(self, config: LlamaConfig, world: int) -> HeadGroups:
        """Per-layer head placement for ``shard_llama`` (contiguous where unset)."""
        default = contiguous_head_groups(config, world)
        return [default[i] if h is None else h for i, h in enumerate(self.heads)]

    def weights(self, base: LlamaWeights) -> LlamaWeights:
        """``base`` with the plan's replacement blocks in place (for ``shard_llama``)."""
        return dataclasses.replace(base, layers=[new if new is not None else old
                                                 for old, new in zip(base.layers, self.layers)])


class SimulatedTP:
    """The whole model with ``world`` ranks simulated in one process (plain torch, any dtype/device)."""

    def __init__(self, config: LlamaConfig, weights: LlamaWeights, world: int) -> None:
        self.config, self.weights, self.world = config, weights, world
        cos, sin = rope_tables(config, config.max_position_embeddings)
        self.cos, self.sin = cos.to(weights.embed), sin.to(weights.embed)

    def rope(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:length], self.sin[:length]

    def hidden_states(self, tokens: torch.Tensor, plan: SPDPlan | None = None) -> list[torch.Tensor]:
        """The residual stream before every block and after the last one (num_layers + 1 tensors)."""
        plan = plan or SPDPlan.none(self.config.num_layers)
        check_head_groups(self.config, self.world, plan.head_groups(self.config, self.world))
        cos, sin = self.rope(tokens.shape[1])
        x = F.embedding(tokens, self.weights.embed)
        states = [x]
        for i, base in enumerate(self.weights.layers):
            layer = plan.layers[i] if plan.layers[i] is not None else base
            x = block_forward(self.config, layer, x, cos, sin, spd=plan.spd[i], world=self.world, heads=plan.heads[i])
            states.append(x)
        return states

    def logits(self, tokens: torch.Tensor, plan: SPDPlan | None = None) -> torch.Tensor:
        x = self.hidden_states(tokens, plan)[-1]
        return F.linear(_rms(x, self.weights.norm, self.config.rms_norm_eps), self.weights.lm_head)

    @torch.no_grad()
    def evaluate(self, sequences: torch.Tensor, plan: SPDPlan | None = None, reference: torch.Tensor | None = None,
                 batch: int = 8) -> dict:
        """Next-token loss over ``sequences`` [N, T]: {"nll": mean nats/token, "ppl", "tokens", "argmax"
        ([N, T-1] predicted ids), "agreement": fraction of positions whose prediction equals
        ``reference``'s (when given)}."""
        total, count, preds = 0.0, 0, []
        for lo in range(0, sequences.shape[0], batch):
            seq = sequences[lo:lo + batch]
            logits = self.logits(seq[:, :-1], plan).float()
            total += F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten(), reduction="sum").item()
            count += seq[:, 1:].numel()
            preds.append(logits.argmax(-1))
        argmax = torch.cat(preds)
        result = {"nll": total / count, "ppl": math.exp(total / count), "tokens": count, "argmax": argmax}
        if reference is not None:
            result["agreement"] = (argmax == reference).float().mean().item()
        return result


# ---------------------------------------------------------------------------------------------- sensitivity
def sensitivity(model: SimulatedTP, calibration: torch.Tensor, base_nll: float | None = None) -> list[float]:
    """Per block: calibration NLL with that block alone zero-shot SPD minus the NLL without SPD."""
    n = model.config.num_layers
    base_nll = model.evaluate(calibration)["nll"] if base_nll is None else base_nll
    out = []
    for i in range(n):
        plan = SPDPlan.none(n)
        plan.spd[i] = True
        out.append(model.evaluate(calibration, plan)["nll"] - base_nll)
    return out


def classify(delta_nll: Sequence[float], isb_max: float, sb_max: float) -> list[str]:
    """"ISB" where the zero-shot loss increase is <= isb_max nats/token, "SB" where <= sb_max, else "ESB"."""
    return ["ISB" if d <= isb_max else "SB" if d <= sb_max else "ESB" for d in delta_nll]


# ---------------------------------------------------------------------------------------------- distillation
def block_io(model: SimulatedTP, calibration: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
    """The original model's residual stream on ``calibration`` [N, T]: num_layers + 1 tensors [N, T, hidden];
    block i maps states[i] to states[i + 1]."""
    chunks = []
    with torch.no_grad():
        for lo in range(0, calibration.shape[0], batch):
            chunks.append(model.hidden_states(calibration[lo:lo + batch]))
    return [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def distill_block(config: LlamaConfig, layer: LayerWeights, inputs: torch.Tensor, targets: torch.Tensor, *,
                  world: int, heads: Sequence[Sequence[int]] | None = None, steps: int = 200, lr: float = 1e-4,
                  batch: int = 4, seed: int = 0,
                  log: Callable[[int, float], None] | None = None) -> tuple[LayerWeights, list[float]]:
    """Block-to-block distillation: train a copy of ``layer`` as an SPD block (degree ``world``, query
    ``heads`` per rank) to map ``inputs`` [N, T, hidden] to the original block's ``targets`` (MSE).

    Adam on every weight of the block, ``batch`` sequences per step drawn with ``seed``. Returns the
    trained copy and the loss per step, relative to the targets' mean square residual update (so 1.0
    means "as wrong as predicting no update"). The original ``layer`` is not modified.
    """
    student = layer.map(lambda t: t.detach().clone().float().requires_grad_(True))
    params = list(student.tensors().values())
    opt = torch.optim.Adam(params, lr=lr)
    cos, sin = (t.to(inputs) for t in rope_tables(config, inputs.shape[1]))
    scale = (targets - inputs).pow(2).mean().item()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, inputs.shape[0], (batch,), generator=gen)
        out = block_forward(config, student, inputs[idx], cos, sin, spd=True, world=world, heads=heads)
        loss = F.mse_loss(out, targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item() / scale)
        if log is not None:
            log(step, losses[-1])
    return student.map(lambda t: t.detach().to(layer.q.dtype)), losses


# ---------------------------------------------------------------------------------------------- head grouping
@torch.no_grad()
def head_similarity(config: LlamaConfig, layer: LayerWeights, inputs: torch.Tensor) -> torch.Tensor:
    """[heads, heads] mean overlap of the heads' attention distributions on block ``inputs`` [N, T, hidden]:
    for each query position, sum_j min(p_h[j], p_g[j]) (1 - total variation distance; 1 = identical
    scores), averaged over positions and sequences."""
    hd, nq, nkv = config.head_dim, config.num_heads, config.num_kv_heads
    batch, length, _ = inputs.shape
    cos, sin = (t.to(inputs) for t in rope_tables(config, length))
    n = _rms(inputs, layer.input_norm, config.rms_norm_eps)
    q = apply_rope(_linear(n, layer.q, layer.q_bias).view(batch, length, nq, hd).transpose(1, 2), cos, sin)
    k = apply_rope(_linear(n, layer.k, layer.k_bias).view(batch, length, nkv, hd).transpose(1, 2), cos, sin)
    k = k.repeat_interleave(nq // nkv, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [B, heads, T, T]
    sim = torch.empty(nq, nq, dtype=torch.float64)
    for h in range(nq):
        overlap = torch.minimum(probs[:, h:h + 1], probs).sum(-1)  # [B, heads, T]
        sim[h] = overlap.mean(dim=(0, 2)).double()
    return sim


def balanced_partitions(items: Sequence[int], parts: int) -> Iterable[list[list[int]]]:
    """Every split of ``items`` into ``parts`` groups of equal size, groups ordered by their first item."""
    items = list(items)
    if parts == 1:
        yield [items]
        return
    size = len(items) // parts
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        group = [first, *others]
        remaining = [i for i in rest if i not in others]
        for tail in balanced_partitions(remaining, parts - 1):
            yield [group, *tail]


def group_heads(similarity: torch.Tensor, world: int, together: bool = True) -> list[list[int]]:
    """The placement of query heads on ``world`` ranks (equal groups) that maximises (``together``) or
    minimises the summed similarity of heads sharing a rank; exhaustive over balanced partitions
    (35 for 8 heads on 2 ranks, 105 on 4). Groups are sorted, rank order by first head."""
    heads = similarity.shape[0]
    if heads % world:
        raise ValueError(f"group_heads: {heads} heads do not split over {world} ranks")

    def score(partition: list[list[int]]) -> float:
        return sum(float(similarity[a, b]) for g in partition for a, b in itertools.combinations(g, 2))

    pick = max if together else min
    return pick(balanced_partitions(range(heads), world), key=score)
