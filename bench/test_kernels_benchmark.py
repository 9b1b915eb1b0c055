"""pytest-benchmark, one GPU: the attention chunk kernel vs torch SDPA, and the merge kernel vs a
device copy of the same bytes. ``python -m pytest bench/test_kernels_benchmark.py --benchmark-group-by=group``
Outputs are checked against the torch baselines before timing. Records: bench "pytest_kernels"
(table ``pytest_kernels_<card>_x1.md``)."""
import pytest
import torch
import torch.nn.functional as F

from bench.conftest import graph_of, keep, run_pedantic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a GPU")

B, HQ, HKV, D = 1, 32, 8, 128


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("impl", ["shardkit", "sdpa"])
def test_attention_chunk(benchmark, impl, causal):
    from shardkit.kernels.attention.chunk import attention_chunk

    L = 8192
    benchmark.group = f"attention_chunk L={L} {'causal' if causal else 'full'} bf16"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, HQ, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    if impl == "shardkit":
        out, _ = attention_chunk(q, k, v, causal=causal)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
        fn = lambda: attention_chunk(q, k, v, causal=causal)  # noqa: E731
    else:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)  # noqa: E731
    us = run_pedantic(benchmark, graph_of(fn, calls=5), calls=5, rounds=10)
    flops = 4 * B * HQ * L * L * D / (2 if causal else 1)
    benchmark.extra_info["tflops"] = flops / (benchmark.extra_info["us_per_call_median"] * 1e-6) / 1e12
    keep("pytest_kernels", {"shardkit": "shardkit_chunk", "sdpa": "torch_sdpa"}[impl],
         {"study": "chunk", "seq_len": L, "causal": causal}, us,
         metrics={"tflops": round(benchmark.extra_info["tflops"], 1)})


@pytest.mark.parametrize("impl", ["shardkit_merge", "torch_copy"])
def test_merge(benchmark, impl):
    from shardkit.kernels.attention.merge import merge_attention_

    L = 16384
    benchmark.group = f"merge two partials L={L} bf16"
    gen = torch.Generator(device="cuda").manual_seed(1)
    out = torch.randn(B, HQ, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    other = torch.randn_like(out)
    lse = torch.randn(B, HQ, L, device="cuda", generator=gen)
    lse_other = torch.randn_like(lse)
    if impl == "shardkit_merge":
        fn = lambda: merge_attention_(out, lse, other, lse_other)  # noqa: E731
    else:
        dst = torch.empty_like(out)
        fn = lambda: dst.copy_(other)  # noqa: E731
    us = run_pedantic(benchmark, graph_of(fn, calls=20), calls=20, rounds=20)
    keep("pytest_kernels", {"shardkit_merge": "shardkit_merge_inplace", "torch_copy": "torch_copy"}[impl],
         {"study": "merge", "seq_len": L}, us)
