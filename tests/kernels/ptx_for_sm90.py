"""Compile the peer-memory kernels for sm_90 and print what their PTX uses, as JSON.

Run as a module in a process *without* TRITON_INTERPRET (interpreted kernels cannot be compiled):
    python -m tests.kernels.ptx_for_sm90
"""
import json
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from shardkit.kernels.all_reduce.flat import flat_all_reduce_kernel
from shardkit.kernels.all_reduce.tree import tree_all_reduce_kernel

KERNELS = {"flat": flat_all_reduce_kernel, "tree": tree_all_reduce_kernel}
CONFIGS = [(k, d, w, zc) for k in KERNELS for d in ("bf16", "fp32") for w, zc in ((2, False), (4, True), (8, False))]
INT_ARGS = {"numel", "shard", "rank", "sig", "x_offset", "buffer_bytes", "timeout_iters"}
ALIGNED = ("x_ptr", "out_ptr", "table_ptr", "numel", "shard", "buffer_bytes")


def compile_ptx(kernel, dtype: str, world: int, zero_copy: bool) -> str:
    names = list(kernel.arg_names)
    ptr = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "table_ptr": "*i64", "error_record_addr": "i64"}
    consts = {"WORLD": world, "WORLD_P2": triton.next_power_of_2(world), "BLOCK": 4096, "ZERO_COPY": zero_copy}
    signature = {n: ptr.get(n, "i32" if n in INT_ARGS else "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED if n in names}
    src = ASTSource(kernel, signature, consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]


def features(ptx: str) -> dict:
    return {
        "loads": sorted(set(re.findall(r"ld\.global\S*", ptx))),
        "stores": sorted(set(re.findall(r"st\.global\S*", ptx))),
        "release_arrival": bool(re.search(r"atom\.global\.sys\.release\.exch\.b64", ptx)),
        "acquire_wait": bool(re.search(r"atom\.global\.sys\.acquire\.add", ptx)),
    }


def features_in_subprocess(module: str) -> dict:
    """Run ``python -m <module>`` in a process without TRITON_INTERPRET; its last line is the JSON."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", module], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_fast_and_ordered(f: dict) -> None:
    """16-byte loads and stores, no 2-byte accesses, system-scope release arrival and acquire wait."""
    assert "ld.global.v4.b32" in f["loads"], f["loads"]
    assert "st.global.v4.b32" in f["stores"], f["stores"]
    assert not any(op.endswith((".b16", ".u16")) for op in f["loads"] + f["stores"]), \
        f"2-byte accesses: an alignment hint was lost ({f['loads']}, {f['stores']})"
    assert f["release_arrival"], "arrival must be a system-scope release"
    assert f["acquire_wait"], "wait must be a system-scope acquire"


if __name__ == "__main__":
    print(json.dumps({"-".join(map(str, c)): features(compile_ptx(KERNELS[c[0]], *c[1:])) for c in CONFIGS}))
