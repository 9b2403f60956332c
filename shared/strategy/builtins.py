"""The builtin strategies, by the name a request uses: :data:`BUILTIN_STRATEGIES`.

Each one has both forms, per-bar `decide` and vectorized `signals`, and both run the same
function over an array of closes — the last `get_required_lookback()` bars in `decide`, the
whole history in `signals` — built from :mod:`shared.strategy.indicators`, whose values do not
depend on how much history precedes the window. So the two forms give the same signals and the
same prices, bit for bit, and either can serve as the other's test oracle.

All three attach the same exits to a signal at bar `t`: `tp_price = close[t] * (1 + tp_pct)`
and `sl_price = close[t] * (1 - sl_pct)`; set `tp_pct` or `sl_pct` to `None` to leave that
level out. Neither form emits a signal before `get_required_lookback()` bars of history exist.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from .base import BaseStrategy
from .indicators import (
    BoolArray,
    FloatArray,
    cross_above,
    cross_below,
    ema,
    pct_change,
    rolling_max,
    sma,
)

__all__ = ["BUILTIN_STRATEGIES", "Momentum", "PeakEmaReversal", "SmaCross"]

#: Default take-profit / stop-loss distances, as fractions of the signal bar's close.
DEFAULT_TP_PCT = 0.02
DEFAULT_SL_PCT = 0.01


class _IndicatorStrategy(BaseStrategy):
    """Both forms from one `_masks(close, high)` that returns the BUY and SELL masks.

    `_masks` must give bar `t` a value that depends only on the bars its indicators' windows
    cover, all of them within the last `get_required_lookback()` bars.
    """

    params: ClassVar[dict[str, Any]] = {"tp_pct": DEFAULT_TP_PCT, "sl_pct": DEFAULT_SL_PCT}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._optional_fraction("tp_pct", low=0.0, high=math.inf)
        self._optional_fraction("sl_pct", low=0.0, high=1.0)
        self._validate()

    def _validate(self) -> None:
        """Check this strategy's own params; raise `ValueError` naming strategy and param."""

    def _masks(self, close: FloatArray, high: FloatArray) -> tuple[BoolArray, BoolArray]:
        raise NotImplementedError

    # --- the two forms ------------------------------------------------------------------

    def decide(self, df: pd.DataFrame, interval: str, **kw: Any) -> dict[str, Any] | None:
        lookback = self.get_required_lookback()
        if len(df) < lookback:
            return None
        close, high = _prices(df.iloc[-lookback:] if len(df) > lookback else df)
        buy, sell = self._masks(close, high)
        if not (buy[-1] or sell[-1]):
            return None
        tp, sl = self._levels(close[-1:])
        return {
            "signal": "BUY" if buy[-1] else "SELL",
            "entry_price": None,
            "tp_price": None if math.isnan(tp[0]) else float(tp[0]),
            "sl_price": None if math.isnan(sl[0]) else float(sl[0]),
            "confidence": 1.0,
            "meta": {},
        }

    def signals(self, df: pd.DataFrame) -> pd.DataFrame:
        close, high = _prices(df)
        buy, sell = self._masks(close, high)
        # Same rule as decide(): no signal while fewer than `lookback` bars exist.
        warmup = min(self.get_required_lookback() - 1, len(close))
        buy[:warmup] = False
        sell[:warmup] = False
        signal = np.full(len(close), None, dtype=object)
        signal[buy] = "BUY"
        signal[sell] = "SELL"
        tp, sl = self._levels(close)
        active = buy | sell
        return pd.DataFrame(
            {
                # As object: pandas would otherwise store the strings as Arrow strings (0.1 s
                # at 1M bars), to be turned back into objects when the signals are read.
                "signal": pd.Series(signal, index=df.index, dtype=object, copy=False),
                "entry_price": np.full(len(close), np.nan),
                "tp_price": np.where(active, tp, np.nan),
                "sl_price": np.where(active, sl, np.nan),
            },
            index=df.index,
        )

    def _levels(self, close: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Take-profit and stop-loss levels for signals at `close` (NaN where disabled)."""
        tp_pct, sl_pct = self.params["tp_pct"], self.params["sl_pct"]
        tp = close * (1.0 + tp_pct) if tp_pct is not None else np.full(close.shape, np.nan)
        sl = close * (1.0 - sl_pct) if sl_pct is not None else np.full(close.shape, np.nan)
        return tp, sl

    # --- param checks -------------------------------------------------------------------

    def _fail(self, name: str, expected: str) -> ValueError:
        value = self.params[name]
        return ValueError(
            f"{type(self).__name__}: parameter {name!r} must be {expected}, "
            f"got {value!r} ({type(value).__name__})"
        )

    def _positive_int(self, name: str) -> int:
        value = self.params[name]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise self._fail(name, "a positive int")
        return int(value)

    def _real(self, name: str, *, low: float, high: float, expected: str) -> float:
        value = self.params[name]
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise self._fail(name, expected)
        if not low <= float(value) < high:
            raise self._fail(name, expected)
        return float(value)

    def _optional_fraction(self, name: str, *, low: float, high: float) -> None:
        if self.params[name] is None:
            return
        bound = "" if math.isinf(high) else f" and below {high:g}"
        expected = f"None (no level) or a number above {low:g}{bound}, e.g. 0.02 for 2%"
        value = self._real(name, low=low, high=high, expected=expected)
        if value <= low:
            raise self._fail(name, expected)


def _prices(df: pd.DataFrame) -> tuple[FloatArray, FloatArray]:
    return (
        df["close"].to_numpy(dtype=np.float64),
        df["high"].to_numpy(dtype=np.float64),
    )


class SmaCross(_IndicatorStrategy):
    """Trade the crossings of a fast and a slow simple moving average of the close.

    BUY at bar `t` when the fast SMA crosses above the slow one
    (`fast[t] > slow[t]` and `fast[t-1] <= slow[t-1]`); SELL when it crosses below
    (`fast[t] < slow[t]` and `fast[t-1] >= slow[t-1]`).

    Params: `fast` (10) and `slow` (50), SMA lengths in bars with `fast < slow`; `tp_pct`
    (0.02) and `sl_pct` (0.01). Lookback: `slow + 1` bars (this bar's and the previous
    bar's slow SMA).
    """

    params: ClassVar[dict[str, Any]] = {
        "fast": 10,
        "slow": 50,
        "tp_pct": DEFAULT_TP_PCT,
        "sl_pct": DEFAULT_SL_PCT,
    }

    def _validate(self) -> None:
        fast, slow = self._positive_int("fast"), self._positive_int("slow")
        if fast >= slow:
            raise ValueError(
                f"SmaCross: parameter 'fast' ({fast}) must be smaller than 'slow' ({slow}); "
                f"swap them or pick a shorter fast SMA"
            )

    def get_required_lookback(self) -> int:
        return int(self.params["slow"]) + 1

    def _masks(self, close: FloatArray, high: FloatArray) -> tuple[BoolArray, BoolArray]:
        fast = sma(close, self.params["fast"])
        slow = sma(close, self.params["slow"])
        return cross_above(fast, slow), cross_below(fast, slow)


class Momentum(_IndicatorStrategy):
    """Trade the momentum `m[t] = close[t] / close[t - lookback] - 1`.

    BUY at bar `t` when `m` crosses above `threshold` (`m[t] > threshold` and
    `m[t-1] <= threshold`); SELL when it crosses below zero (`m[t] < 0` and `m[t-1] >= 0`).

    Params: `lookback` (20) bars; `threshold` (0.02, i.e. +2%, at least 0); `tp_pct` (0.02)
    and `sl_pct` (0.01). Lookback: `lookback + 2` bars (`m[t-1]` needs `close[t-1-lookback]`).
    """

    params: ClassVar[dict[str, Any]] = {
        "lookback": 20,
        "threshold": 0.02,
        "tp_pct": DEFAULT_TP_PCT,
        "sl_pct": DEFAULT_SL_PCT,
    }

    def _validate(self) -> None:
        self._positive_int("lookback")
        self._real("threshold", low=0.0, high=math.inf, expected="a number >= 0, e.g. 0.02 for +2%")

    def get_required_lookback(self) -> int:
        return int(self.params["lookback"]) + 2

    def _masks(self, close: FloatArray, high: FloatArray) -> tuple[BoolArray, BoolArray]:
        m = pct_change(close, self.params["lookback"])
        return cross_above(m, float(self.params["threshold"])), cross_below(m, 0.0)


class PeakEmaReversal(_IndicatorStrategy):
    """Buy a pull-back from a recent peak while the close stays above its EMA.

    `ema[t]` is the EMA of the close with `alpha = 2 / (ema + 1)`, *windowed*: it runs over
    the `W = 4 * ema` bars ending at `t`, seeded with the first close of that window (see
    :func:`shared.strategy.indicators.ema`). The seed's weight is `(1 - alpha) ** (W - 1)`,
    about 3.5e-4 for `ema = 50`, so this is the usual EMA to within a rounding of the price —
    and, unlike the usual EMA, its value depends only on those `W` bars, which is what lets
    `decide`, which sees only its window, agree bit for bit with `signals`.

    `cond[t]` holds when `close[t] > ema[t]` and `close[t] <= (1 - drop_pct) * peak[t]`, where
    `peak[t]` is the highest high of the last `peak_window` bars including `t`. BUY at the
    first bar of a run of `cond` (`cond[t]` and not `cond[t-1]`); SELL when the close crosses
    below the EMA (`close[t] < ema[t]` and `close[t-1] >= ema[t-1]`).

    Params: `ema` (50) bars; `peak_window` (20) bars; `drop_pct` (0.03, in `[0, 1)`);
    `tp_pct` (0.02) and `sl_pct` (0.01). Lookback: `max(4 * ema, peak_window) + 1` bars.
    """

    params: ClassVar[dict[str, Any]] = {
        "ema": 50,
        "peak_window": 20,
        "drop_pct": 0.03,
        "tp_pct": DEFAULT_TP_PCT,
        "sl_pct": DEFAULT_SL_PCT,
    }

    #: The EMA window, in multiples of its length: `(1 - alpha) ** (4n - 1) ≈ e**-8`.
    EMA_WINDOW_FACTOR: ClassVar[int] = 4

    def _validate(self) -> None:
        self._positive_int("ema")
        self._positive_int("peak_window")
        self._real("drop_pct", low=0.0, high=1.0, expected="a number in [0, 1), e.g. 0.03")

    def _ema_window(self) -> int:
        return self.EMA_WINDOW_FACTOR * int(self.params["ema"])

    def get_required_lookback(self) -> int:
        return max(self._ema_window(), int(self.params["peak_window"])) + 1

    def _masks(self, close: FloatArray, high: FloatArray) -> tuple[BoolArray, BoolArray]:
        e = ema(close, self.params["ema"], self._ema_window())
        peak = rolling_max(high, self.params["peak_window"])
        cond = (close > e) & (close <= (1.0 - float(self.params["drop_pct"])) * peak)
        buy = np.zeros(close.shape, dtype=np.bool_)
        buy[1:] = cond[1:] & ~cond[:-1]
        return buy, cross_below(close, e)


#: Builtin strategies by the name a request uses (`{"builtin": "sma_cross"}`).
BUILTIN_STRATEGIES: dict[str, type[BaseStrategy]] = {
    "momentum": Momentum,
    "peak_ema_reversal": PeakEmaReversal,
    "sma_cross": SmaCross,
}
