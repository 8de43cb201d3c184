"""The project's one tolerance: how close two float32 results must be to count as equal.

Every check that holds one computation to another uses it: the model's start-up
self-check (one step at a time against the whole prefix), the fast engine's
parity guard against the reference engine, and the tests' oracle. Float32 with
different reduction orders differs by ~1e-7 per step; a real error (a wrong
weight, a lost state) is orders of magnitude larger.
"""

from __future__ import annotations

import numpy as np

ATOL = 1e-5
RTOL = 1e-5


def describe_difference(got: np.ndarray, want: np.ndarray, what: str) -> str | None:
    """None if `got` equals `want` within ATOL + RTOL * |want| (NaN where NaN), else what differs."""
    if got.shape != want.shape:
        return f"{what} has shape {got.shape}, expected {want.shape}"
    if np.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True):
        return None
    with np.errstate(invalid="ignore"):
        err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if np.isnan(err).any():
        return f"{what} is not finite where the other is"
    return f"{what} differs by up to {float(np.nanmax(err)):.3g} (tolerance {ATOL:g} + {RTOL:g} x |value|)"
