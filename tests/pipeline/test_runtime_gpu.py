"""The pipeline on GPUs: NCCL links, host-memory links over gloo, a GPU stage feeding a CPU stage;
tiny-llama-pycode in fp32 against float64 (and bf16 against the single-GPU model). Skipped without
2 GPUs (the GPU + CPU case needs one)."""
import pytest
import torch

from ..conftest import gpu_count
from . import stage_checks
from ._model import MODEL_DIR, NEW_TOKENS, config, needs_model, prompt, reference, relative_error, weights

pytestmark = [pytest.mark.gpu, needs_model]
MIXED = "cpu:gloo,cuda:nccl"  # NCCL for device tensors, gloo for host ones


@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("wire", ["auto", "host"])
def test_two_gpus(worlds, wire):
    slices = (33, 21, 16)
    out = worlds(2, MIXED).run(stage_checks.generate, MODEL_DIR, (0, 5, 8), slices, prompt(), NEW_TOKENS, wire,
                               ["cuda", "cuda"])
    ref_logits, ref_tokens = reference()
    assert relative_error(out[-1]["logits"], ref_logits[:, -slices[-1]:]) <= 1e-4
    assert all(torch.equal(o["tokens"], ref_tokens) for o in out)


@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 CUDA GPUs (one process per GPU in the test world)")
def test_gpu_then_cpu_stage(worlds):
    slices = (50, 20)
    out = worlds(2, MIXED).run(stage_checks.generate, MODEL_DIR, (0, 6, 8), slices, prompt(), NEW_TOKENS, "auto",
                               ["cuda", "cpu"])
    ref_logits, ref_tokens = reference()
    assert relative_error(out[-1]["logits"], ref_logits[:, -slices[-1]:]) <= 1e-4
    assert all(torch.equal(o["tokens"], ref_tokens) for o in out)


@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_bf16_matches_one_gpu(worlds):
    from shardkit.pipeline.llama import LlamaStage
    slices = (10, 40, 20)
    out = worlds(2, MIXED).run(stage_checks.generate_bf16, MODEL_DIR, (0, 4, 8), slices, prompt())
    cfg = config()
    one = LlamaStage(cfg, weights(), range(cfg.layers), first=True, last=True, device="cuda:0", dtype=torch.bfloat16,
                     max_tokens=prompt().shape[1])
    with torch.no_grad():
        one_gpu = one.forward(prompt().cuda(), 0)[:, -slices[-1]:].float().cpu()
    want = reference()[0][:, -slices[-1]:]
    # bf16 rounding differs between the two orders of work: the pipeline must be as accurate as one GPU.
    assert relative_error(out[-1], want) <= max(2 * relative_error(one_gpu, want), 1e-2)
