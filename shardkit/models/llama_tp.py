"""A tensor-parallel Llama whose sync points are shardkit's fused all-reduce + residual + RMSNorm,
with Sync-Point Drop (SPD) as a per-block switch.

    config, weights = load_llama(path)                       # shardkit.models.checkpoint
    comm = Communicator(group)
    model = TPLlama(config, shard_llama(config, weights, comm.rank, comm.world_size), FusedSync(comm),
                    device=device, dtype=torch.bfloat16, max_batch=8, max_seq=1024)
    tokens = model.generate(prompt, 64, graph=True)          # greedy; decode replayed as a CUDA graph

Sharding (Megatron style): q/k/v by heads (GQA-aware: a rank holds the KV heads its query heads
read), o by the same heads' input columns; gate/up by FFN rows, down by the same FFN columns;
embeddings, norms and the LM head replicated. Head placement is a per-layer choice (``head_groups``)
so that SPD's head grouping can move heads across ranks; it changes nothing in a normal block.

A block's data flow on rank r (``x`` the RMSNorm'ed input, ``residual`` the replicated stream):

    normal:  y_r = o_r(attn_r(x))              sync: x', h = RMSNorm_post(h + sum y), h = residual + sum y
             f_r = down_r(silu(gate_r x') up_r x')   sync: next x, next residual from (f_r, h)
    SPD:     y_r = o_r(attn_r(x))
             x'_r = RMSNorm_post(residual + y_r)       local, kernels/spd/add_rmsnorm.py, no communication
             s_r = y_r + down_r(silu(gate_r x'_r) up_r x'_r)   (one addmm)
             sync: next x, next residual from (s_r, residual)

so an SPD block has one sync point instead of two; each sync point also applies the residual add and
the next block's (or the final) RMSNorm. Biases of o and down enter the sums once (rank 0 adds them);
an SPD rank's local FFN input includes the o bias (every rank knows it, so ``world=1`` SPD is the
normal block). Every rank ends with bitwise the same logits when the sync point is bitwise equal on every rank
(FusedSync is).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ShardkitError
from ..kernels.attention.decode import decode_attention
from ..kernels.llama import rope_qkv_into_cache, swiglu
from ..kernels.spd import add_rmsnorm
from .checkpoint import LayerWeights, LlamaConfig, LlamaWeights

HeadGroups = list[list[list[int]]]  # [layer][rank] -> the query heads on that rank, ascending


# ---------------------------------------------------------------------------------------------- sharding
def contiguous_head_groups(config: LlamaConfig, world: int) -> HeadGroups:
    """Rank r holds query heads [r * n, (r + 1) * n) in every layer (n = heads / world): the usual split."""
    n = config.num_heads // world
    return [[list(range(r * n, (r + 1) * n)) for r in range(world)] for _ in range(config.num_layers)]


def check_head_groups(config: LlamaConfig, world: int, head_groups: HeadGroups) -> None:
    """Raise ValueError unless every layer splits all query heads into ``world`` equal sorted groups."""
    if len(head_groups) != config.num_layers:
        raise ValueError(f"head_groups: expected one entry per layer ({config.num_layers}), got {len(head_groups)}")
    per_rank = config.num_heads // world
    for i, groups in enumerate(head_groups):
        flat = sorted(h for g in groups for h in g)
        if (len(groups) != world or flat != list(range(config.num_heads))
                or any(len(g) != per_rank or list(g) != sorted(g) for g in groups)):
            raise ValueError(f"head_groups[{i}] must split heads 0..{config.num_heads - 1} into {world} sorted groups "
                             f"of {per_rank}, got {groups}")


def local_kv_heads(config: LlamaConfig, heads: Sequence[int]) -> list[int]:
    """The KV heads a rank holding query ``heads`` stores, in the order its attention reads them.

    Query head h reads KV head h // (heads / kv_heads). When the rank's heads come in runs of equal
    length per KV head (every regular split does), each KV head is stored once and serves its run;
    otherwise (a regrouped layer) each query head gets its own copy of its KV head.
    """
    per_kv = config.num_heads // config.num_kv_heads
    kv = [h // per_kv for h in heads]
    runs = [kv.count(k) for k in dict.fromkeys(kv)]
    return list(dict.fromkeys(kv)) if len(set(runs)) == 1 else kv


@dataclasses.dataclass
class RankLayer:
    """One block's weights on one rank, fused for the forward pass:
    qkv [(nq + 2 nkv) * hd, hidden], o [hidden, nq * hd], gate_up [2 * ffn_r, hidden], down [hidden, ffn_r];
    ``o_bias`` / ``down_bias`` (replicated) [hidden] or None; ``lead``: this rank adds them to the sums."""
    heads: list[int]
    kv_heads: list[int]
    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv_bias: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    lead: bool = False

    def to(self, device: torch.device, dtype: torch.dtype) -> "RankLayer":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device, dtype).contiguous()
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclasses.dataclass
class RankShard:
    """Everything rank ``rank`` of ``world`` holds."""
    rank: int
    world: int
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[RankLayer]


def _head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def shard_layer(config: LlamaConfig, layer: LayerWeights, rank: int, world: int, heads: Sequence[int]) -> RankLayer:
    """Rank ``rank``'s part of one block when it holds query ``heads`` and FFN slice ``rank``."""
    hd, ffn = config.head_dim, config.intermediate_size // world
    kv_heads = local_kv_heads(config, heads)
    q_rows, kv_rows = _head_rows(heads, hd), _head_rows(kv_heads, hd)
    f = slice(rank * ffn, (rank + 1) * ffn)

    def cat_bias(*parts: torch.Tensor | None) -> torch.Tensor | None:
        return None if parts[0] is None else torch.cat(parts)

    return RankLayer(
        heads=list(heads), kv_heads=kv_heads,
        qkv=torch.cat([layer.q[q_rows], layer.k[kv_rows], layer.v[kv_rows]]),
        o=layer.o[:, q_rows], gate_up=torch.cat([layer.gate[f], layer.up[f]]), down=layer.down[:, f],
        input_norm=layer.input_norm, post_norm=layer.post_norm,
        qkv_bias=cat_bias(*(None if b is None else b[rows] for b, rows in
                            ((layer.q_bias, q_rows), (layer.k_bias, kv_rows), (layer.v_bias, kv_rows)))),
        gate_up_bias=cat_bias(*(None if b is None else b[f] for b in (layer.gate_bias, layer.up_bias))),
        o_bias=layer.o_bias, down_bias=layer.down_bias, lead=rank == 0)


def shard_llama(config: LlamaConfig, weights: LlamaWeights, rank: int, world: int,
                head_groups: HeadGroups | None = None) -> RankShard:
    """Rank ``rank``'s shard of the full model for tensor-parallel degree ``world``.

    head_groups: per layer, the query heads of every rank (default: contiguous); see ``check_head_groups``.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_llama: need 0 <= rank < world, got rank={rank}, world={world}")
    if config.num_heads % world or config.intermediate_size % world:
        raise ValueError(f"shard_llama: {config.num_heads} heads and FFN size {config.intermediate_size} must both "
                         f"divide by the tensor-parallel degree {world}")
    head_groups = contiguous_head_groups(config, world) if head_groups is None else head_groups
    check_head_groups(config, world, head_groups)
    layers = [shard_layer(config, layer, rank, world, head_groups[i][rank]) for i, layer in enumerate(weights.layers)]
    return RankShard(rank, world, weights.embed, weights.norm, weights.lm_head, layers)


# ---------------------------------------------------------------------------------------------- the model
def rope_tables(config: LlamaConfig, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [positions, head_dim] (fp32) of the default RoPE, as Hugging Face Llama builds them."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


class _DecodeGraph:
    """One decode step for a batch of ``batch`` sequences, captured in a CUDA graph.

    Static inputs: ``tokens`` [batch] (the last token of every sequence) and ``pos`` (its position,
    0-d). A replay writes the KV cache at ``pos``, attends keys 0..pos (the decode attention kernel
    reads ``pos`` on the device; the graph's grid covers the whole cache), stores the greedy next token
    into ``tokens`` and ``history[:, pos + 1]`` and bumps ``pos``: replays chain on the device with no
    host work.
    """

    def __init__(self, model: "TPLlama", batch: int) -> None:
        device = model.device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.full((), model.max_seq - 1, dtype=torch.long, device=device)  # warm-up slot
        self.history = torch.zeros(batch, model.max_seq + 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile kernels, warm the allocator (writes only the last cache slot)
            for _ in range(2):
                self._step(model)
                self.pos.fill_(model.max_seq - 1)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step(model)

    def _step(self, model: "TPLlama") -> None:
        positions = self.pos.view(1)
        logits = model._forward(self.tokens.view(-1, 1), positions, model.max_seq, None)
        nxt = logits[:, -1].argmax(-1)
        self.tokens.copy_(nxt)
        self.history.index_copy_(1, positions + 1, nxt.view(-1, 1))
        self.pos.add_(1)


class TPLlama:
    """Rank ``shard.rank``'s part of a tensor-parallel Llama (eager prefill/decode, CUDA-graph decode).

    sync: a sync point (shardkit.models.sync_points): FusedSync for shardkit's fused op.
    spd: per block, True to drop its attention sync point (Sync-Point Drop); default none.
    max_batch, max_seq: KV-cache capacity (max_seq default: the config's max positions).
    """

    def __init__(self, config: LlamaConfig, shard: RankShard, sync, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, spd: Sequence[bool] | None = None, max_batch: int = 1,
                 max_seq: int | None = None) -> None:
        self.config, self.rank, self.world, self.sync = config, shard.rank, shard.world, sync
        self.device, self.dtype = torch.device(device), dtype
        self.max_batch = int(max_batch)
        self.max_seq = int(max_seq or config.max_position_embeddings)
        if self.max_batch < 1 or self.max_seq < 1:
            raise ValueError(f"TPLlama: max_batch and max_seq must be >= 1, got {max_batch}, {max_seq}")
        move = dict(device=self.device, dtype=dtype)
        self.embed, self.norm = shard.embed.to(**move), shard.norm.to(**move)
        self.lm_head = self.embed if shard.lm_head is shard.embed else shard.lm_head.to(**move)
        self.layers = [layer.to(self.device, dtype) for layer in shard.layers]
        cos, sin = rope_tables(config, self.max_seq)
        self.cos, self.sin = cos.to(**move), sin.to(**move)
        self.key_positions = torch.arange(self.max_seq, device=self.device)
        hd = config.head_dim
        # zeros, not empty: masked cache slots still enter P @ V (0 * NaN would be NaN)
        self.k_cache = [torch.zeros(self.max_batch, len(layer.kv_heads), self.max_seq, hd, **move)
                        for layer in self.layers]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        self.set_spd([False] * config.num_layers if spd is None else spd)

    def set_spd(self, spd: Sequence[bool]) -> None:
        """Switch Sync-Point Drop per block (drops captured decode graphs)."""
        if len(spd) != self.config.num_layers:
            raise ValueError(f"TPLlama: spd must have one flag per block ({self.config.num_layers}), got {len(spd)}")
        self.spd = [bool(s) for s in spd]
        self._graphs: dict[int, _DecodeGraph] = {}

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits [B, T, vocab] of ``tokens`` [B, T] (int64) at positions start..start+T-1, which
        must follow the cached positions 0..start-1 of the same sequences; fills the KV cache."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"TPLlama.forward: tokens must be int64 [batch, tokens], got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        batch, length = tokens.shape
        if not 1 <= batch <= self.max_batch or length < 1 or not 0 <= start <= self.max_seq - length:
            raise ValueError(f"TPLlama.forward: batch {batch} must be in 1..{self.max_batch} and positions "
                             f"{start}..{start + length - 1} within the cache's {self.max_seq}")
        tokens = tokens.to(self.device)
        positions = torch.arange(start, start + length, device=self.device)
        mask = None
        if length > 1 and start > 0:  # chunk after cached tokens: query i sees keys 0..start+i
            mask = self.key_positions[:start + length][None, :] <= positions[:, None]
        return self._forward(tokens, positions, start + length, mask)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
                 mask: torch.Tensor | None) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        h = F.embedding(tokens, self.embed)
        x = F.rms_norm(h, (h.shape[-1],), self.layers[0].input_norm, eps)
        residual = h
        for i in range(len(self.layers)):
            x, residual = self._block(i, x, residual, positions, kv_len, mask)
        return F.linear(x, self.lm_head)

    def run_block(self, i: int, x: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, kv_len: int,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i`` alone (benchmarks): x [B, T, hidden] its RMSNorm'ed input, residual the stream,
        positions [T] on the device (written into the KV cache), keys 0..kv_len-1 visible through
        ``mask`` (None: all of them up to each token's position: causal). Returns (next block's input,
        residual)."""
        return self._block(i, x, residual, positions, kv_len, mask)

    def _block(self, i: int, x: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, kv_len: int,
               mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        layer, eps = self.layers[i], self.config.rms_norm_eps
        next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
        y = F.linear(self._attention(i, x, positions, kv_len, mask), layer.o)
        if self.spd[i]:
            local = y if layer.o_bias is None else y + layer.o_bias
            ffn_in, _ = add_rmsnorm(local, residual, layer.post_norm, eps)
            s = torch.addmm(y.view(-1, y.shape[-1]), self._ffn_hidden(layer, ffn_in).flatten(0, -2),
                            layer.down.t()).view(y.shape)
            for bias in (layer.o_bias, layer.down_bias):
                if bias is not None and layer.lead:
                    s += bias
            return self.sync(s, residual, next_norm, eps)
        if layer.o_bias is not None and layer.lead:
            y += layer.o_bias
        ffn_in, residual = self.sync(y, residual, layer.post_norm, eps)
        f = F.linear(self._ffn_hidden(layer, ffn_in), layer.down, layer.down_bias if layer.lead else None)
        return self.sync(f, residual, next_norm, eps)

    @staticmethod
    def _ffn_hidden(layer: RankLayer, x: torch.Tensor) -> torch.Tensor:
        return swiglu(F.linear(x, layer.gate_up, layer.gate_up_bias))

    def _attention(self, i: int, x: torch.Tensor, positions: torch.Tensor, kv_len: int,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """This rank's heads: [B, T, nq * hd] attention output, the KV cache updated at ``positions``."""
        layer, hd = self.layers[i], self.config.head_dim
        batch, length, _ = x.shape
        nq, nkv = len(layer.heads), len(layer.kv_heads)
        # RoPE on q and k and the cache write in one kernel (kernels/llama/rope_cache.py): q [B, T, nq, hd]
        q = rope_qkv_into_cache(F.linear(x, layer.qkv, layer.qkv_bias), positions, self.cos, self.sin,
                                self.k_cache[i], self.v_cache[i], nq)
        if length == 1 and mask is None:  # decode: split-KV kernel, keys 0..min(kv_len - 1, position)
            out = decode_attention(q.view(batch, nq, hd), self.k_cache[i][:batch], self.v_cache[i][:batch], kv_len,
                                   q_pos=positions)
            return out.view(batch, 1, nq * hd)
        keys, values = self.k_cache[i][:batch, :, :kv_len], self.v_cache[i][:batch, :, :kv_len]
        group = nq // nkv
        if length == 1:  # decode with a mask: the query heads of a KV head become that head's query rows
            out = F.scaled_dot_product_attention(q.view(batch, nkv, group, hd), keys, values, attn_mask=mask)
            return out.reshape(batch, 1, nq * hd)  # flash kernels return [B, L, H, D] memory: may copy
        if group > 1:
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=mask is None)
        return out.transpose(1, 2).reshape(batch, length, nq * hd)

    # ------------------------------------------------------------------ generation
    def decode_graph(self, batch: int) -> _DecodeGraph:
        """The CUDA graph of one decode step for ``batch`` sequences (captured on first use)."""
        if self.device.type != "cuda":
            raise ShardkitError("TPLlama.decode_graph: CUDA graphs need a CUDA device")
        if batch not in self._graphs:
            self._graphs[batch] = _DecodeGraph(self, batch)
        return self._graphs[batch]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, graph: bool = False) -> torch.Tensor:
        """Greedy continuation [B, new_tokens] of ``prompt`` [B, T] (int64, all of length T): prefill,
        then ``new_tokens - 1`` decode steps, eager or replayed from a CUDA graph (``graph=True``)."""
        batch, length = prompt.shape
        if new_tokens < 1 or length + new_tokens - 1 > self.max_seq:
            raise ValueError(f"TPLlama.generate: prompt {length} + new_tokens {new_tokens} - 1 must fit the cache's "
                             f"{self.max_seq} positions (new_tokens >= 1)")
        dec = self.decode_graph(batch) if graph else None  # captured before the prefill fills the cache
        nxt = self.forward(prompt, 0)[:, -1].argmax(-1)
        if dec is not None:
            dec.tokens.copy_(nxt)
            dec.pos.fill_(length)
            for _ in range(new_tokens - 1):
                dec.graph.replay()
            return torch.cat([nxt.view(-1, 1), dec.history[:, length + 1:length + new_tokens]], dim=1)
        out = [nxt]
        for pos in range(length, length + new_tokens - 1):
            nxt = self.forward(nxt.view(-1, 1), pos)[:, -1].argmax(-1)
            out.append(nxt)
        return torch.stack(out, dim=1)
