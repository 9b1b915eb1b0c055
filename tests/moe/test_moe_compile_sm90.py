"""The MoE kernels compile for Hopper (sm_90) with the GPU launch configuration, on any machine (Triton
bundles ptxas), and the PTX has what we need: 16-byte payload accesses (no 2-byte ones), system-scope
release/acquire barrier flags, the hardware e4m3 conversion for fp8 dispatch, no register spills, and
for the pipelined loops (the combine's chunks at 3 stages, the counts exchange's scan) cp.async copies
into at most an H100/H200 block's 227 KiB of shared memory."""
import pytest

from ..kernels.ptx_for_sm90 import features_in_subprocess
from .ptx_moe_sm90 import configs


@pytest.fixture(scope="module")
def ptx_features() -> dict:
    return features_in_subprocess("tests.moe.ptx_moe_sm90")


@pytest.mark.parametrize("name", list(configs()))
def test_ptx_for_sm90(ptx_features, name):
    f = ptx_features[name]
    assert not any(op.endswith((".b16", ".u16")) for op in f["loads"] + f["stores"]), f
    if name.startswith(("dispatch", "combine")):
        assert "ld.global.v4.b32" in f["loads"], f["loads"]
        assert any(op.startswith("st.global.v") for op in f["stores"]), f["stores"]
    assert f["release_arrival"] and f["acquire_wait"], f
    assert f["fp8_convert"] == name.endswith("fp81"), f
    assert f["spill_bytes"] == 0, f"{name} spills registers: {f}"
    assert f["cp_async"] == (name.endswith("s3h512w8") or name == "counts"), f  # pipelined loops
    assert f["shared_bytes"] <= 227 * 1024, f
