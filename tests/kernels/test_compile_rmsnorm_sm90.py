"""The fused all-reduce + residual + RMSNorm kernels compile for Hopper (sm_90) on any machine, with
16-byte loads and stores (peer rows, x, residual, weight, outputs) and system-scope release/acquire
flags. No GPU needed: Triton bundles ptxas."""
import json
import os
import subprocess
import sys

import pytest

from .ptx_rmsnorm_sm90 import CONFIGS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ptx_features() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.ptx_rmsnorm_sm90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("config", ["-".join(map(str, c)) for c in CONFIGS])
def test_ptx_for_sm90(ptx_features, config):
    f = ptx_features[config]
    assert "ld.global.v4.b32" in f["loads"], f["loads"]
    assert not any(op.endswith((".b16", ".u16")) for op in f["loads"] + f["stores"]), \
        f"2-byte accesses: an alignment hint was lost ({f['loads']}, {f['stores']})"
    assert "st.global.v4.b32" in f["stores"], f["stores"]
    assert f["release_arrival"], "arrival must be a system-scope release"
    assert f["acquire_wait"], "wait must be a system-scope acquire"
