"""Compile the fused all-reduce + residual + RMSNorm kernels for sm_90 and print what their PTX uses,
as JSON (the all-reduce kernels' check, tests/kernels/ptx_for_sm90.py, for these kernels).

Run as a module in a process *without* TRITON_INTERPRET (interpreted kernels cannot be compiled):
    python -m tests.kernels.ptx_rmsnorm_sm90
"""
import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from shardkit.kernels.all_reduce.rmsnorm import flat_rmsnorm_kernel, rmsnorm_config, tree_rmsnorm_kernel

from .ptx_for_sm90 import features

KERNELS = {"flat": flat_rmsnorm_kernel, "tree": tree_rmsnorm_kernel}
# (kernel, dtype, world, hidden): decode hidden sizes, 16 warps at 8192 (flat); the tree chunk of 64
# tokens on 132 SMs, both from the launch policy (rmsnorm_config).
CONFIGS = [(k, d, w, h) for k in KERNELS for d in ("bf16", "fp32") for w, h in ((2, 4096), (8, 8192))]
INT_ARGS = {"tokens", "hidden", "ws_stride", "rank", "sig", "buffer_bytes", "timeout_iters", "rows_per_rank"}
TENSORS = ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "res_out_ptr")
# Hidden sizes that are multiples of 16 (every model's) are specialised as such by Triton at launch.
ALIGNED = TENSORS + ("table_ptr", "hidden", "ws_stride")


def compile_ptx(kernel, dtype: str, world: int, hidden: int) -> str:
    names = list(kernel.arg_names)
    types = {**{n: f"*{dtype}" for n in TENSORS}, "table_ptr": "*i64", "error_record_addr": "i64", "eps": "fp32"}
    consts = {"WORLD": world, "WORLD_P2": triton.next_power_of_2(world)}
    config = rmsnorm_config("tree" if kernel is tree_rmsnorm_kernel else "flat", 64, hidden, world, 132)
    if kernel is tree_rmsnorm_kernel:
        consts.update(BLOCK_C=config.block_c, C_P2=triton.next_power_of_2(-(-hidden // config.block_c)))
    else:
        consts["BLOCK_H"] = triton.next_power_of_2(hidden)
    warps = config.warps
    signature = {n: types.get(n, "i32" if n in INT_ARGS else "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED}
    src = ASTSource(kernel, signature, consts, attrs=attrs)
    options = {"num_warps": warps}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


if __name__ == "__main__":
    print(json.dumps({"-".join(map(str, c)): features(compile_ptx(KERNELS[c[0]], *c[1:])) for c in CONFIGS}))
