"""Value checks and message helpers shared by the dataset loaders.

A loader rejects a value that float32 (the model's precision) cannot hold, and
by default one far outside its column's typical magnitude (a unit slip, a
sentinel such as 1e30); messages show numpy scalars as the Python values they
hold.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


# A value more than this many times its column's typical magnitude is taken
# for a data error (a unit slip, a sentinel such as 1e30 or -9.9e37) unless
# the caller accepts it (`allow_outliers=True`).
OUTLIER_FACTOR = 1e6
FLOAT32_MAX = float(np.finfo(np.float32).max)


def column_scale(values) -> float:
    """The typical magnitude of one column: the median of its non-zero
    absolute values (0 when all are zero). Zeros are left out so that a
    mostly-zero column (meal sizes, doses) keeps the scale of its non-zero
    entries; the median ignores a few wild values.

    Args:
      values: (R,) finite numbers.
    """
    magnitude = np.abs(np.asarray(values, np.float64))
    nonzero = magnitude[magnitude > 0]
    return float(np.median(nonzero)) if nonzero.size else 0.0


def check_column_values(name: str, values, where, *, allow_outliers: bool = False) -> None:
    """Rejects a value of one (R,) column that float32 cannot hold, or (unless
    `allow_outliers`) one more than `OUTLIER_FACTOR` times the column's
    typical magnitude (`column_scale`).

    Args:
      name: how messages call the column.
      values: (R,) finite float64 values.
      where: row index -> how messages call that row ("data.csv: line 7").
      allow_outliers: accept values outside the column's scale.

    Raises:
      ValueError naming the column, the row and the value.
    """
    values = np.asarray(values, np.float64)
    magnitude = np.abs(values)
    bad = np.flatnonzero(magnitude > FLOAT32_MAX)
    if bad.size:
        raise ValueError(f"column {name!r}: {where(bad[0])} has {values[bad[0]]:g}, beyond "
                         f"float32's range (±{FLOAT32_MAX:.3g}) that the model computes in")
    if allow_outliers:
        return
    scale = column_scale(values)
    bad = np.flatnonzero(magnitude > OUTLIER_FACTOR * scale)
    if bad.size:
        raise ValueError(
            f"column {name!r}: {where(bad[0])} has {values[bad[0]]:g}, more than "
            f"{OUTLIER_FACTOR:g} times the column's typical magnitude {scale:.4g} (the median "
            f"of its non-zero absolute values; {bad.size} such value(s)); correct it, or "
            f"accept it with allow_outliers=True")


def check_array_values(name: str, array: np.ndarray, allow_outliers: bool) -> None:
    """`check_column_values` on each column of a (T,) or (T, K) array whose
    rows are the file's rows (messages name "row i, column j")."""
    array = np.asarray(array)
    if array.dtype.kind not in "iuf" or array.size == 0:
        return
    columns = array.reshape(array.shape[0], -1)
    for j in range(columns.shape[1]):
        values = columns[:, j].astype(np.float64)
        if not np.all(np.isfinite(values)):
            continue     # validate_transitions names non-finite values
        label = name if columns.shape[1] == 1 and array.ndim == 1 else f"{name}[:, {j}]"
        check_column_values(label, values, lambda i: f"row {i}",
                            allow_outliers=allow_outliers)


def plain(value):
    """A numpy scalar as the Python value it holds (messages show 0.5 and
    'a', not np.float64(0.5) and np.str_('a'))."""
    return value.item() if isinstance(value, np.generic) else value


def preview(items: Sequence, limit: int = 5) -> str:
    """The first `limit` items as a short list for messages, "[0, 1, 2, ...]"."""
    items = list(items)
    shown = ", ".join(repr(plain(x)) for x in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"
