"""The rules every engine of the comparison follows, and a pure-numpy reference of them.

The rules: ``sma_cross`` 10/50 on the close (BUY when the fast SMA crosses above the slow one,
SELL when it crosses below), take-profit 2 % and stop-loss 1 % from the signal bar's close,
fee 0.1 % per side, all in (``fixed_fraction`` 1.0, one position at a time across all
symbols), ``min_notional`` 0, no slippage, ``stop_loss_first``: the README's "Simulation
semantics" for that request. The initial cash is 1e20: on a random walk every round trip loses
its fees, so 13,000 trades shrink equity ~10¹² times, and from 10,000 the other engines would
stop trading once an order fell below their smallest size. The reference is written from the
README, not from stratorch's code, so it is a check as well as a yardstick: it must give the
very same trades and the same final equity, bit for bit.

Indicators add each window's values left to right, as the README's builtins do (a crossing
flips on one ulp, so the order of float operations is part of the rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FAST, SLOW = 10, 50
TP_PCT, SL_PCT = 0.02, 0.01
FEE = 0.001
CASH = 1e20

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Series:
    """One symbol's bars as numpy columns."""

    symbol: str
    time: npt.NDArray[np.int64]
    open: Floats
    high: Floats
    low: Floats
    close: Floats


@dataclass(frozen=True)
class Trade:
    symbol: str
    entry_time: int
    exit_time: int
    exit_reason: str


@dataclass(frozen=True)
class Outcome:
    """What the engines are compared on."""

    trades: list[Trade]
    final_equity: float

    def to_json(self) -> dict[str, Any]:
        return {
            "trades": [[t.symbol, t.entry_time, t.exit_time, t.exit_reason] for t in self.trades],
            "final_equity": self.final_equity,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Outcome:
        return cls([Trade(*t) for t in doc["trades"]], float(doc["final_equity"]))


def request(symbols: list[str], *, strategy: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``stratorch run`` request for these rules over all of ``symbols``' 1m bars."""
    return {
        "strategy": strategy
        or {
            "builtin": "sma_cross",
            "params": {"fast": FAST, "slow": SLOW, "tp_pct": TP_PCT, "sl_pct": SL_PCT},
        },
        "symbols": symbols,
        "interval": "1m",
        "start": "2021-01-01",
        "end": "2040-01-01",
        "initial_cash": CASH,
        "fee_rate": FEE,
        "slippage_bps": 0,
        "min_notional": 0,
        "portfolio": {"builtin": "fixed_fraction", "params": {"fraction": 1.0, "max_positions": 1}},
    }


def sma(x: Floats, n: int) -> Floats:
    """Mean of the ``n`` bars ending at each bar, summed left to right; NaN before that."""
    out = np.full(x.shape, np.nan)
    m = x.size - n + 1
    if m > 0:
        total = x[:m].copy()
        for k in range(1, n):
            total = total + x[k : k + m]
        out[n - 1 :] = total / n
    return out


def crossings(close: Floats) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """BUY and SELL masks: the fast SMA crossing above / below the slow one, from bar ``SLOW``
    on (the strategy's lookback is ``SLOW + 1`` bars)."""
    fast, slow = sma(close, FAST), sma(close, SLOW)
    buy = np.zeros(close.shape, dtype=bool)
    sell = np.zeros(close.shape, dtype=bool)
    buy[1:] = (fast[1:] > slow[1:]) & (fast[:-1] <= slow[:-1])
    sell[1:] = (fast[1:] < slow[1:]) & (fast[:-1] >= slow[:-1])
    buy[:SLOW] = sell[:SLOW] = False
    return buy, sell


def _first_touch(s: Series, lo: int, hi: int, tp: float, sl: float) -> int | None:
    """First bar in ``[lo, hi]`` whose range reaches ``sl`` or ``tp``, scanning in growing
    chunks (most trades end within a few hundred bars)."""
    size = 64
    while lo <= hi:
        end = min(hi + 1, lo + size)
        touched = (s.low[lo:end] <= sl) | (s.high[lo:end] >= tp)
        if touched.any():
            return lo + int(np.argmax(touched))
        lo, size = end, size * 4
    return None


def _exit(
    s: Series, e: int, tp: float, sl: float, sells: npt.NDArray[np.intp]
) -> tuple[int, int, float, str]:
    """(bar, phase, price, reason) of the long entered at bar ``e``'s open."""
    last = len(s.time) - 1
    k = int(np.searchsorted(sells, e))
    signal_bar = int(sells[k]) + 1 if k < len(sells) and sells[k] < last else None
    j = _first_touch(s, e, last if signal_bar is None else signal_bar - 1, tp, sl)
    if j is not None:
        at_open = float(s.open[j])  # the entry bar's fill is its open too
        phase = 2 if j == e else 0
        if at_open <= sl:
            return j, phase, at_open, "stop_loss"
        if at_open >= tp:
            return j, phase, at_open, "take_profit"
        if s.low[j] <= sl:
            return j, 2, sl, "stop_loss"
        return j, 2, tp, "take_profit"
    if signal_bar is not None:
        return signal_bar, 0, float(s.open[signal_bar]), "signal"
    return last, 3, float(s.close[last]), "end_of_data"


def simulate(series: list[Series]) -> Outcome:
    """Every symbol's BUYs with their exits, replayed in bar order with one all-in position."""
    events: list[
        tuple[int, int, str, int, int, float]
    ] = []  # time, phase, symbol, signal, kind, price
    exits: dict[tuple[str, int], tuple[int, int, float, str]] = {}
    for s in series:
        buy, sell = crossings(s.close)
        sells = np.flatnonzero(sell)
        for t in np.flatnonzero(buy[:-1]):
            t = int(t)
            close = float(s.close[t])
            j, phase, price, reason = _exit(
                s, t + 1, close * (1.0 + TP_PCT), close * (1.0 - SL_PCT), sells
            )
            signal = int(s.time[t])
            events.append((int(s.time[t + 1]), 1, s.symbol, signal, 0, float(s.open[t + 1])))
            events.append((int(s.time[j]), phase, s.symbol, signal, 1, price))
            exits[(s.symbol, signal)] = (int(s.time[j]), phase, price, reason)
    events.sort(key=lambda ev: ev[:4])
    cash, held, quantity = CASH, None, 0.0
    entered: dict[tuple[str, int], int] = {}
    trades: list[Trade] = []
    for time, _, symbol, signal, kind, price in events:
        key = (symbol, signal)
        if kind == 0:
            if held is None:  # all in: fraction 1.0 of the cash, fee included
                quantity = cash / (price * (1 + FEE))
                cash, held = cash - cash, key
                entered[key] = time
        elif held == key:
            proceeds = quantity * price
            cash += proceeds - FEE * proceeds
            held = None
            trades.append(Trade(symbol, entered[key], time, exits[key][3]))
    return Outcome(trades, cash)
