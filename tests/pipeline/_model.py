"""The real model of the pipeline tests (tiny-llama-pycode from shared/models), a prompt, and its
float64 reference, computed once per test process."""
from __future__ import annotations

import functools
import os

import pytest
import torch

from shardkit.pipeline.llama import LlamaConfig, LlamaStage, checkpoint_weights

from .reference_llama import reference_logits

MODEL_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "models",
                                          "tiny-llama-pycode"))
PROMPT_TOKENS = 70
NEW_TOKENS = 4

needs_model = pytest.mark.skipif(not os.path.exists(os.path.join(MODEL_DIR, "model.safetensors")),
                                 reason=f"model not found at {MODEL_DIR}")


@functools.lru_cache(maxsize=None)
def config() -> LlamaConfig:
    return LlamaConfig.from_hf(MODEL_DIR)


@functools.lru_cache(maxsize=None)
def weights() -> dict:
    cfg = config()
    return checkpoint_weights(MODEL_DIR, cfg, range(cfg.layers), True, True)


@functools.lru_cache(maxsize=None)
def prompt() -> torch.Tensor:
    """[1, PROMPT_TOKENS] token ids (random, fixed seed; 0 = end of text is avoided)."""
    return torch.randint(1, config().vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1234))


@functools.lru_cache(maxsize=None)
def reference() -> tuple:
    """(float64 logits [1, L, vocab], greedy tokens [1, NEW_TOKENS]) of ``prompt()``.

    Greedy tokens are right iff each is the argmax of the logits at the position before it, given
    the tokens before it; by causality one float64 pass over the prompt and all but the last token
    checks them all. The candidates come from the single-device fp32 stage (with its KV cache),
    and are asserted against that pass.
    """
    cfg, ids = config(), prompt()
    stage = LlamaStage(cfg, weights(), range(cfg.layers), first=True, last=True,
                       max_tokens=ids.shape[1] + NEW_TOKENS)
    with torch.no_grad():
        tokens = [stage.forward(ids, 0)[:, -1:].argmax(dim=-1)]
        for i in range(NEW_TOKENS - 1):
            tokens.append(stage.forward(tokens[-1], ids.shape[1] + i)[:, -1:].argmax(dim=-1))
        tokens = torch.cat(tokens, dim=1)
        logits = reference_logits(cfg, weights(), torch.cat((ids, tokens[:, :-1]), dim=1))
    L = ids.shape[1]
    assert torch.equal(logits[:, L - 1:].argmax(dim=-1), tokens), "fp32 greedy tokens differ from float64's"
    return logits[:, :L], tokens


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (NaN anywhere in got gives inf)."""
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())
