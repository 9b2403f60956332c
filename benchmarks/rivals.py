"""vectorbt and backtesting.py (the ``bench`` extra) driven with the reference's rules.

Both are given the reference's SMAs (the same bits), so a difference in trades is one of
semantics, not of indicators. Where their semantics cannot be made the README's, the
comparison says so rather than pretend (see ``DIFFERENCES``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import pandas as pd

from benchmarks.reference import (
    CASH,
    FAST,
    FEE,
    SL_PCT,
    SLOW,
    TP_PCT,
    Outcome,
    Series,
    Trade,
    crossings,
    sma,
)

#: Why an engine's trades may not equal stratorch's, printed under the table.
DIFFERENCES = {
    "vectorbt": (
        "vectorbt lets a stop touched in a bar win over a SELL's exit at that bar's open "
        "(stratorch exits at the open first) and, with cash shared across columns, may open "
        "a position with the dust an all-in entry leaves"
    ),
    "backtesting.py": (
        "backtesting.py sizes in whole units (here 2^-20 of a coin, FractionalBacktest) of "
        "99.99 % of equity, and holds one portfolio per symbol (no shared cash)"
    ),
}


def _frame(series: list[Series], column: str) -> pd.DataFrame:
    index = pd.to_datetime(series[0].time, unit="ms")
    return pd.DataFrame({s.symbol: getattr(s, column) for s in series}, index=index)


def vectorbt(series: list[Series], *, engine: str) -> Outcome:
    """One call over every symbol, cash shared: an order at bar t+1's open for a signal at t."""
    import vectorbt as vbt

    close = _frame(series, "close")
    masks = [crossings(s.close) for s in series]
    shifted = {
        side: pd.DataFrame(
            {
                s.symbol: np.concatenate([[False], m[side][:-1]])
                for s, m in zip(series, masks, strict=True)
            },
            index=close.index,
        )
        for side in (0, 1)
    }
    portfolio = vbt.Portfolio.from_signals(
        close,
        entries=shifted[0],
        exits=shifted[1],
        open=_frame(series, "open"),
        high=_frame(series, "high"),
        low=_frame(series, "low"),
        price=_frame(series, "open"),
        size=np.inf,
        fees=FEE,
        sl_stop=SL_PCT,
        tp_stop=TP_PCT,
        stop_entry_price="fillprice",
        init_cash=CASH,
        cash_sharing=True,
        group_by=True,
        freq="1min",
        engine=engine,
    )
    records = portfolio.trades.records_arr
    times = series[0].time
    trades = [
        Trade(
            series[int(r["col"])].symbol, int(times[r["entry_idx"]]), int(times[r["exit_idx"]]), ""
        )
        for r in records
    ]
    trades.sort(key=lambda t: (t.entry_time, t.symbol))
    return Outcome(trades, float(portfolio.final_value()))


def backtesting_py(series: list[Series]) -> Outcome:
    """A ``Backtest`` per symbol (it holds one instrument), its ``next()`` deciding per bar."""
    from backtesting import Strategy
    from backtesting.lib import FractionalBacktest

    class SmaCross(Strategy):  # type: ignore[misc]
        def init(self) -> None:
            close = np.asarray(self.data.Close, dtype=np.float64)
            self.fast = self.I(sma, close, FAST)
            self.slow = self.I(sma, close, SLOW)

        def next(self) -> None:
            fast, slow = self.fast, self.slow
            if fast[-1] > slow[-1] and fast[-2] <= slow[-2]:
                if not self.position:
                    c = self.data.Close[-1]
                    self.buy(tp=c * (1.0 + TP_PCT), sl=c * (1.0 - SL_PCT))
            elif fast[-1] < slow[-1] and fast[-2] >= slow[-2] and self.position:
                self.position.close()

    trades: list[Trade] = []
    equity = 0.0
    for s in series:
        data = pd.DataFrame(
            {"Open": s.open, "High": s.high, "Low": s.low, "Close": s.close, "Volume": 1.0},
            index=pd.to_datetime(s.time, unit="ms"),
        )
        # A power of two as the unit scales prices exactly: the SMAs keep their bits.
        test = FractionalBacktest(
            data,
            SmaCross,
            cash=CASH,
            commission=FEE,
            finalize_trades=True,
            fractional_unit=2.0**-20,
        )
        stats = test.run()
        equity += float(stats["Equity Final [$]"])
        ms = s.time
        for entry, exit_ in zip(
            stats["_trades"]["EntryBar"], stats["_trades"]["ExitBar"], strict=True
        ):
            trades.append(Trade(s.symbol, int(ms[entry]), int(ms[exit_]), ""))
    trades.sort(key=lambda t: (t.entry_time, t.symbol))
    # Several symbols are several portfolios here: their equities do not add up to one.
    return Outcome(trades, equity if len(series) == 1 else math.nan)


ENGINES: dict[str, Callable[[list[Series]], Outcome]] = {
    "vectorbt-rust": partial(vectorbt, engine="rust"),
    "vectorbt-numba": partial(vectorbt, engine="numba"),
    "backtesting": backtesting_py,
}
