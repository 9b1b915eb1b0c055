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
