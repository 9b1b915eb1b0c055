"""The local residual + partial-attention + RMSNorm kernel of SPD blocks (kernels/spd/add_rmsnorm.py)
in the Triton interpreter (or on a GPU) against a float64 reference."""
import pytest
import torch

from shardkit.kernels.spd import add_rmsnorm

from ..tolerances import ROUNDING, tol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """float64: h = residual + x rounded to the dtype (the residual stream's precision), then RMSNorm."""
    h = (residual.double() + x.double()).to(x.dtype).double()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return out, h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 100), (3, 5, 96), (7, 1000)])
def test_matches_float64_reference(dtype, shape):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 1000)
    x, residual = (torch.randn(*shape, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).to(DEVICE)
    before = [t.clone() for t in (x, residual, weight)]
    out, res_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    got = add_rmsnorm(x, residual, weight, 1e-5, out=out, residual_out=res_out)
    assert got[0] is out and got[1] is res_out
    ref_out, ref_h = reference(x, residual, weight, 1e-5)
    assert torch.isfinite(out).all() and torch.isfinite(res_out).all(), "an element was not written"
    torch.testing.assert_close(res_out.double(), ref_h, **tol(ROUNDING, dtype))
    torch.testing.assert_close(out.double(), ref_out, **tol(ROUNDING, dtype))
    for t, b in zip((x, residual, weight), before):
        assert torch.equal(t, b), "an input was modified"
    # without residual_out: same out, the sum not stored; in place over x and residual: same bits
    alone, none = add_rmsnorm(x, residual, weight, 1e-5)
    assert none is None and torch.equal(alone, out)
    x2, r2 = x.clone(), residual.clone()
    add_rmsnorm(x2, r2, weight, 1e-5, out=x2, residual_out=r2)
    assert torch.equal(x2, out) and torch.equal(r2, res_out)


def test_empty_rows():
    x = torch.empty(0, 64, device=DEVICE)
    out, _ = add_rmsnorm(x, x, torch.ones(64, device=DEVICE), 1e-6)
    assert out.shape == (0, 64)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    cases = [
        (lambda: add_rmsnorm(x.int(), x, w, 1e-6), "x must be float32"),
        (lambda: add_rmsnorm(x, x[:1], w, 1e-6), "residual must have x's shape"),
        (lambda: add_rmsnorm(x.t(), x.t(), w[:2], 1e-6), "x must be contiguous"),
        (lambda: add_rmsnorm(x, x.half(), w, 1e-6), "residual must have"),
        (lambda: add_rmsnorm(x, x, w[:4], 1e-6), "weight must be [hidden]"),
        (lambda: add_rmsnorm(x, x, w, -1.0), "eps"),
        (lambda: add_rmsnorm(x, x, w, 1e-6, out=torch.empty(3, 8, device=DEVICE)), "out must be"),
        (lambda: add_rmsnorm(x, x, w, 1e-6, out=x, residual_out=x), "different buffers"),
        (lambda: add_rmsnorm(torch.zeros((), device=DEVICE), x, w, 1e-6), "0-d"),
        (lambda: add_rmsnorm(torch.zeros(1, 40000, device=DEVICE), torch.zeros(1, 40000, device=DEVICE),
                             torch.ones(40000, device=DEVICE), 1e-6), "exceeds"),
    ]
    for case, text in cases:
        with pytest.raises((TypeError, ValueError)) as info:
            case()
        assert text in str(info.value), (text, str(info.value))
