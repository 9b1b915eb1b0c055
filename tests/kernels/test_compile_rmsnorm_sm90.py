"""The fused all-reduce + residual + RMSNorm kernels compile for Hopper (sm_90) on any machine, with
16-byte loads and stores (peer rows, x, residual, weight, outputs) and system-scope release/acquire
flags. No GPU needed: Triton bundles ptxas."""
import pytest

from .ptx_for_sm90 import assert_fast_and_ordered, features_in_subprocess
from .ptx_rmsnorm_sm90 import CONFIGS


@pytest.fixture(scope="module")
def ptx_features() -> dict:
    return features_in_subprocess("tests.kernels.ptx_rmsnorm_sm90")


@pytest.mark.parametrize("config", ["-".join(map(str, c)) for c in CONFIGS])
def test_ptx_for_sm90(ptx_features, config):
    assert_fast_and_ordered(ptx_features[config])
