"""Shared helpers for the attention tests (not a test module)."""
import torch

try:  # tests/ on sys.path (pytest rootdir-relative imports) or the repo root on it
    from tolerances import ATTENTION, ROUNDING, tol  # noqa: F401
except ImportError:  # pragma: no cover
    from tests.tolerances import ATTENTION, ROUNDING, tol  # noqa: F401


def randn(*shape, dtype=torch.float32, device="cpu", gen=None):
    """Fresh normal data in ``dtype`` (generated in fp32, then rounded)."""
    return torch.randn(*shape, generator=gen, device=device).to(dtype)


def assert_close_inf(actual: torch.Tensor, expected: torch.Tensor, **kw) -> None:
    """assert_close that also requires the -inf entries to match exactly."""
    actual = actual.double()
    expected = expected.double()
    assert not torch.isnan(actual).any(), "NaN in output"
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), "-inf pattern differs"
    fin = torch.isfinite(expected)
    torch.testing.assert_close(actual[fin], expected[fin], **kw)


def assert_nan_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "", **kw) -> None:
    """The NaN and -inf patterns equal exactly, the rest close (NaN planted in inputs)."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), (f"{what}: NaN pattern differs: {int((nan_a & ~nan_e).sum())} extra, "
                                       f"{int((nan_e & ~nan_a).sum())} missing of {int(nan_e.sum())}")
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), f"{what}: -inf pattern differs"
    fin = torch.isfinite(expected)
    torch.testing.assert_close(actual[fin], expected[fin], msg=lambda m: f"{what}: {m}", **kw)


def plant_nan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: str, pos: int, col: int = 3):
    """Copies of q, k, v with one NaN in ``where`` ('q', 'k' or 'v') at sequence index ``pos``,
    head 0 of batch 0, head-dim column ``col``."""
    q, k, v = q.clone(), k.clone(), v.clone()
    {"q": q, "k": k, "v": v}[where][0, 0, pos, col] = float("nan")
    return q, k, v


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN included, which torch.equal never calls equal)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
