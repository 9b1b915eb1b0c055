"""Launching a compiled Triton kernel without JITFunction.run's per-call work.

In eager mode a collective's GPU work is a few microseconds while ``kernel[grid](...)`` spends tens
of microseconds in Python binding arguments, computing the specialisation key and checking globals
(docs/PERFORMANCE.md). ``CachedLauncher`` compiles through the normal path the first time a
*launch key* is seen, then calls the compiled kernel's C launcher directly.

The launch key must determine everything Triton specialises on. Callers mark the integer arguments
whose values do not matter with ``do_not_specialize`` and put into the key what does: constexprs,
``num_warps``, each pointer's dtype and 16-byte alignment, and for specialised integers their
divisibility by 16, equality to 1 and 32-bit range (see ``int_key``/``ptr_key``).
In the interpreter (TRITON_INTERPRET=1), and whenever a Triton launch hook is installed (a
profiler), the normal path is used.

Triton >= 3.5 keeps the launch hooks as ``HookChain`` objects that are never None; testing them
against None (as this file first did) sent every launch down the normal path, which is why eager
Triton calls stayed at 30-80 us per call (docs/PERFORMANCE.md, v5).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from triton import knobs


def ptr_key(t: torch.Tensor) -> tuple:
    return (t.dtype, t.data_ptr() % 16 == 0)


def int_key(v: int) -> tuple:
    return (v % 16 == 0, v == 1, -(1 << 31) <= v < (1 << 31))


def launch_hooks_installed() -> bool:
    """True when a Triton launch enter/exit hook is installed (None or an empty HookChain: none)."""
    return any(getattr(h, "calls", h) for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


class CachedLauncher:
    """``launcher(key, programs, args, constexprs, num_warps)`` launches ``kernel`` on a 1-D grid.

    args: the non-constexpr arguments in declaration order; constexprs: the constexpr arguments,
    in declaration order (they follow the others in every kernel that uses this).
    key: whatever about ``args`` shapes the compiled code (dtypes, alignment: ``ptr_key``/``int_key``);
    the constexprs and num_warps are part of the cache key here, so a caller cannot forget one (a
    constexpr derived from an argument, missing from the key, once reused a kernel compiled for
    another hidden size).
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.compiled: dict[tuple, Any] = {}
        self.enabled = os.environ.get("TRITON_INTERPRET", "0") != "1" and os.environ.get("SHARDKIT_FAST_LAUNCH", "1") == "1"

    def __call__(self, key: tuple, programs: int, args: tuple, constexprs: dict, num_warps: int) -> None:
        key = (key, *constexprs.values(), num_warps)
        compiled = self.compiled.get(key) if self.enabled else None
        if compiled is None or launch_hooks_installed():
            compiled = self.kernel[(programs,)](*args, **constexprs, num_warps=num_warps)
            if self.enabled:
                self.compiled[key] = compiled
            return
        stream = torch._C._cuda_getCurrentRawStream(args[0].device.index)
        compiled.run(programs, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *constexprs.values())
