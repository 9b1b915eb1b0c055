"""The decode attention kernels compile for Hopper (sm_90) with the GPU launch policy, on any machine
(Triton bundles ptxas): tensor-core dots, asynchronous (pipelined) K/V copies, no register spills."""
import pytest

from ..kernels.ptx_for_sm90 import features_in_subprocess
from .ptx_decode_sm90 import configs


@pytest.fixture(scope="module")
def ptx_features() -> dict:
    return features_in_subprocess("tests.attention.ptx_decode_sm90")


@pytest.mark.parametrize("name", list(configs()))
def test_ptx_for_sm90(ptx_features, name):
    f = ptx_features[name]
    assert f["spill_bytes"] == 0, f"{name} spills registers: {f}"
    if name.startswith("split"):
        assert f["mma"] and f["async_copy"], f
