"""The local attention chunk on torch's own LSE-returning SDPA kernels (flash, cuDNN).

Ring attention needs, for every chunk pair, the output *and* the log-sum-exp of each query
row. ``F.scaled_dot_product_attention`` returns only the output, but the SDPA backends it
dispatches to compute the LSE anyway, and torch exposes them as aten ops that return it:

* ``"flash"``: ``aten._scaled_dot_product_flash_attention`` on CUDA (FlashAttention-2, fp16/
  bf16, native grouped-query attention) and ``aten._scaled_dot_product_flash_attention_for_cpu``
  on CPU (any float dtype), so the torch path of ring attention is tested on CPU too;
* ``"cudnn"``: ``aten._scaled_dot_product_cudnn_attention`` (CUDA, fp16/bf16). Where this torch's
  cuDNN op rejects grouped-query shapes, the kv heads are expanded to the q heads (a copy of
  k and v per call; remembered after the first refusal).

These kernels know no global positions, only "no mask" and the aligned lower-triangular mask
of a square block. That is enough for the load-balanced ring layout, where every chunk pair
is one rectangle of fully visible keys or one square causal diagonal (see
``shardkit.collectives.attention.ring``); any other mask uses the Triton kernel
``attention_chunk``, which masks by global position.

Semantics match ``attention_chunk``: ``lse`` is the fp32 natural-log log-sum-exp of the scaled
scores; a chunk with no keys gives ``out = 0`` and ``lse = -inf``; NaN reaches exactly the rows
(values: the columns) that attend to it. torch's kernels do not do that by themselves: on CPU the
flash kernel gives a row whose query holds NaN ``out = 0, lse = 0`` when there are fewer than 8 keys
(the NaN is lost; torch 2.13), and with the causal mask a NaN value reaches rows of its tile that
cannot see it (p = 0 times NaN). So NaN
keys and values are zeroed before a causal call, and NaN is put back from masks of where q, k and
v hold it (a few reductions over the inputs, no host synchronisation; small next to the
attention itself).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .chunk import check_qkv

__all__ = ["LOCAL_BACKENDS", "SDPA_BACKENDS", "sdpa_backends", "sdpa_with_lse", "kv_expanded_backends"]

SDPA_BACKENDS = ("flash", "cudnn")
LOCAL_BACKENDS = ("triton",) + SDPA_BACKENDS  # the kernels a ring can run for its local chunks

_aten = torch.ops.aten
_EXPAND_KV: set = set()  # backends whose op refused grouped-query shapes in this process


def sdpa_backends(device: torch.device, dtype: torch.dtype) -> Tuple[str, ...]:
    """The SDPA backends of this torch that can run ``dtype`` on ``device`` (maybe empty)."""
    device = torch.device(device)
    if device.type == "cpu":
        return ("flash",) if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu") else ()
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return ()
    found = []
    if torch.backends.cuda.is_flash_attention_available() and hasattr(_aten, "_scaled_dot_product_flash_attention"):
        found.append("flash")
    if torch.backends.cudnn.is_available() and hasattr(_aten, "_scaled_dot_product_cudnn_attention"):
        found.append("cudnn")
    return tuple(found)


def kv_expanded_backends() -> Tuple[str, ...]:
    """The backends that refused grouped-query shapes in this process (their kv heads get expanded)."""
    return tuple(sorted(_EXPAND_KV))


def _expand(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.repeat_interleave(groups, dim=1) if groups > 1 else t


def _call(backend: str, q, k, v, causal: bool, scale: float):
    if q.device.type == "cpu":
        return _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
    if backend == "flash":
        return _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]


def sdpa_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    backend: str = "flash",
    nan_exact: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of a query block to a KV block on a torch SDPA kernel, with the LSE.

    Args:
        q: ``[B, Hq, Lq, D]`` (any strides with a unit last stride; slices along the sequence
            are fine). fp16/bf16 on CUDA; fp32/fp16/bf16 on CPU.
        k, v: ``[B, Hkv, Lk, D]``, same dtype and device; ``Hq % Hkv == 0``.
        causal: key ``j`` visible to query ``i`` iff ``j <= i`` (needs ``Lq == Lk``: the square
            block on the diagonal of a causal mask).
        softmax_scale: multiplies the scores; default ``1 / sqrt(D)``.
        backend: ``"flash"`` or ``"cudnn"`` (``sdpa_backends`` lists those available).
        nan_exact: put NaN exactly where the reference does (module docstring); ``False`` skips
            that bookkeeping (a few passes over k and v) for callers whose inputs hold no NaN,
            e.g. a model's hot path, and leaves NaN where the kernel puts it.

    Returns:
        ``out`` ``[B, Hq, Lq, D]`` in q's dtype and ``lse`` ``[B, Hq, Lq]`` fp32 (natural log),
        both new tensors; ``Lk == 0`` gives zeros and ``-inf``. NaN in q, k or v reaches exactly
        the rows that attend to it (module docstring).
    """
    check_qkv(q, k, v)
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"backend must be one of {SDPA_BACKENDS}, got {backend!r}")
    if backend not in sdpa_backends(q.device, q.dtype):
        raise ValueError(f"backend {backend!r} is not available for {q.dtype} on {q.device} with this torch "
                         f"(available: {sdpa_backends(q.device, q.dtype) or 'none'})")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if causal and Lq != Lk:
        raise ValueError(f"causal needs a square block (Lq == Lk), got Lq={Lq}, Lk={Lk}; "
                         "use attention_chunk with positions for other masks")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k and v need a unit stride in the head dim (last dim)")
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    if Lq == 0 or Lk == 0:  # the ops reject (CPU: crash on) empty blocks
        return (torch.zeros((B, Hq, Lq, D), dtype=q.dtype, device=q.device),
                torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float32, device=q.device))
    groups = Hq // Hkv
    if nan_exact:
        k_nan, v_nan = torch.isnan(k), torch.isnan(v)
        if causal:  # hidden NaN must not reach the kernel (see the module docstring)
            k, v = k.masked_fill(k_nan, 0.0), v.masked_fill(v_nan, 0.0)
    if backend in _EXPAND_KV:
        k, v = _expand(k, groups), _expand(v, groups)
    try:
        out, lse = _call(backend, q, k, v, causal, scale)
    except RuntimeError as e:
        if groups == 1 or backend in _EXPAND_KV or isinstance(e, torch.OutOfMemoryError):
            raise
        _EXPAND_KV.add(backend)  # this op has no grouped-query support: expand from now on
        out, lse = _call(backend, q, _expand(k, groups), _expand(v, groups), causal, scale)
    # cuDNN returns [B, H, L, 1]; some flash builds pad L: keep the rows of this block.
    lse = lse.reshape(B, Hq, -1)[..., :Lq].float()
    return _put_back_nan(q, k_nan, v_nan, out, lse, causal) if nan_exact else (out, lse)


def _put_back_nan(q: torch.Tensor, k_nan: torch.Tensor, v_nan: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """NaN where ``shardkit.reference.attention`` puts it: a row whose query, or a key it sees, holds
    NaN is NaN (``out`` and ``lse``); column d of a row that sees a value with NaN in column d is NaN.

    ``k_nan``/``v_nan``: ``isnan`` of k and v ``[B, Hkv, Lk, D]``. With ``causal`` (``Lq == Lk``) row i
    sees keys ``0..i`` (a running "any" along the keys), else every key.
    """
    Hkv = k_nan.shape[1]
    k_bad = k_nan.any(-1)  # [B, Hkv, Lk]
    if causal:
        k_seen, v_seen = k_bad.cummax(-1).values, v_nan.cummax(2).values
    else:
        k_seen, v_seen = k_bad.any(-1, keepdim=True), v_nan.any(2, keepdim=True)

    def by_kv_head(t: torch.Tensor) -> torch.Tensor:  # [B, Hq, ...] -> [B, Hkv, Hq // Hkv, ...], a view
        return t.unflatten(1, (Hkv, -1))

    row_nan = by_kv_head(torch.isnan(q).any(-1)) | k_seen[:, :, None]  # [B, Hkv, G, Lq]
    lse = by_kv_head(lse).masked_fill(row_nan, float("nan")).flatten(1, 2)
    out = by_kv_head(out).masked_fill(row_nan[..., None], float("nan"))
    out.masked_fill_(v_seen[:, :, None], float("nan"))
    return out.flatten(1, 2), lse
