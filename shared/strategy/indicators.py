"""Indicators whose value at bar ``t`` has the same bits however much history precedes it.

Every builtin strategy has two forms: ``decide`` sees only its last ``get_required_lookback()``
bars, ``signals`` sees the whole history at once. Both must agree bar for bar, and a comparison
such as ``fast > slow`` flips on a single ulp, so "close enough" is not enough: the two forms
must compute every value with *the same sequence of float operations*.

That rules out the usual tools. ``pandas.Series.rolling(n).mean()`` keeps a running sum whose
rounding error depends on every bar before the window; ``cumsum`` differences likewise;
``np.mean`` over ``sliding_window_view`` uses pairwise summation whose order depends on numpy's
iteration strategy. Each function here instead computes the value at ``t`` from the bars of its
own window only, adding (or recurring over) them in a fixed order with elementwise numpy
operations, which are correctly rounded IEEE-754 ops per element. So the result for a 1-bar
output computed from a window-sized array is identical, bit for bit, to the same bar computed
from the full array.

All functions take a 1-D float array and return a float64 array of the same length, with NaN
where the window is not full yet. Cost is ``O(n * len(x))`` — a few milliseconds for 100k bars
and the window sizes strategies use.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["cross_above", "cross_below", "ema", "pct_change", "rolling_max", "sma"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def _as_float_array(x: npt.ArrayLike) -> FloatArray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"expected a 1-D array of prices, got shape {a.shape}")
    return a


def _check_window(name: str, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{name}: window must be a positive int, got {n!r}")


def sma(x: npt.ArrayLike, n: int) -> FloatArray:
    """Simple moving average over ``n`` bars, ending at (and including) each bar.

    ``out[t] = (((x[t-n+1] + x[t-n+2]) + ...) + x[t]) / n`` — the window's values are added
    left to right, one shifted slice at a time, so ``out[t]`` never depends on bars before
    ``t-n+1``. NaN for the first ``n-1`` bars.
    """
    _check_window("sma", n)
    a = _as_float_array(x)
    out = np.full(a.shape, np.nan)
    m = a.size - n + 1
    if m <= 0:
        return out
    total = a[0:m].copy()
    for k in range(1, n):
        total = total + a[k : k + m]
    out[n - 1 :] = total / n
    return out


def ema(x: npt.ArrayLike, n: int, window: int) -> FloatArray:
    """Exponential moving average with ``alpha = 2 / (n + 1)``, windowed over ``window`` bars.

    At each bar ``t`` the recursion ``e = alpha * x[k] + (1 - alpha) * e`` runs over the
    ``window`` bars ending at ``t``, seeded with the window's first value. The classic EMA
    runs from the start of the data instead, which makes ``ema[t]`` depend on all history and
    so differ between a strategy that sees the whole frame and one that sees its last bars.
    The seed keeps a weight of ``(1 - alpha) ** (window - 1)``: with ``window = 4 * n`` that
    is about ``e**-8 ≈ 3e-4`` (``n = 50``: 3.5e-4), so the windowed EMA differs from the
    classic one by that weight times the gap between the seed and the classic EMA. NaN for
    the first ``window - 1`` bars.
    """
    _check_window("ema", n)
    _check_window("ema", window)
    a = _as_float_array(x)
    out = np.full(a.shape, np.nan)
    m = a.size - window + 1
    if m <= 0:
        return out
    alpha = 2.0 / (n + 1)
    keep = 1.0 - alpha
    e = a[0:m].copy()
    for k in range(1, window):
        e = alpha * a[k : k + m] + keep * e
    out[window - 1 :] = e
    return out


def rolling_max(x: npt.ArrayLike, n: int) -> FloatArray:
    """Highest value over the ``n`` bars ending at each bar (exact: max does not round).

    NaN for the first ``n-1`` bars, and wherever the window holds a NaN.
    """
    _check_window("rolling_max", n)
    a = _as_float_array(x)
    out = np.full(a.shape, np.nan)
    m = a.size - n + 1
    if m <= 0:
        return out
    top = a[0:m].copy()
    for k in range(1, n):
        top = np.maximum(top, a[k : k + m])
    out[n - 1 :] = top
    return out


def pct_change(x: npt.ArrayLike, n: int) -> FloatArray:
    """Relative change over ``n`` bars: ``x[t] / x[t-n] - 1``. NaN for the first ``n`` bars."""
    _check_window("pct_change", n)
    a = _as_float_array(x)
    out = np.full(a.shape, np.nan)
    if a.size <= n:
        return out
    out[n:] = a[n:] / a[:-n] - 1.0
    return out


def cross_above(a: npt.ArrayLike, b: npt.ArrayLike) -> BoolArray:
    """``True`` at ``t`` where ``a[t] > b[t]`` and ``a[t-1] <= b[t-1]``; never at bar 0.

    ``b`` may be a scalar (a threshold). Any NaN involved makes the bar ``False``.
    """
    x = _as_float_array(a)
    y = np.broadcast_to(np.asarray(b, dtype=np.float64), x.shape)
    out = np.zeros(x.shape, dtype=np.bool_)
    out[1:] = (x[1:] > y[1:]) & (x[:-1] <= y[:-1])
    return out


def cross_below(a: npt.ArrayLike, b: npt.ArrayLike) -> BoolArray:
    """``True`` at ``t`` where ``a[t] < b[t]`` and ``a[t-1] >= b[t-1]``; never at bar 0."""
    x = _as_float_array(a)
    y = np.broadcast_to(np.asarray(b, dtype=np.float64), x.shape)
    out = np.zeros(x.shape, dtype=np.bool_)
    out[1:] = (x[1:] < y[1:]) & (x[:-1] >= y[:-1])
    return out
