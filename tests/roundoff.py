"""Float comparisons stated in units of the dtype's round-off, independent of CPU and threads.

A tolerance like ``rtol=1e-15`` is below what float64 can promise once a BLAS library changes
its summation order (another CPU, another thread count). Here a tolerance is a count of
machine epsilons: ``rtol = units * eps`` element-wise, plus ``atol = units * eps * max|expected|``
so entries that cancel to near zero are judged against the scale of the whole result (the
error of a sum is relative to its terms, not to its value).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Default allowance: about 1e3 round-offs (≈ 2.2e-13 in float64, ≈ 1.2e-4 in float32).
UNITS = 1e3


def roundoff(dtype: torch.dtype, units: float = UNITS) -> float:
    """``units`` machine epsilons of ``dtype``."""
    return units * torch.finfo(dtype).eps


def assert_roundoff_close(actual: Tensor, expected: Tensor, *, units: float = UNITS) -> None:
    """``actual`` equals ``expected`` up to ``units`` round-offs of ``expected``'s dtype."""
    tol = roundoff(expected.dtype, units)
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)
