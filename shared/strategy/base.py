"""The class every strategy derives from.

This module runs inside the sandbox: it may import only the standard library, numpy and pandas.
"""

from __future__ import annotations

import difflib
from numbers import Integral, Real
from typing import Any, ClassVar, Literal

import pandas as pd

__all__ = ["BaseStrategy"]


class BaseStrategy:
    """A trading strategy: a short class with default `params` and one of two methods.

    Subclass it, set the class attribute `params` to the defaults of your parameters, and
    implement either

    * `decide(df, interval, **kw)` — called once per bar with the last
      `get_required_lookback()` *closed* bars; it returns the signal for the current (last)
      bar. Simple, and look-ahead-safe by construction: it never sees a later bar. Or
    * `signals(df)` — called once with the whole history; it returns a frame with one row per
      bar, the signal for each. One call instead of one per bar, so much faster, but it is
      *your* job not to look ahead: the row for bar `t` may use only rows `<= t` (use
      `shift(1)` for "previous bar", never `shift(-1)`, never a centered window, never a
      statistic of the whole column).

    A strategy that overrides `signals` is run vectorized; otherwise `decide` runs per bar.

    `decide` gets a pandas DataFrame, or, when the class sets `window = "numpy"`, a
    :class:`~shared.strategy.Window`: the same bars as numpy arrays (`window.close`,
    `window["close"]`, `window.time`, `len(window)`, `window.df` for the DataFrame), like
    backtesting.py's `self.data`. It costs well under a microsecond per bar, where the
    DataFrame costs ~7 µs and each `df["close"]` ~6 µs more; `signals` always gets the frame.

    `df` is a `pandas.DataFrame` indexed by a UTC `DatetimeIndex` named `time` (the bars'
    open times) with columns `open_time` (int64 ms), `open`, `high`, `low`, `close`,
    `volume`, `close_time`, `quote_volume`, `trades`, `taker_buy_base`, `taker_buy_quote`.
    Bar `t`'s row is final: it is a closed bar.

    A signal at bar `t` is a dict (or a row of the `signals` frame) with

    * `signal`: `"BUY"`, `"SELL"` or `"HOLD"` (`None`, NaN and `""` also mean hold);
    * `entry_price`: `None` to enter at bar `t+1`'s open (the default), or a limit price
      that is valid for bar `t+1` only;
    * `tp_price` / `sl_price`: take-profit / stop-loss levels, or `None` for none;
    * `confidence`: a float, default `1.0`;
    * `meta`: a JSON-able dict carried along with the signal, default `{}`.

    Entries never fill on bar `t`'s own prices: the earliest fill is bar `t+1`'s open.

    `params` holds the defaults; `Strategy(fast=5)` overrides one. Subclasses inherit their
    parent's params and may override some of them. An unknown parameter is an error naming
    the strategy and the known parameters. A value must have its default's type (an integer
    where the default is an integer, any number where it is a float, a string, a bool, a
    list, a dict); `None` is allowed for every parameter, and a `None` default takes anything.

    Example — buy when the close crosses above its 20-bar mean, with a 2% target and 1% stop:

        from shared.strategy import BaseStrategy

        class MeanCross(BaseStrategy):
            params = {"n": 20}

            def get_required_lookback(self) -> int:
                return self.params["n"] + 1  # this bar's mean and the previous bar's

            def decide(self, df, interval, **kw):
                close = df["close"].to_numpy()
                if len(close) < self.get_required_lookback():
                    return None  # not enough history yet (start of the data)
                n = self.params["n"]
                now, before = close[-n:].mean(), close[-n - 1 : -1].mean()
                if close[-1] > now and close[-2] <= before:
                    c = float(close[-1])
                    return {"signal": "BUY", "tp_price": c * 1.02, "sl_price": c * 0.99}
                return None
    """

    #: Default parameters; `__init__` merges the caller's over these into `self.params`.
    params: ClassVar[dict[str, Any]] = {}

    #: What `decide` gets: `"pandas"`, a DataFrame per bar, or `"numpy"`, a
    #: :class:`~shared.strategy.Window` of numpy arrays (much cheaper per bar).
    window: ClassVar[Literal["pandas", "numpy"]] = "pandas"

    def __init__(self, **params: Any) -> None:
        defaults = self.default_params()
        unknown = [name for name in params if name not in defaults]
        if unknown:
            raise ValueError(self._unknown_param_message(unknown[0], defaults))
        for name, value in params.items():
            wanted = _wanted_type(defaults[name], value)
            if wanted:
                raise ValueError(
                    f"{type(self).__name__} parameter {name!r} must be {wanted}, like its "
                    f"default {defaults[name]!r}; got {type(value).__name__} {value!r:.60}"
                )
        #: This instance's parameters: the class defaults with the caller's values on top.
        #: It shadows the class attribute on purpose (the class keeps the defaults), which
        #: mypy reads as assigning to a ClassVar.
        self.params: dict[str, Any] = {**defaults, **params}  # type: ignore[misc]

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        """The defaults of every parameter, parents' first, each class overriding its parents'."""
        merged: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            own = klass.__dict__.get("params")
            if isinstance(own, dict):
                merged.update(own)
        return merged

    def _unknown_param_message(self, name: str, defaults: dict[str, Any]) -> str:
        strategy = type(self).__name__
        if not defaults:
            return (
                f"{strategy} got unknown parameter {name!r}: it takes no parameters; "
                f"declare them as a class attribute, e.g. params = {{{name!r}: ...}}"
            )
        known = ", ".join(sorted(defaults))
        close = difflib.get_close_matches(name, list(defaults), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (
            f"{strategy} got unknown parameter {name!r}{hint}; its parameters are: {known}. "
            f"To add one, put it in {strategy}.params with its default."
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def get_required_lookback(self) -> int:
        """How many bars, including the current one, `decide` needs to see (default 1).

        Before that many bars exist (at the very start of the data), `decide` gets fewer;
        the engine also uses this number to load warm-up bars before the simulated range.
        """
        return 1

    def work_units(self, symbols: list[str]) -> list[list[str]]:
        """Group `symbols` into units that run together (default: one unit per symbol).

        Override it when a unit must see several symbols, e.g. a pair trade.
        """
        return [[symbol] for symbol in symbols]

    def decide(self, df: Any, interval: str, **kw: Any) -> dict[str, Any] | None:
        """The signal for the last bar of `df` (the current bar `t`), or `None` to hold.

        `df` holds the last `get_required_lookback()` closed bars ending with bar `t` — fewer
        only at the very start of the data: a `pandas.DataFrame`, or a
        :class:`~shared.strategy.Window` when the class sets `window = "numpy"` (so `df` is
        typed `Any` here: annotate yours with the one you get). `interval` is the bar
        length (`"1h"`, ...); `kw` carries `symbol=`. Return `None`, `{"signal": "HOLD"}`, or
        `{"signal": "BUY" | "SELL", "entry_price": None, "tp_price": ..., "sl_price": ...,
        "confidence": 1.0, "meta": {}}` (all keys but `signal` optional).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement decide(self, df, interval, **kw) "
            f"(called per bar) or signals(self, df) (called once over the whole history)"
        )

    def signals(self, df: pd.DataFrame) -> pd.DataFrame:
        """Signals for every bar of `df` at once; override it to run vectorized.

        Return a frame with `df`'s index and a `signal` column (`"BUY"`, `"SELL"`, or a hold:
        `"HOLD"`, `""`, `None` or NaN), optionally `entry_price`, `tp_price`, `sl_price` (NaN
        for none), `confidence` and `meta` (dicts); other columns are ignored. Row `t` must use
        only rows `<= t` of `df`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement signals(self, df); "
            f"it runs per bar through decide() instead"
        )


def _wanted_type(default: object, value: object) -> str:
    """What ``value`` should be to match ``default``'s type, or ``""`` when it does."""
    if value is None or default is None:
        return ""
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "true or false"
    number = isinstance(value, Real) and not isinstance(value, bool)  # numpy's too
    if isinstance(default, int):
        return "" if number and isinstance(value, Integral) else "an integer"
    if isinstance(default, float):
        return "" if number else "a number"
    for kind, name in ((str, "a string"), (list | tuple, "a list"), (dict, "a mapping")):
        if isinstance(default, kind):
            return "" if isinstance(value, kind) else name
    return ""
