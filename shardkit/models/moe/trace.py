"""Routing traces: what the router of every layer chose for every token of a text, the input of the
placement, speculative-routing, gating and buffering studies.

    trace = collect_trace(model, sequences)      # sequences: list of [S] int64 token tensors
    trace.topk_idx[l]                            # [N, K] experts of layer l for all N tokens

A token's *destination ranks* under a placement are the ranks holding its top-k experts; with
per-rank deduplication a token travels once to each of them (``copies``).
"""
from __future__ import annotations

import dataclasses

import torch

from .mixtral import Mixtral, rms_norm, route


@dataclasses.dataclass
class RoutingTrace:
    """L layers' routing of N tokens.

    topk_idx      int64 [L, N, K]   experts chosen (descending probability)
    topk_weights  fp32  [L, N, K]   their renormalised weights
    probs         fp32  [L, N, E]   router softmax
    pregate       fp32  [L, N, E]   layer l+1's router softmax applied to the residual stream after
                                    layer l (known one attention block before layer l+1 routes); row
                                    L-1 is zero
    seq           int64 [N]         index of the token's sequence
    nll           fp32  [N]         next-token negative log-likelihood (nan for a sequence's last token)
    """
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    probs: torch.Tensor
    pregate: torch.Tensor
    seq: torch.Tensor
    nll: torch.Tensor

    @property
    def layers(self) -> int:
        return self.topk_idx.shape[0]

    @property
    def tokens(self) -> int:
        return self.topk_idx.shape[1]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[2]

    def select(self, mask: torch.Tensor) -> "RoutingTrace":
        """The tokens where ``mask`` [N] (bool) is true."""
        return RoutingTrace(**{f.name: (getattr(self, f.name)[:, mask] if getattr(self, f.name).dim() == 3
                                        else getattr(self, f.name)[mask]) for f in dataclasses.fields(self)})

    def save(self, path: str) -> None:
        torch.save(dataclasses.asdict(self), path)

    @classmethod
    def load(cls, path: str) -> "RoutingTrace":
        return cls(**torch.load(path))


@torch.no_grad()
def collect_trace(model: Mixtral, sequences: list[torch.Tensor], batch: int = 8) -> RoutingTrace:
    """Run ``model`` over ``sequences`` (equal-length batches are formed from consecutive sequences of
    the same length) and record every layer's routing, the pre-gate of the next layer and the NLL."""
    cfg = model.config
    parts: list[dict[str, torch.Tensor]] = []
    i = 0
    while i < len(sequences):
        n = sequences[i].numel()
        j = i
        while j < len(sequences) and j - i < batch and sequences[j].numel() == n:
            j += 1
        tokens = torch.stack(sequences[i:j]).to(model.device)
        model.trace = []
        logits = model.forward(tokens)
        records, model.trace = model.trace, None
        logp = torch.log_softmax(logits.float(), -1)
        nll = torch.full(tokens.shape, float("nan"))
        nll[:, :-1] = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1).cpu()
        pregate = []
        for layer, _, _, h in records[:-1]:
            nxt = model.weights.layers[layer + 1]
            pregate.append(torch.softmax(route(rms_norm(h, nxt.post_norm, cfg.rms_norm_eps), nxt.router,
                                               cfg.topk).logits.float(), -1))
        pregate.append(torch.zeros_like(pregate[0]))
        parts.append({"topk_idx": torch.stack([r.topk_idx for _, _, r, _ in records]).cpu(),
                      "topk_weights": torch.stack([r.topk_weights.float() for _, _, r, _ in records]).cpu(),
                      "probs": torch.stack([torch.softmax(r.logits.float(), -1) for _, _, r, _ in records]).cpu(),
                      "pregate": torch.stack(pregate).cpu(),
                      "seq": torch.arange(i, j).repeat_interleave(n),
                      "nll": nll.reshape(-1)})
        i = j
    return RoutingTrace(**{k: torch.cat([p[k] for p in parts], dim=1 if parts[0][k].dim() == 3 else 0)
                           for k in parts[0]})
