"""Dtype-dependent tolerances, in one place for every test.

Collectives accumulate in fp32 and round once to the output dtype, so their error is one
rounding of the output dtype; attention kernels add the error of fp32-accumulated dots.
"""
import torch

# (atol, rtol) for one rounding to the dtype, against a float64 reference.
ROUNDING = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
}

# (atol, rtol) for outputs of attention-like kernels (dots + softmax) against float64.
ATTENTION = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tol(table: dict, dtype: torch.dtype) -> dict:
    """Keyword arguments for torch.testing.assert_close."""
    atol, rtol = table[dtype]
    return {"atol": atol, "rtol": rtol}
