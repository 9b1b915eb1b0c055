"""Input checks shared by the collectives over the peer-memory kernels (one message per mistake)."""
from __future__ import annotations

import torch

from ..memory.protocol import DTYPE_CODES

SUPPORTED_DTYPES = tuple(DTYPE_CODES)  # float32, float16, bfloat16: what the kernels reduce


def check_tensor(t: torch.Tensor, name: str, device: torch.device, what: str = "all_reduce") -> None:
    """Raise a TypeError/ValueError naming ``name`` unless ``t`` is a contiguous fp32/fp16/bf16 tensor
    on ``device`` (this rank's)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{what}: {name} must be on {device} (this rank's device), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{what}: {name} must be contiguous (call .contiguous() first)")
