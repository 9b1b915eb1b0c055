"""Models and rank functions shared by the CPU and GPU tests of the tensor-parallel Llama.

Models: the real checkpoint ``tiny-llama-pycode`` (optionally truncated to its first layers; tests
skip where it is absent) and a tiny random Llama with the real one's head layout (8 query heads on
4 KV heads, so TP 2 and 4) and optional biases. Every rank rebuilds the same weights from a spec, so
only small tuples cross process boundaries.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from shardkit import Communicator
from shardkit.models import FusedSync, LocalSync, TPLlama, UnfusedSync, load_llama, shard_llama
from shardkit.models.checkpoint import LayerWeights, LlamaConfig, LlamaWeights

MODEL_DIR = os.environ.get("SHARDKIT_TINY_LLAMA", os.path.join(os.path.dirname(__file__), "..", "..", "..",
                                                                 "shared", "models", "tiny-llama-pycode"))
HAVE_MODEL = os.path.exists(os.path.join(MODEL_DIR, "config.json"))


def tiny_config(bias: bool = False, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=layers, num_heads=8,
                       num_kv_heads=4, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
                       tie_word_embeddings=not bias, attention_bias=bias, mlp_bias=bias)


def random_weights(config: LlamaConfig, seed: int) -> LlamaWeights:
    """Weights scaled like a trained model's (activations of order 1, logits of order a few)."""
    gen = torch.Generator().manual_seed(seed)
    h, hd, f = config.hidden_size, config.head_dim, config.intermediate_size

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    def norm() -> torch.Tensor:
        return 1 + 0.2 * torch.randn(h, generator=gen)

    def bias(n: int, on: bool) -> torch.Tensor | None:
        return 0.1 * torch.randn(n, generator=gen) if on else None

    layers = []
    for _ in range(config.num_layers):
        a, m = config.attention_bias, config.mlp_bias
        layers.append(LayerWeights(
            q=w(config.num_heads * hd, h), k=w(config.num_kv_heads * hd, h), v=w(config.num_kv_heads * hd, h),
            o=w(h, config.num_heads * hd), gate=w(f, h), up=w(f, h), down=w(h, f), input_norm=norm(), post_norm=norm(),
            q_bias=bias(config.num_heads * hd, a), k_bias=bias(config.num_kv_heads * hd, a),
            v_bias=bias(config.num_kv_heads * hd, a), o_bias=bias(h, a), gate_bias=bias(f, m), up_bias=bias(f, m),
            down_bias=bias(h, m)))
    embed = torch.randn(config.vocab_size, h, generator=gen)
    head = embed if config.tie_word_embeddings else w(config.vocab_size, h)
    return LlamaWeights(embed=embed, norm=norm(), lm_head=head, layers=layers)


def build(spec: tuple) -> tuple[LlamaConfig, LlamaWeights]:
    """("real", layers) -> the checkpoint's first ``layers`` blocks (fp32); ("random", bias, seed, layers)."""
    if spec[0] == "real":
        config, weights = load_llama(MODEL_DIR, torch.float32)
        layers = spec[1]
        return dataclasses.replace(config, num_layers=layers), dataclasses.replace(weights, layers=weights.layers[:layers])
    _, bias, seed, layers = spec
    config = tiny_config(bias, layers)
    return config, random_weights(config, seed)


def hf_model(spec: tuple):
    """The same weights in transformers' LlamaForCausalLM (fp32, eval mode): the independent reference."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    config, weights = build(spec)
    hf = LlamaForCausalLM(HFConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias, bos_token_id=0, eos_token_id=None, pad_token_id=None))
    state = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.norm,
             "lm_head.weight": weights.lm_head}
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = layer.input_norm
        state[p + "post_attention_layernorm.weight"] = layer.post_norm
        for name, t in layer.tensors().items():
            short = name.removesuffix("_bias")
            if short in names:
                state[p + names[short] + (".bias" if name.endswith("_bias") else ".weight")] = t
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf.float().eval()


@torch.no_grad()
def hf_greedy(hf, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """Greedy continuation [B, new_tokens] by full forward passes of transformers' model (no generate():
    its end-of-sequence handling would change the argmax)."""
    tokens = torch.tensor(prompts, device=hf.device)
    for _ in range(new_tokens):
        tokens = torch.cat([tokens, hf(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, len(prompts[0]):].cpu()


def device() -> torch.device:
    """This rank's GPU in an NCCL world, else the CPU (gloo worlds and single-process tests)."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def make_sync(kind: str):
    """(sync point, communicator or None) for "fused" | "nccl" (dist.all_reduce + add + rms_norm) | "local"."""
    if kind == "fused":
        comm = Communicator()
        return FusedSync(comm), comm
    if kind == "nccl":
        return UnfusedSync("nccl"), None
    return LocalSync(), None


def tp_forward_chunks(spec: tuple, sync_kind: str, chunks: list[list[list[int]]], spd: list[bool] | None = None,
                      head_groups: list | None = None, dtype_name: str = "float32") -> list[torch.Tensor]:
    """On every rank: build the TP model and run ``forward`` on consecutive chunks of token ids
    ([B, T_c] each, following one another in the KV cache); returns each chunk's logits (CPU, fp32)."""
    config, weights = build(spec)
    rank, world = (dist.get_rank(), dist.get_world_size()) if sync_kind != "local" else (0, 1)
    sync, comm = make_sync(sync_kind)
    try:
        model = TPLlama(config, shard_llama(config, weights, rank, world, head_groups), sync, device=device(),
                        dtype=getattr(torch, dtype_name), spd=spd, max_batch=len(chunks[0]), max_seq=64)
        out, start = [], 0
        with torch.no_grad():
            for chunk in chunks:
                tokens = torch.tensor(chunk, dtype=torch.long, device=device())
                out.append(model.forward(tokens, start).float().cpu())
                start += tokens.shape[1]
    finally:
        if comm is not None:
            comm.close()
    return out


def tp_generate(spec: tuple, sync_kind: str, prompt: list[list[int]], new_tokens: int, graph: bool = False,
                spd: list[bool] | None = None, dtype_name: str = "float32") -> torch.Tensor:
    """On every rank: greedy continuation [B, new_tokens] of ``prompt`` (eager or CUDA-graph decode)."""
    config, weights = build(spec)
    rank, world = dist.get_rank(), dist.get_world_size()
    sync, comm = make_sync(sync_kind)
    try:
        model = TPLlama(config, shard_llama(config, weights, rank, world), sync, device=device(),
                        dtype=getattr(torch, dtype_name), spd=spd, max_batch=len(prompt),
                        max_seq=len(prompt[0]) + new_tokens)
        tokens = model.generate(torch.tensor(prompt, dtype=torch.long, device=device()), new_tokens, graph=graph)
        if comm is not None:
            comm.check()
    finally:
        if comm is not None:
            comm.close()
    return tokens.cpu()


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (NaN anywhere gives NaN, which fails every <= check)."""
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm()).item()
