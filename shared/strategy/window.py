"""The bars `decide` sees: a pandas DataFrame (the default) or a :class:`Window` of numpy arrays.

A strategy picks with the class attribute `window = "numpy"` (`"pandas"` is the default). The
pandas window is a new DataFrame per bar, because pandas has no cheaper one: a positional slice
of the whole history's frame (~7 µs), and each `df["close"]` builds a Series (~6 µs more). The
numpy window is what backtesting.py's `self.data` is: each column a view into the whole
history's array, sliced when read, and a DataFrame only when asked for (`window.df`); a bar
costs a small object and a slice per column read, well under a microsecond.

This module runs inside the sandbox: it may import only the standard library, numpy and pandas.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = ["WINDOWS", "Window", "frame_window"]

#: What `decide` gets, by the strategy's `window` class attribute.
WINDOWS: tuple[Literal["pandas", "numpy"], ...] = ("pandas", "numpy")

#: What a pandas or backtesting.py user calls the bars' times (`df.index`, `self.data.index`).
_TIME_NAMES = {name: ["time"] for name in ("index", "date", "datetime", "timestamp")}

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
TimeArray = npt.NDArray[np.datetime64]


def frame_window(frame: pd.DataFrame, start: int, stop: int) -> pd.DataFrame:
    """Rows `start:stop` of `frame`: the pandas window, as cheaply as pandas makes one.

    `_slice` is what `frame.iloc[start:stop]` ends in, without `iloc`'s key checks (~1 µs of
    ~9 per bar); `start` and `stop` are in range, from the runner's own loop.
    """
    window: pd.DataFrame = frame._slice(slice(start, stop))  # type: ignore[operator]
    return window


class Window:
    """The last `get_required_lookback()` closed bars of one symbol, bar `t` last, as numpy
    arrays — what `decide(window, interval, **kw)` gets when its strategy sets
    `window = "numpy"`, like backtesting.py's `self.data`.

    * `window.close`, `window["close"]` — a column, oldest bar first, so `window.close[-1]` is
      the current bar's close and `window.close[-2]` the one before. Every column of the
      pandas window is there: `open_time` (int64 ms), `open`, `high`, `low`, `close`,
      `volume`, `close_time`, `quote_volume`, `trades`, `taker_buy_base`, `taker_buy_quote`.
      They are read-only views, not copies: `window.close.copy()` to change one.
    * `window.time` (or `window["time"]`) — the bars' open times, `datetime64[ns]` in UTC.
    * `len(window)` — how many bars: `get_required_lookback()`, fewer only at the start of the
      data. `window.columns` names the columns; `"volume" in window` tells whether one exists.
    * `window.df` — the same bars as the DataFrame a `window = "pandas"` strategy gets, built
      on first use (it costs what the pandas window costs).

    `Window(df)` wraps a whole frame, e.g. to call `decide` in a test.
    """

    __slots__ = ("_arrays", "_df", "_frame", "_start", "_stop")

    _arrays: dict[str, npt.NDArray[Any]]
    _df: pd.DataFrame | None
    _frame: pd.DataFrame
    _start: int
    _stop: int

    def __init__(self, df: pd.DataFrame) -> None:
        """All of `df`'s bars; `df` is indexed by a UTC `DatetimeIndex`, like `decide`'s."""
        if not isinstance(df.index, pd.DatetimeIndex):
            raise TypeError(
                f"Window(df) needs df indexed by the bars' open times (a DatetimeIndex), "
                f"got a {type(df.index).__name__}"
            )
        arrays: dict[str, npt.NDArray[Any]] = {
            str(name): df[name].to_numpy() for name in df.columns
        }
        index = df.index.tz_convert("UTC") if df.index.tz is not None else df.index
        arrays["time"] = index.to_numpy(dtype="datetime64[ns]")
        for name, values in arrays.items():
            view = values.view()  # the flag is the view's own: pandas' arrays keep theirs
            view.flags.writeable = False
            arrays[name] = view
        self._arrays, self._frame = arrays, df
        self._start, self._stop, self._df = 0, len(df), df

    def _bars(self, start: int, stop: int) -> Window:
        """Bars `start:stop` of this (whole-history) window: the runner's per-bar window,
        sharing the arrays, so making one costs an object and no copy."""
        window = object.__new__(Window)
        window._arrays, window._frame = self._arrays, self._frame
        window._start, window._stop, window._df = start, stop, None
        return window

    def __getitem__(self, column: str) -> npt.NDArray[Any]:
        try:
            return self._arrays[column][self._start : self._stop]
        except (KeyError, TypeError):
            if isinstance(column, str):
                raise KeyError(self._unknown("column", column)) from None
            raise TypeError(
                f"window[{column!r}]: a window is indexed by column name, e.g. "
                f"window['close']; bars are positions in a column: window.close[-1] is the "
                f"current bar's close"
            ) from None

    def __getattr__(self, name: str) -> Any:
        # Only called when no column property or method has the name.
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(self._unknown("attribute", name))

    def __len__(self) -> int:
        return self._stop - self._start

    def __contains__(self, column: object) -> bool:
        return column in self._arrays

    def __repr__(self) -> str:
        if not len(self):
            return "Window(0 bars)"
        first, last = (str(t.astype("datetime64[m]")).replace("T", " ") for t in self.time[[0, -1]])
        columns = ", ".join(self.columns)
        return f"Window({len(self)} bars, {first} to {last} UTC; columns: {columns})"

    @property
    def columns(self) -> tuple[str, ...]:
        """The column names, as in the pandas window (`time` is its index, not a column)."""
        return tuple(name for name in self._arrays if name != "time")

    @property
    def df(self) -> pd.DataFrame:
        """These bars as the pandas DataFrame a `window = "pandas"` strategy gets."""
        if self._df is None:
            self._df = frame_window(self._frame, self._start, self._stop)
        return self._df

    def _unknown(self, what: str, name: str) -> str:
        names = [*self.columns, "time"]
        close = [n for n in names if n.lower() == name.lower()]
        close = close or _TIME_NAMES.get(name.lower(), [])
        close = close or difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (
            f"the window has no {what} {name!r}{hint}; its columns are {', '.join(names)} "
            f"(window.close or window['close']), and window.df is the bars as a DataFrame"
        )

    # --- the columns, as attributes ------------------------------------------------------

    @property
    def time(self) -> TimeArray:
        """The bars' open times, `datetime64[ns]` in UTC."""
        return self["time"]

    @property
    def open_time(self) -> IntArray:
        """The bars' open times in ms since the epoch."""
        return self["open_time"]

    @property
    def open(self) -> FloatArray:
        return self["open"]

    @property
    def high(self) -> FloatArray:
        return self["high"]

    @property
    def low(self) -> FloatArray:
        return self["low"]

    @property
    def close(self) -> FloatArray:
        return self["close"]

    @property
    def volume(self) -> FloatArray:
        """Base-asset volume."""
        return self["volume"]

    @property
    def close_time(self) -> IntArray:
        """The bars' close times in ms since the epoch."""
        return self["close_time"]

    @property
    def quote_volume(self) -> FloatArray:
        return self["quote_volume"]

    @property
    def trades(self) -> IntArray:
        """Number of trades in the bar."""
        return self["trades"]

    @property
    def taker_buy_base(self) -> FloatArray:
        return self["taker_buy_base"]

    @property
    def taker_buy_quote(self) -> FloatArray:
        return self["taker_buy_quote"]
