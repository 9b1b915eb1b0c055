"""Functions that run on every rank of a ProcessWorld, shared by the CPU and GPU ring-attention tests.

Every rank draws the *whole* sequence from a seeded generator, takes its own shard, and compares
its output with its rows of the float64 reference attention over the unsharded sequence.
Failures raise AssertionError on the rank (the world reports them); results come back as small
picklable summaries.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from shardkit.collectives.attention.cp_decode import cp_decode_attention, decode_cache_rank
from shardkit.collectives.attention.ring import ring_attention
from shardkit.collectives.attention.sharding import shard_positions
from shardkit.reference.attention import reference_attention

from ..tolerances import ATTENTION
from ._common import assert_nan_close, same_bits

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def _rand(gen: torch.Generator, *shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).to(device())


def _assignment(kind: str, n: int, world: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Global positions (sorted int64 tensors) of the tokens each rank holds, by layout kind."""
    if kind == "balanced":
        return [shard_positions(n, r, world, dtype=torch.int64) for r in range(world)]
    if kind == "contiguous":  # uneven contiguous pieces: many chunk pairs are fully masked
        cuts = sorted(torch.randint(0, n + 1, (world - 1,), generator=gen).tolist())
        edges = [0, *cuts, n]
        return [torch.arange(edges[r], edges[r + 1]) for r in range(world)]
    if kind == "random":  # every token on a random rank (a rank may hold none)
        owner = torch.randint(0, world, (n,), generator=gen)
        return [torch.nonzero(owner == r).flatten() for r in range(world)]
    raise ValueError(kind)


def _plant_nan(tensors: dict, nan: list) -> None:
    """NaN at ``(name, batch, index)`` for each entry of ``nan`` (head 0, head-dim column 3)."""
    for name, b, i in nan:
        tensors[name][b, 0, i, 3] = float("nan")


def _head_dim_strided(t: torch.Tensor) -> torch.Tensor:
    """The same values stored [B, H, D, L]: stride(-1) is L, not 1."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def check_ring(cfg: dict) -> list[str]:
    """Ring attention (each variant in ``cfg['variants']``) against float64 full attention.

    cfg: T (new tokens), P (cached tokens, 0 = none), B, Hq, Hkv, D, dtype, causal, layout
    ('balanced' | 'contiguous' | 'random'), pass_pos (give positions explicitly), variants, seed,
    threshold (optional pass_q_threshold), local_backend (optional, default "auto"), nan (optional
    list of (tensor 'q'/'k'/'v', batch, index along the whole sequence, cache first for k/v) where a
    NaN is planted: the output's NaN pattern must then equal the reference's), strided (optional: the
    last rank's q, k, v and cache have a non-unit stride in the head dim).
    Returns the output digests per variant (for the cross-rank / cross-variant checks).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[cfg["dtype"]]
    T, P, B, Hq, Hkv, D = (cfg[n] for n in ("T", "P", "B", "Hq", "Hkv", "D"))
    gen = torch.Generator().manual_seed(cfg["seed"])
    q = _rand(gen, B, Hq, T, D, dtype=dtype)
    k = _rand(gen, B, Hkv, P + T, D, dtype=dtype)  # cached tokens first, then the new ones
    v = _rand(gen, B, Hkv, P + T, D, dtype=dtype)
    _plant_nan({"q": q, "k": k, "v": v}, cfg.get("nan", []))
    ref, _ = reference_attention(q, k[:, :, P:], v[:, :, P:], causal=cfg["causal"], q_pos=P, kv_pos=P) \
        if P == 0 else reference_attention(q, k, v, causal=cfg["causal"], q_pos=P, kv_pos=0)

    new_pos = _assignment(cfg["layout"], T, world, gen)[rank]
    cache_pos = _assignment(cfg["layout"], P, world, gen)[rank] if P else None
    dev = device()
    q_loc = q[:, :, new_pos.to(dev)]
    k_loc, v_loc = k[:, :, (P + new_pos).to(dev)], v[:, :, (P + new_pos).to(dev)]
    kw = {"causal": cfg["causal"], "pass_q_threshold": cfg.get("threshold", 0.05),
          "local_backend": cfg.get("local_backend", "auto")}
    if P:
        kw["k_cache"], kw["v_cache"] = k[:, :, cache_pos.to(dev)], v[:, :, cache_pos.to(dev)]
    if cfg["pass_pos"]:
        kw["q_pos"] = kw["kv_pos"] = (P + new_pos).to(dev)
        if P:
            kw["cache_pos"] = cache_pos.to(dev)
    else:
        assert cfg["layout"] == "balanced", "only the balanced layout may leave positions out"
    if cfg.get("strided") and rank == world - 1:  # this rank's tensors with a non-unit stride in the head dim
        q_loc, k_loc, v_loc = (_head_dim_strided(t) for t in (q_loc, k_loc, v_loc))
        if P:
            kw["k_cache"], kw["v_cache"] = _head_dim_strided(kw["k_cache"]), _head_dim_strided(kw["v_cache"])
    expected = ref[:, :, new_pos.to(dev)]
    inputs = [t.clone() for t in (q_loc, k_loc, v_loc)]

    atol, rtol = ATTENTION[dtype]
    digests, outs = [], {}
    for variant in cfg["variants"]:
        out = ring_attention(q_loc, k_loc, v_loc, variant=variant, **kw)
        assert out.shape == q_loc.shape and out.dtype == dtype, (variant, out.shape, out.dtype)
        # NaN exactly where the reference has it (nowhere without planted NaN); up to three
        # roundings of the partial outputs to dtype on the way (chunk, merges).
        assert_nan_close(out, expected, f"rank {rank} {variant} {cfg}", atol=2 * atol, rtol=2 * rtol)
        outs[variant] = out
        digests.append(_digest(out))
    for a, b in zip(inputs, (q_loc, k_loc, v_loc)):
        assert same_bits(a, b), "ring_attention modified an input"
    if "pass_kv" in outs and "pass_q" in outs:  # the two variants agree closely (not bitwise)
        torch.testing.assert_close(outs["pass_kv"].double(), outs["pass_q"].double(), atol=2 * atol, rtol=2 * rtol,
                                   equal_nan=True)
    return digests


def check_decode(cfg: dict) -> str:
    """CP decode against float64 attention over the whole cache; returns the output digest.

    The cache holds ``prefix`` tokens in the load-balanced layout plus ``generated`` tokens
    placed round-robin with decode_cache_rank; the query is the last ``n`` tokens
    (causal by position when cfg['causal']). cfg['nan'] (optional): NaN planted as in check_ring
    (k/v index = cache position, q index = query row).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[cfg["dtype"]]
    B, Hq, Hkv, D, n = (cfg[x] for x in ("B", "Hq", "Hkv", "D", "n"))
    prefix, generated = cfg["prefix"], cfg["generated"]
    L = prefix + generated
    gen = torch.Generator().manual_seed(cfg["seed"])
    q = _rand(gen, B, Hq, n, D, dtype=dtype)
    k = _rand(gen, B, Hkv, L, D, dtype=dtype)
    v = _rand(gen, B, Hkv, L, D, dtype=dtype)
    _plant_nan({"q": q, "k": k, "v": v}, cfg.get("nan", []))
    mine = [p for p in shard_positions(prefix, rank, world).tolist()]
    mine += [t for t in range(prefix, L) if decode_cache_rank(t, world) == rank]
    pos = torch.tensor(mine, dtype=torch.int64, device=device())
    kw = {"q_pos": L - n, "kv_pos": pos} if cfg["causal"] else {}
    out = cp_decode_attention(q, k[:, :, pos], v[:, :, pos], **kw)
    ref, _ = reference_attention(q, k, v, causal=cfg["causal"], q_pos=L - n, kv_pos=0)
    atol, rtol = ATTENTION[dtype]
    assert_nan_close(out, ref, f"rank {rank} decode {cfg}", atol=2 * atol, rtol=2 * rtol)
    return _digest(out)


def expect_error(case: str) -> tuple[str, str]:
    """Call ring_attention with inputs that ``case`` makes bad; return (exception type, message)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = device()
    gen = torch.Generator().manual_seed(5)
    Hq, Hkv, D, L = 4, 2, 16, 6
    kw: dict = {}
    if case == "head_multiple":           # every rank: 3 q heads over 2 kv heads
        Hq = 3
    elif case == "head_mismatch":         # locally fine, but the ranks disagree about q heads
        Hq = 4 if rank == 0 else 2
    elif case == "head_dim":              # unsupported head dim
        D = 24
    elif case == "one_bad_rank":          # only the last rank's v is wrong
        pass
    elif case == "uneven_no_pos":         # shard lengths that are not the load-balanced layout
        L = 5 + 4 * rank
    elif case == "missing_kv_pos":
        kw["q_pos"] = rank * L
    elif case == "unsorted_kv_pos":       # positions given, one rank's kv_pos out of order
        base = torch.arange(rank * L, (rank + 1) * L, device=dev)
        kw["q_pos"] = base
        kw["kv_pos"] = base.flip(0) if rank == world - 1 else base
    elif case == "bad_variant":
        kw["variant"] = "pass_everything"
    else:
        raise ValueError(case)
    q = _rand(gen, 1, Hq, L, D, dtype=torch.float32)
    k = _rand(gen, 1, Hkv, L, D, dtype=torch.float32)
    v = _rand(gen, 1, Hkv, L + (1 if case == "one_bad_rank" and rank == world - 1 else 0), D,
              dtype=torch.float32)
    try:
        ring_attention(q, k, v, **kw)
    except (ValueError, TypeError) as e:
        dist.barrier()  # the world is still in step: the next collective works on every rank
        return type(e).__name__, str(e)
    raise AssertionError(f"rank {rank}: {case} was accepted")


def expect_decode_error(case: str) -> tuple[str, str]:
    """Call cp_decode_attention with inputs that ``case`` makes bad on some rank(s); return (exception
    type, message). Every rank must raise (none may hang in, or abort inside, the all-gather) and stay
    usable: a barrier and a good decode call follow."""
    rank, world = dist.get_rank(), dist.get_world_size()
    last = rank == world - 1
    gen = torch.Generator().manual_seed(6)
    B, Hq, Hkv, n, D, L = 1, 2, 1, 1, 16, 5
    dtype, kw = torch.float32, {}
    if case == "q_len":                   # speculative tokens on one rank only
        n = 2 if rank == 0 else 1
    elif case == "empty_q":               # the last rank has no query rows, the others one
        n = 0 if last else 1
    elif case == "q_heads":
        Hq = 4 if last else 2
    elif case == "kv_heads":              # q heads agree, the cache's do not
        Hkv = 2 if last else 1
    elif case == "dtype":
        dtype = torch.float16 if last else torch.float32
    elif case == "scale":
        kw["softmax_scale"] = 0.5 if last else 0.25
    elif case == "causal":                # positions on one rank only
        if last:
            kw["q_pos"], kw["kv_pos"] = 10, 0
    elif case == "one_bad_rank":          # only the last rank's v is wrong
        pass
    elif case == "unsorted_kv_pos":
        kw["q_pos"], kw["kv_pos"] = 10, torch.arange(L, device=device()).flip(0) if last else torch.arange(L, device=device())
    else:
        raise ValueError(case)
    q = _rand(gen, B, Hq, n, D, dtype=dtype)
    k = _rand(gen, B, Hkv, L, D, dtype=dtype)
    v = _rand(gen, B, Hkv, L + (1 if case == "one_bad_rank" and last else 0), D, dtype=dtype)
    try:
        cp_decode_attention(q, k, v, **kw)
    except (ValueError, TypeError) as e:
        result = type(e).__name__, str(e)
    else:
        raise AssertionError(f"rank {rank}: {case} was accepted")
    dist.barrier()  # the world is still in step: the next collectives work on every rank
    good = torch.ones(1, 1, 3, 16, device=device())
    out = cp_decode_attention(good[:, :, :1].repeat(1, 2, 1, 1), good, good)
    assert torch.equal(out, torch.ones_like(out)), "the decode call after the error went wrong"
    return result


def check_decode_graph(cfg: dict, replays: int) -> float:
    """cp_decode_attention captured in a CUDA graph and replayed with new queries (GPU only);
    returns the worst error against the eager call."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[cfg["dtype"]]
    B, Hq, Hkv, D, L = (cfg[x] for x in ("B", "Hq", "Hkv", "D", "L"))
    gen = torch.Generator().manual_seed(cfg["seed"])
    k = _rand(gen, B, Hkv, L, D, dtype=dtype)
    v = _rand(gen, B, Hkv, L, D, dtype=dtype)
    pos = shard_positions(L, rank, world, device=device(), dtype=torch.int64)
    k_loc, v_loc = k[:, :, pos].contiguous(), v[:, :, pos].contiguous()
    queries = [_rand(gen, B, Hq, 1, D, dtype=dtype) for _ in range(replays)]
    q = queries[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (kernel compilation, NCCL set-up)
        cp_decode_attention(q, k_loc, v_loc)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cp_decode_attention(q, k_loc, v_loc)
    worst = torch.zeros((), device=out.device)  # torch.maximum keeps a NaN, python's max() may not
    for qi in queries:
        q.copy_(qi)
        graph.replay()
        eager = cp_decode_attention(qi, k_loc, v_loc)
        worst = torch.maximum(worst, (out.float() - eager.float()).abs().max())
    return worst.item()
