"""Functions every rank of a test world runs (module level, so the worker processes import them)."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from shardkit.pipeline.llama import LlamaConfig, LlamaStage, checkpoint_weights
from shardkit.pipeline.profiler import LinkCost, profile_links
from shardkit.pipeline.runtime import PipelineRuntime


def _stage(model_dir: str, bounds, max_tokens: int, device: str = "cpu", dtype=torch.float32) -> LlamaStage:
    torch.set_num_threads(1)  # CI has 2 cores for all ranks
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(rank)
    cfg = LlamaConfig.from_hf(model_dir)
    layers = range(bounds[rank], bounds[rank + 1])
    first, last = rank == 0, rank == world - 1
    return LlamaStage(cfg, checkpoint_weights(model_dir, cfg, layers, first, last), layers, first=first, last=last,
                      device=device, dtype=dtype, max_tokens=max_tokens)


def generate(model_dir: str, bounds, slices, ids: torch.Tensor, new_tokens: int, wire: str = "auto",
             devices=None) -> dict:
    """Prefill ``ids`` in ``slices`` over stages cut at ``bounds`` and generate ``new_tokens`` greedily;
    ``devices[rank]`` ("cpu"/"cuda") places each stage. Returns this rank's tokens, logits, timeline."""
    device = (devices or ["cpu"] * dist.get_world_size())[dist.get_rank()]
    stage = _stage(model_dir, bounds, ids.shape[1] + new_tokens, device)
    rt = PipelineRuntime(stage, wire=wire)
    with torch.no_grad():
        tokens, logits = rt.generate(ids.to(stage.device), slices, new_tokens)
    return {"tokens": tokens.cpu(), "logits": None if logits is None else logits.cpu(), "timeline": rt.timeline()}


def sends_do_not_wait(model_dir: str, bounds, slices, ids: torch.Tensor, delay_s: float) -> dict:
    """The last stage starts ``delay_s`` late; the others' slices must not wait for it (asynchronous
    sends). Returns the prefill's duration and the timeline on each rank."""
    stage = _stage(model_dir, bounds, ids.shape[1])
    rt = PipelineRuntime(stage)
    dist.barrier()
    if stage.last:
        time.sleep(delay_s)
    t0 = time.perf_counter()
    with torch.no_grad():
        rt.prefill(ids, slices)
    return {"seconds": time.perf_counter() - t0, "timeline": rt.timeline()}


def mismatched_stages(model_dir: str, bounds_per_rank) -> None:
    """Each rank builds its stage from its own idea of the cut (``bounds_per_rank[rank]``)."""
    stage = _stage(model_dir, bounds_per_rank[dist.get_rank()], 16)
    PipelineRuntime(stage)


def bad_prefill(model_dir: str, bounds, slices, ids: torch.Tensor) -> None:
    """``slices``: the same for every rank, or a dict rank -> that rank's slices."""
    stage = _stage(model_dir, bounds, ids.shape[1])
    PipelineRuntime(stage).prefill(ids, slices[dist.get_rank()] if isinstance(slices, dict) else slices)


def link_profile(model_dir: str, bounds, token_counts) -> list:
    stage = _stage(model_dir, bounds, 16)
    samples = profile_links(PipelineRuntime(stage), token_counts, reps=3)
    return [samples, [LinkCost.fit(s) for s in samples]]


def generate_bf16(model_dir: str, bounds, slices, ids: torch.Tensor) -> torch.Tensor:
    """Last-slice logits (fp32 copy, last rank) of a bf16 prefill on one GPU per rank."""
    stage = _stage(model_dir, bounds, ids.shape[1], "cuda", torch.bfloat16)
    with torch.no_grad():
        logits = PipelineRuntime(stage).prefill(ids, slices)
    return None if logits is None else logits.float().cpu()


def runtime_arguments(model_dir: str, kwargs_per_rank) -> None:
    """Each rank builds its runtime with its own keyword arguments (``kwargs_per_rank[rank]``)."""
    stage = _stage(model_dir, (0, 4, 8), 16)
    PipelineRuntime(stage, **kwargs_per_rank[dist.get_rank()])
