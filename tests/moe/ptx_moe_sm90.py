"""Compile the MoE kernels for sm_90 with the GPU launch configuration and print what their PTX uses, as
JSON (a compile check of the GPU path on a machine without a GPU: Triton bundles ptxas).

Run as a module in a process *without* TRITON_INTERPRET (interpreted kernels cannot be compiled):
    python -m tests.moe.ptx_moe_sm90
"""
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from shardkit.kernels.moe.combine import moe_combine_kernel
from shardkit.kernels.moe.counts import moe_counts_kernel
from shardkit.kernels.moe.dispatch import moe_dispatch_kernel
from shardkit.kernels.moe.launch_config import moe_launch_config

HIDDEN, TOPK, EXPERTS, WORLD = 7168, 8, 256, 2
# Pointers (dtype by name; the rest int32), and arguments that are multiples of 16 on every call.
POINTERS = {"x_ptr": "*bf16", "expert_out_ptr": "*bf16", "residual_ptr": "*bf16", "out_ptr": "*bf16",
            "topk_ptr": "*i64", "weights_ptr": "*fp32", "table_ptr": "*i64"}
INT64 = {"error_record_addr"}
DIVISIBLE = {"hidden", "max_tokens", "row_elems", "comb_elems", "counts_row", "recv_x_off", "recv_scales_off",
             "src_rank_off", "src_token_off", "local_expert_off", "weight_off", "expert_row_off", "inv_off",
             "expert_index_off", "comb_off", "counts_off", "experts"}


def compile_kernel(kernel, consts: dict, warps: int):
    names = list(kernel.arg_names)
    signature = {n: "constexpr" if n in consts else POINTERS.get(n, "*i32" if n.endswith("_ptr") else
                                                                  ("i64" if n in INT64 else "i32")) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n in DIVISIBLE or signature[n].startswith("*")}
    src = ASTSource(kernel, signature, consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})



def configs() -> dict:
    """name -> (kernel, constexprs, warps): the GPU launch configurations (launch_config.py, 132 SMs)."""
    out = {}
    for fp8 in (False, True):
        lc = moe_launch_config(4096, HIDDEN, 2, fp8, 132, interpret=False)
        out[f"dispatch-fp8{int(fp8)}"] = (moe_dispatch_kernel, {
            "K": TOPK, "K_P2": TOPK, "WORLD": WORLD, "WORLD_P2": WORLD, "BLOCK_T": lc.dispatch_block_t,
            "BLOCK_H": lc.dispatch_block_h, "META_T": lc.meta_t, "FP8": fp8}, lc.dispatch_warps)
    lc = moe_launch_config(4096, HIDDEN, 2, False, 132, interpret=False)
    for residual in (False, True):
        # The default, and software-pipelined chunk loops (3 stages of 512-channel chunks, 8 warps: the tuning
        # candidate; 16 warps spilled 20 bytes without a residual)
        for name, stages, block_h, warps in (("", lc.combine_stages, lc.combine_block_h, lc.combine_warps),
                                             ("-s3h512w8", 3, 512, 8)):
            out[f"combine-residual{int(residual)}{name}"] = (moe_combine_kernel, {
                "K": TOPK, "WORLD": WORLD, "WORLD_P2": WORLD, "BLOCK_T": lc.combine_block_t,
                "BLOCK_H": block_h, "HAS_RESIDUAL": residual, "STAGES": stages}, warps)
    out["counts"] = (moe_counts_kernel, {"K": TOPK, "K_P2": TOPK, "BLOCK_T": lc.layout_block_t, "WORLD": WORLD,
                                         "WORLD_P2": WORLD, "CHUNKS_P2": 256, "E_P2": EXPERTS,
                                         "L_P2": EXPERTS // WORLD, "ALIGN_P2": 16, "CHUNK_BLOCK": 16},
                     lc.layout_warps)
    return out


def spill_bytes(ptx: str) -> int:
    """Bytes of register spill stores that Triton's bundled ptxas reports for the PTX at sm_90a."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        info = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True,
                              text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", info))


def features(compiled) -> dict:
    ptx = compiled.asm["ptx"]
    return {
        "shared_bytes": compiled.metadata.shared,
        "cp_async": "cp.async.cg.shared.global" in ptx,
        "spill_bytes": spill_bytes(ptx),
        "loads": sorted(set(re.findall(r"ld\.global\S*", ptx))),
        "stores": sorted(set(re.findall(r"st\.global\S*", ptx))),
        "release_arrival": bool(re.search(r"atom\.global\.sys\.release\.exch\.b64", ptx)),
        "acquire_wait": bool(re.search(r"atom\.global\.sys\.acquire\.add", ptx)),
        "fp8_convert": bool(re.search(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx)),
    }


if __name__ == "__main__":
    print(json.dumps({name: features(compile_kernel(*cfg)) for name, cfg in configs().items()}))
