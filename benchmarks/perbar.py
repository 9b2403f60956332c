"""What a per-bar strategy pays per bar: the same ``decide`` rule run by ``stratorch run`` on
the pandas window and on the numpy window, by stratorch's per-bar loop in this process
(``compute_signals``), by backtesting.py's ``next()``, by a plain Python loop over numpy
arrays, and by that loop building a pandas window itself.

The rule is the reference's crossing (means of the last 10 and 50 closes, this bar and the
one before) written once, in ``STRATEGY``: the uploaded source ``stratorch run`` gets, whose
``rule`` the loops here call too. ``np.mean`` sums pairwise, not left to right, so its trades
may differ from ``sma_cross``'s by a crossing or two: this section measures cost, not trades.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.reference import CASH, FAST, FEE, SL_PCT, SLOW, TP_PCT, Series

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


class NumpyWindowCross(PerBarCross):
    window = "numpy"

    def decide(self, window, interval, **kw):
        return rule(window.close)


class NumpyWindowIdle(PerBarCross):
    """The numpy window's own cost: a decide that reads the current close and holds."""

    window = "numpy"

    def decide(self, window, interval, **kw):
        window.close[-1]
        return None
'''

SPEC: dict[str, Any] = {"source": STRATEGY, "class": "PerBarCross"}
SPEC_NUMPY: dict[str, Any] = {"source": STRATEGY, "class": "NumpyWindowCross"}


def _namespace() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(STRATEGY, "<per-bar strategy>", "exec"), namespace)
    return namespace


def _rule() -> Callable[[np.ndarray], dict[str, Any] | None]:
    rule: Callable[[np.ndarray], dict[str, Any] | None] = _namespace()["rule"]
    return rule


def numpy_loop(s: Series) -> float:
    """µs per bar: ``rule`` over a numpy slice per bar."""
    rule, close, n = _rule(), s.close, SLOW + 1
    started = time.perf_counter()
    for t in range(n, len(close) + 1):
        rule(close[t - n : t])
    return (time.perf_counter() - started) / (len(close) - n + 1) * 1e6


def pandas_loop(s: Series) -> float:
    """µs per bar: ``rule`` over a pandas window built with ``iloc`` per bar, as ``decide``
    got it before :func:`shared.strategy.window.frame_window` (on a 4-column frame)."""
    rule, n = _rule(), SLOW + 1
    frame = pd.DataFrame(
        {"open": s.open, "high": s.high, "low": s.low, "close": s.close},
        index=pd.to_datetime(s.time, unit="ms", utc=True),
    )
    started = time.perf_counter()
    for t in range(n, len(frame) + 1):
        rule(frame.iloc[t - n : t]["close"].to_numpy())
    return (time.perf_counter() - started) / (len(frame) - n + 1) * 1e6


def runner_loop(candles: pd.DataFrame, strategy: str) -> float:
    """µs per bar: ``compute_signals`` (the sandbox's per-bar loop) running ``strategy``, a
    class of ``STRATEGY``, over ``candles``, in this process."""
    from shared.strategy import compute_signals

    instance = _namespace()[strategy]()
    started = time.perf_counter()
    compute_signals(instance, candles, first_sim=0, interval="1m", symbol="BENCH")
    return (time.perf_counter() - started) / len(candles) * 1e6


def backtesting_loop(s: Series) -> float:
    """µs per bar: backtesting.py running ``rule`` in ``next()`` on ``self.data.Close`` (its
    whole ``run()``, orders included, over the bars), as its user would write it."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bar
    from backtesting import Strategy
    from backtesting.lib import FractionalBacktest

    rule, n = _rule(), SLOW + 1

    class Cross(Strategy):  # type: ignore[misc]
        def init(self) -> None:
            pass

        def next(self) -> None:
            out = rule(self.data.Close[-n:])
            if out is None:
                return
            if out["signal"] == "BUY" and not self.position:
                self.buy(tp=out["tp_price"], sl=out["sl_price"])
            elif out["signal"] == "SELL" and self.position:
                self.position.close()

    data = pd.DataFrame(
        {"Open": s.open, "High": s.high, "Low": s.low, "Close": s.close, "Volume": 1.0},
        index=pd.to_datetime(s.time, unit="ms"),
    )
    test = FractionalBacktest(
        data, Cross, cash=CASH, commission=FEE, finalize_trades=True, fractional_unit=2.0**-20
    )
    started = time.perf_counter()
    test.run()
    return (time.perf_counter() - started) / len(s.close) * 1e6


#: Bars per round of :func:`in_process`: short rounds, many of them, so that each loop has
#: rounds the other jobs on a shared machine left alone (the cost per bar does not depend on
#: how many bars there are).
ROUND_BARS = 20_000


def in_process(store: Path, s: Series, rounds: int, *, rivals: bool) -> dict[str, float]:
    """µs per bar of every loop timed in this process, by name: the loops in turn over the
    first :data:`ROUND_BARS` bars, ``rounds`` times, each loop's fastest round (so the ratios
    compare loops timed side by side, each as undisturbed as it got)."""
    candles = pd.read_parquet(store / "1m" / f"{s.symbol}.parquet").iloc[:ROUND_BARS]
    s = Series(s.symbol, *(a[:ROUND_BARS] for a in (s.time, s.open, s.high, s.low, s.close)))
    loops: dict[str, Callable[[], float]] = {
        "numpy loop": partial(numpy_loop, s),
        "pandas loop": partial(pandas_loop, s),
        "pandas window": partial(runner_loop, candles, "PerBarCross"),
        "numpy window": partial(runner_loop, candles, "NumpyWindowCross"),
        "numpy window idle": partial(runner_loop, candles, "NumpyWindowIdle"),
    }
    if rivals:
        loops["backtesting.py same rule"] = partial(backtesting_loop, s)
    costs: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            costs[name].append(loop())
    return {name: min(each) for name, each in costs.items()}
