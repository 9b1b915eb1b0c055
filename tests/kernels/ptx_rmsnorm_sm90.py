"""Compile the fused all-reduce + residual + RMSNorm kernels for sm_90 and print what their PTX uses,
as JSON (the all-reduce kernels' check, tests/kernels/ptx_for_sm90.py, for these kernels).

Run as a module in a process *without* TRITON_INTERPRET (interpreted kernels cannot be compiled):
    python -m tests.kernels.ptx_rmsnorm_sm90
"""
import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from shardkit.kernels.all_reduce.rmsnorm import (chunk_columns, chunk_warps, default_warps,
                                                 oneshot_rmsnorm_kernel, twoshot_rmsnorm_kernel)

from .ptx_for_sm90 import features

KERNELS = {"oneshot": oneshot_rmsnorm_kernel, "twoshot": twoshot_rmsnorm_kernel}
# (kernel, dtype, world, hidden): decode hidden sizes, 16 warps at 8192 (one-shot); the two-shot chunk
# of 64 tokens on 132 SMs.
CONFIGS = [(k, d, w, h) for k in KERNELS for d in ("bf16", "fp32") for w, h in ((2, 4096), (8, 8192))]
INT_ARGS = {"tokens", "hidden", "ws_stride", "rank", "sig", "half_bytes", "timeout_iters", "rows_per_rank"}
TENSORS = ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "res_out_ptr")
# Hidden sizes that are multiples of 16 (every model's) are specialised as such by Triton at launch.
ALIGNED = TENSORS + ("table_ptr", "hidden", "ws_stride")


def compile_ptx(kernel, dtype: str, world: int, hidden: int) -> str:
    names = list(kernel.arg_names)
    types = {**{n: f"*{dtype}" for n in TENSORS}, "table_ptr": "*i64", "status_addr": "i64", "eps": "fp32"}
    consts = {"WORLD": world, "WORLD_P2": triton.next_power_of_2(world)}
    if kernel is twoshot_rmsnorm_kernel:
        block_c = chunk_columns(hidden, -(-64 // world), 132)
        consts.update(BLOCK_C=block_c, C_P2=triton.next_power_of_2(-(-hidden // block_c)))
        warps = chunk_warps(block_c)
    else:
        consts["BLOCK_H"] = triton.next_power_of_2(hidden)
        warps = default_warps(hidden)
    signature = {n: types.get(n, "i32" if n in INT_ARGS else "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED}
    src = ASTSource(kernel, signature, consts, attrs=attrs)
    options = {"num_warps": warps}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


if __name__ == "__main__":
    print(json.dumps({"-".join(map(str, c)): features(compile_ptx(KERNELS[c[0]], *c[1:])) for c in CONFIGS}))
