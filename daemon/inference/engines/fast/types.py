"""What every part of the fast engine shares: its array types and its refusal."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Array = np.ndarray
Activation = Callable[[Array], Array]


class UnsupportedModel(ValueError):
    """The fast engine cannot compute this model; the message says why."""
