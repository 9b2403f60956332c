"""What a per-bar strategy pays per bar: the same ``decide`` rule run by ``stratorch run``
(a pandas window per bar), by a plain Python loop over numpy arrays, and by that loop
building a pandas window itself.

The rule is the reference's crossing (means of the last 10 and 50 closes, this bar and the
one before) written once, in ``STRATEGY``: the uploaded source ``stratorch run`` gets, whose
``rule`` the loops here call too. ``np.mean`` sums pairwise, not left to right, so its trades
may differ from ``sma_cross``'s by a crossing or two: this section measures cost, not trades.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.reference import FAST, SL_PCT, SLOW, TP_PCT, Series

STRATEGY = f'''
import numpy as np
from shared.strategy import BaseStrategy


def rule(close):
    """BUY on the {FAST}/{SLOW} mean crossing above, SELL on the crossing below."""
    if len(close) < {SLOW + 1}:
        return None
    fast, fast_before = close[-{FAST}:].mean(), close[-{FAST + 1}:-1].mean()
    slow, slow_before = close[1:].mean(), close[:-1].mean()
    if fast > slow and fast_before <= slow_before:
        c = float(close[-1])
        return {{"signal": "BUY", "tp_price": c * {1 + TP_PCT!r}, "sl_price": c * {1 - SL_PCT!r}}}
    if fast < slow and fast_before >= slow_before:
        return {{"signal": "SELL"}}
    return None


class PerBarCross(BaseStrategy):
    def get_required_lookback(self):
        return {SLOW + 1}

    def decide(self, df, interval, **kw):
        return rule(df["close"].to_numpy())
'''

SPEC: dict[str, Any] = {"source": STRATEGY, "class": "PerBarCross"}


def _rule() -> Callable[[np.ndarray], dict[str, Any] | None]:
    namespace: dict[str, Any] = {}
    exec(compile(STRATEGY, "<per-bar strategy>", "exec"), namespace)
    rule: Callable[[np.ndarray], dict[str, Any] | None] = namespace["rule"]
    return rule


def numpy_loop(s: Series) -> float:
    """µs per bar: ``rule`` over a numpy slice per bar."""
    rule, close, n = _rule(), s.close, SLOW + 1
    started = time.perf_counter()
    for t in range(n, len(close) + 1):
        rule(close[t - n : t])
    return (time.perf_counter() - started) / (len(close) - n + 1) * 1e6


def pandas_loop(s: Series) -> float:
    """µs per bar: ``rule`` over a pandas window (``iloc``) per bar, as ``decide`` gets it."""
    rule, n = _rule(), SLOW + 1
    frame = pd.DataFrame(
        {"open": s.open, "high": s.high, "low": s.low, "close": s.close},
        index=pd.to_datetime(s.time, unit="ms", utc=True),
    )
    started = time.perf_counter()
    for t in range(n, len(frame) + 1):
        rule(frame.iloc[t - n : t]["close"].to_numpy())
    return (time.perf_counter() - started) / (len(frame) - n + 1) * 1e6
