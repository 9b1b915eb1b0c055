"""Compile the decode attention kernels for sm_90 with the GPU launch policy and print what their PTX uses,
as JSON (a compile check of the GPU path on a machine without a GPU: Triton bundles ptxas).

Run as a module in a process *without* TRITON_INTERPRET (interpreted kernels cannot be compiled):
    python -m tests.attention.ptx_decode_sm90
"""
import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from shardkit.kernels.attention.decode import decode_combine_kernel, decode_config, decode_split_kernel
from tests.moe.ptx_moe_sm90 import spill_bytes

# Strides and pointers that are multiples of 16 (elements) / 16-byte aligned on every TPLlama call.
DIVISIBLE = {"stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh", "stride_vn",
             "stride_ob", "stride_oh"}


def compile_ptx(kernel, pointers: dict, consts: dict, warps: int) -> str:
    names = list(kernel.arg_names)
    signature = {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n == "qk_scale" else "i32")
                 for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n in DIVISIBLE or signature[n].startswith("*")}
    src = ASTSource(kernel, signature, consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]


def configs() -> dict:
    """name -> (kernel, pointer types, constexprs, warps) for the policy's 70B-shaped TP=2 decode (bf16,
    8 query heads per KV head, head dim 128) with several splits and with one, and fp16 head dim 64."""
    out = {}
    for name, dtype, batch, n_kv, group, hd in (("bf16-b1", "bf16", 1, 4, 8, 128), ("bf16-b32", "bf16", 32, 8, 8, 128),
                                                ("fp16-hd64", "fp16", 1, 2, 2, 64)):
        config = decode_config(batch, n_kv, 4096, hd, 2, 132)
        pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "q_pos_ptr": "*i64",
                    "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{dtype}"}
        out[f"split-{name}-splits{config.splits}"] = (decode_split_kernel, pointers, {
            "GROUP": group, "GROUP_P2": 16, "HEAD_DIM": hd, "HD_P2": hd, "BLOCK_N": config.block_n, "HAS_POS": True,
            "SINGLE": config.splits == 1, "DOT_FP32": False}, config.warps)
    out["combine-bf16"] = (decode_combine_kernel, {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16"},
                           {"HEAD_DIM": 128, "HD_P2": 128, "BLOCK_S": 32}, 4)
    return out


def features(ptx: str) -> dict:
    return {"spill_bytes": spill_bytes(ptx), "mma": "mma.sync" in ptx or "wgmma" in ptx,
            "async_copy": "cp.async" in ptx, "loads": sorted(set(re.findall(r"ld\.global\S*", ptx)))}


if __name__ == "__main__":
    print(json.dumps({name: features(compile_ptx(*cfg)) for name, cfg in configs().items()}))
