"""CachedLauncher: the direct launch path is taken once a key is compiled, and gives the same results.

The GPU test counts JITFunction.run calls: the first launch of a key compiles through it, the
following ones must not (that regression kept eager Triton collectives at 30-80 us per call).
"""
import pytest
import torch
import triton
import triton.language as tl
from triton import knobs

from shardkit.kernels.launch import CachedLauncher, int_key, launch_hooks_installed, ptr_key


@triton.jit(do_not_specialize=["scale"])
def _scaled_copy(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) * scale, mask=m)


def test_hooks_detection():
    assert not launch_hooks_installed(), "a fresh process has no Triton launch hooks"
    def hook(*args):
        pass
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # triton >= 3.5: a HookChain
        chain.add(hook)
        try:
            assert launch_hooks_installed()
        finally:
            chain.remove(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
        try:
            assert launch_hooks_installed()
        finally:
            knobs.runtime.launch_enter_hook = None
    assert not launch_hooks_installed()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the direct path needs a compiled kernel (GPU)")
def test_direct_path_taken_and_correct(monkeypatch):
    launcher = CachedLauncher(_scaled_copy)
    assert launcher.enabled
    calls = []
    run = type(_scaled_copy).run
    monkeypatch.setattr(type(_scaled_copy), "run", lambda self, *a, **kw: calls.append(1) or run(self, *a, **kw))
    for i, n in enumerate([1000, 1000, 1000, 777, 777]):
        x = torch.randn(n, device="cuda")
        out = torch.full_like(x, float("nan"))
        scale = 0.5 + i
        key = (ptr_key(x), ptr_key(out), int_key(n))
        launcher(key, triton.cdiv(n, 256), (x, out, n, scale), {"BLOCK": 256}, 4)
        torch.testing.assert_close(out, x * scale)
    # n = 1000 and 777: neither divisible by 16 nor 1, so one key (one compile) serves every call.
    assert len(calls) == len(launcher.compiled) == 1, (len(calls), launcher.compiled.keys())


def test_constexprs_and_warps_are_part_of_the_cache_key():
    """A kernel compiled for one constexpr value (or warp count) must not serve another under the
    same caller key: the two-shot RMSNorm's chunk count once came from hidden, not from its key."""
    compiled = []

    class FakeKernel:  # records compiles; a cache hit would need a GPU stream and fail here
        def __getitem__(self, grid):
            return lambda *args, **kw: compiled.append(kw) or object()

    launcher = CachedLauncher(FakeKernel())
    launcher.enabled = True
    for consts, warps in (({"BLOCK": 256}, 4), ({"BLOCK": 512}, 4), ({"BLOCK": 256}, 8)):
        launcher(("same key",), 1, (torch.empty(1),), consts, warps)
    assert [(kw["BLOCK"], kw["num_warps"]) for kw in compiled] == [(256, 4), (512, 4), (256, 8)]
