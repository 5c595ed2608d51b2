"""Checks of config fields shared by the library's frozen config dataclasses."""

from __future__ import annotations

import numpy as np


def positive_int(name: str, value) -> None:
    """ValueError naming `name` unless `value` is an integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: must be a positive integer; got {value!r}")
