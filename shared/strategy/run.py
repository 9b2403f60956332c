"""Run a strategy over a symbol's candles and collect its signals as plain JSON-able columns.

:func:`compute_signals` is the one entry point; it runs inside the sandbox, so it checks the
strategy's output only as far as that helps the user fix their code (bar time, bad value, what
was expected). The trusted side re-validates every value anyway: nothing here is a guarantee.

The signals are columns, not a record per signal: a million bars give ~28,000 signals, and as
records they cost ~0.15 s more to build, encode as JSON, parse and check on the trusted side.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from numbers import Real
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from .base import BaseStrategy
from .window import WINDOWS, Window, frame_window

__all__ = [
    "FRAME_COLUMNS",
    "SIGNAL_FIELDS",
    "SignalColumns",
    "StrategyOutputError",
    "compute_signals",
    "signal_columns",
    "signal_records",
    "strategy_frame",
]

#: The columns of the frame a strategy sees, in order, indexed by `time` (UTC, from open_time).
FRAME_COLUMNS = (
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "trades",
    "taker_buy_base",
    "taker_buy_quote",
)
_REQUIRED_COLUMNS = ("open_time", "open", "high", "low", "close")

_ACTIONS = ("BUY", "SELL")
#: What holds besides a missing value: `""` is what `np.where(buy, "BUY", "")` leaves.
_HOLDS = ("HOLD", "")
_PRICE_KEYS = ("entry_price", "tp_price", "sl_price")
_DECIDE_KEYS = frozenset({"signal", *_PRICE_KEYS, "confidence", "meta"})
_EXAMPLE = "{'signal': 'BUY', 'tp_price': ..., 'sl_price': ...}"

Mode = Literal["auto", "per_bar", "vectorized"]

#: A signal's fields; a symbol's signals are one list per field (:data:`SignalColumns`), a row
#: per BUY/SELL bar in bar order: the bar's open time in ms, ``"BUY"``/``"SELL"``, the three
#: levels (``None`` when absent), the confidence (1.0 by default) and the ``meta`` dict.
SIGNAL_FIELDS = ("t", "signal", "entry_price", "tp_price", "sl_price", "confidence", "meta")

#: A symbol's signals, as the sandbox returns them: field → its column (see SIGNAL_FIELDS).
SignalColumns = dict[str, list[Any]]


def signal_records(columns: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """``columns``' signals as records: a dict per signal, in order."""
    return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]


def signal_columns(records: Sequence[Mapping[str, Any]]) -> SignalColumns:
    """``records`` (a dict per signal) as columns; a field a record leaves out gets its
    default (no levels, confidence 1.0, an empty ``meta``; ``None`` for ``t`` and
    ``signal``, which the trusted side refuses)."""
    return {name: [r.get(name, _DEFAULTS.get(name)) for r in records] for name in SIGNAL_FIELDS}


_DEFAULTS: dict[str, Any] = {"confidence": 1.0, "meta": {}}


class StrategyOutputError(ValueError):
    """A strategy returned something that is not a signal; the message names bar and value."""


def strategy_frame(candles: pd.DataFrame) -> pd.DataFrame:
    """The frame strategies see: `candles`' columns indexed by a UTC `DatetimeIndex` `time`.

    `candles` is the canonical candle frame (any index, an int64 `open_time` in ms). Columns
    outside :data:`FRAME_COLUMNS` are dropped so every strategy sees the same layout.
    The index is always `datetime64[ns, UTC]`: `pd.to_datetime(..., unit="ms")` gives
    nanoseconds in pandas 1.x and 2.x but microseconds in 3.x, and a strategy doing arithmetic
    on `df.index.asi8` would get other numbers from another pandas. The column labels are
    `object` strings under any pandas too: pandas 3's Arrow-backed labels make every
    `df["close"]` ~1.5 µs slower, which a per-bar strategy pays on every bar.
    """
    missing = [c for c in _REQUIRED_COLUMNS if c not in candles.columns]
    if missing:
        raise ValueError(
            f"candles lack column(s) {', '.join(missing)}; expected {', '.join(FRAME_COLUMNS)}"
        )
    # No .copy(): the selection is a new frame (copy-on-write), so what a strategy writes
    # never reaches `candles`, and at 1M bars that copy cost 88 MB in the sandbox.
    frame = candles.loc[:, [c for c in FRAME_COLUMNS if c in candles.columns]]
    times = frame["open_time"].to_numpy(dtype=np.int64).astype("datetime64[ms]")
    frame.index = pd.DatetimeIndex(times.astype("datetime64[ns]"), name="time").tz_localize("UTC")
    frame.columns = pd.Index(list(frame.columns), dtype=object)
    return frame


def compute_signals(
    strategy: BaseStrategy,
    candles: pd.DataFrame,
    *,
    first_sim: int,
    interval: str,
    symbol: str,
    mode: Mode = "auto",
) -> SignalColumns:
    """The BUY/SELL signals `strategy` gives on the simulated bars of `candles`, as columns.

    :param strategy: the strategy instance.
    :param candles: the canonical candle frame, one row per bar in time order.
    :param first_sim: position of the first simulated bar; rows before it are warm-up only:
        the strategy sees them but no signal is taken from them.
    :param interval: the bar length (`"1h"`, ...), passed on to `decide`.
    :param symbol: passed on to `decide` as `symbol=`.
    :param mode: `"per_bar"` calls `decide` once per simulated bar with its last
        `get_required_lookback()` bars; `"vectorized"` calls `signals` once over all bars;
        `"auto"` (default) runs vectorized iff the strategy's class overrides `signals`.
    :return: a list per field of :data:`SIGNAL_FIELDS`, a row per BUY/SELL in bar order,
        with plain Python values (prices `None` when absent, `confidence` 1.0 by default,
        `meta` a dict); :func:`signal_records` gives a dict per signal.
    :raises StrategyOutputError: the strategy returned something malformed; the message
        names the bar and the value.
    """
    if mode not in ("auto", "per_bar", "vectorized"):
        raise ValueError(f"mode must be 'auto', 'per_bar' or 'vectorized', got {mode!r}")
    frame = strategy_frame(candles)
    if not 0 <= first_sim <= len(frame):
        raise ValueError(f"first_sim must be in [0, {len(frame)}] (the bar count), got {first_sim}")
    if mode == "auto":
        overrides = type(strategy).signals is not BaseStrategy.signals
        mode = "vectorized" if overrides else "per_bar"
    if mode == "vectorized":
        return _vectorized(strategy, frame, first_sim)
    return _per_bar(strategy, frame, first_sim, interval=interval, symbol=symbol)


def _per_bar(
    strategy: BaseStrategy, frame: pd.DataFrame, first_sim: int, *, interval: str, symbol: str
) -> SignalColumns:
    lookback = _lookback(strategy)
    bars = _windows(strategy, frame)
    times = frame["open_time"].to_numpy(dtype=np.int64)
    source = f"{type(strategy).__name__}.decide()"
    decide = strategy.decide
    records: list[dict[str, Any]] = []
    for t in range(first_sim, len(frame)):
        try:
            out = decide(bars(max(0, t - lookback + 1), t + 1), interval, symbol=symbol)
        except Exception as exc:
            exc.add_note(f"in {source} at bar {_when(times[t])} ({symbol} {interval})")
            raise
        if out is None:
            continue
        if not isinstance(out, Mapping):
            raise StrategyOutputError(
                f"{source} returned {_show(out)} for bar {_when(times[t])}; "
                f"expected None or a dict such as {_EXAMPLE}"
            )
        unknown = sorted(str(k) for k in out if k not in _DECIDE_KEYS)
        if unknown:
            raise StrategyOutputError(
                f"{source} returned unknown key(s) {', '.join(map(repr, unknown))} for bar "
                f"{_when(times[t])}; the keys are: {', '.join(sorted(_DECIDE_KEYS))}"
            )
        if "signal" not in out:
            raise StrategyOutputError(
                f"{source} returned a dict without 'signal' for bar {_when(times[t])}; "
                f"expected e.g. {_EXAMPLE}, or None to hold"
            )
        record = _record(out.get, int(times[t]), source)
        if record is not None:
            records.append(record)
    return signal_columns(records)


def _vectorized(strategy: BaseStrategy, frame: pd.DataFrame, first_sim: int) -> SignalColumns:
    source = f"{type(strategy).__name__}.signals()"
    times = frame["open_time"].to_numpy(dtype=np.int64)
    try:
        out = strategy.signals(frame)
    except Exception as exc:
        exc.add_note(f"in {source} over {len(frame)} bars")
        raise
    _check_frame(out, frame, source)
    columns = {
        name: out[name] for name in ("signal", *_PRICE_KEYS, "confidence", "meta") if name in out
    }
    signal = columns["signal"].to_numpy(dtype=object)
    rows = first_sim + np.flatnonzero(~_holds(signal[first_sim:]))
    at_once = _columns_at_once(columns, signal, rows, times)
    if at_once is not None:
        return at_once
    # Something to report (or a column of Python objects): record by record, so the error is
    # the one for the first bad bar, and every value is checked as decide()'s are.
    values = {name: column.to_numpy(dtype=object) for name, column in columns.items()}
    records = []
    for t in rows.tolist():
        row = {name: column[t] for name, column in values.items()}
        record = _record(row.get, int(times[t]), source)
        if record is not None:
            records.append(record)
    return signal_columns(records)


def _holds(signal: npt.NDArray[np.object_]) -> npt.NDArray[np.bool_]:
    """Where ``signal`` (an object array) holds: a missing value, ``"HOLD"`` or ``""``.

    Only the values present are compared with the words (most bars of a column that marks
    its signals and leaves the rest missing are missing: 4 ms at 1M bars instead of 23).
    """
    holds = np.asarray(pd.isna(signal), dtype=np.bool_)
    given = np.flatnonzero(~holds)
    values = signal[given]
    try:
        worded = np.zeros(len(values), dtype=np.bool_)
        for word in _HOLDS:
            worded |= np.asarray(values == word, dtype=np.bool_)
    except (TypeError, ValueError):  # values whose == is not a bool: checked one by one
        worded = np.array([value in _HOLDS for value in values], dtype=np.bool_)
    holds[given] = worded
    return holds


def _numeric(dtype: object) -> bool:
    return isinstance(dtype, np.dtype) and dtype.kind in "fiu"


def _columns_at_once(
    columns: Mapping[str, pd.Series],
    signal: npt.NDArray[np.object_],
    rows: npt.NDArray[np.intp],
    times: npt.NDArray[np.int64],
) -> SignalColumns | None:
    """The signals of bars ``rows`` built column by column, with no Python per value checked:
    when the signals are all ``"BUY"``/``"SELL"`` strings and every other column is numeric
    (or absent, or ``meta`` all missing) and valid. None when anything needs the record-by-
    record path: an invalid value (to report it as that path does) or an object column.
    """
    kinds = signal[rows].tolist()
    if not all(type(value) is str and value in _ACTIONS for value in kinds):
        return None
    out: SignalColumns = {"t": times[rows].tolist(), "signal": kinds}
    for key in (*_PRICE_KEYS, "confidence"):
        column = columns.get(key)
        if column is None:
            out[key] = [None if key != "confidence" else 1.0] * len(rows)
            continue
        if not (isinstance(column, pd.Series) and _numeric(column.dtype)):
            return None
        values = column.to_numpy()[rows].astype(np.float64)
        missing = np.isnan(values)
        present = values[~missing]
        if not np.isfinite(present).all() or (key != "confidence" and (present <= 0).any()):
            return None
        filled = values.astype(object)
        filled[missing] = None if key != "confidence" else 1.0
        out[key] = filled.tolist()
    meta = columns.get("meta")
    if meta is not None and not (
        isinstance(meta, pd.Series) and pd.isna(meta.to_numpy(dtype=object)[rows]).all()
    ):
        return None
    out["meta"] = [{} for _ in range(len(rows))]
    return out


def _check_frame(out: object, frame: pd.DataFrame, source: str) -> None:
    if not isinstance(out, pd.DataFrame):
        raise StrategyOutputError(
            f"{source} returned {_show(out)}; expected a DataFrame with df's index and a "
            f"'signal' column, e.g. pd.DataFrame({{'signal': ...}}, index=df.index)"
        )
    if len(out) != len(frame):
        raise StrategyOutputError(
            f"{source} returned {len(out)} rows for {len(frame)} bars; expected one row per "
            f"bar of df, with index=df.index"
        )
    if not out.index.equals(frame.index):
        mismatch = next(
            (i for i, (a, b) in enumerate(zip(out.index, frame.index, strict=True)) if a != b),
            0,
        )
        raise StrategyOutputError(
            f"{source} returned a frame whose index differs from df's at row {mismatch} "
            f"(got {out.index[mismatch]!r}, expected bar {frame.index[mismatch]}); build it "
            f"with index=df.index and do not sort, drop or reindex rows"
        )
    if "signal" not in out.columns:
        got = ", ".join(map(repr, map(str, out.columns))) or "none"
        raise StrategyOutputError(
            f"{source} returned a frame without a 'signal' column (columns: {got}); "
            f"expected 'signal' with 'BUY', 'SELL', 'HOLD', '' or None per bar"
        )


def _record(get: Callable[[str], Any], time_ms: int, source: str) -> dict[str, Any] | None:
    """The JSON-able record for one bar's output, or None for a hold; `get(key)` reads it."""
    signal = get("signal")
    if _is_missing(signal) or (isinstance(signal, str) and signal in _HOLDS):
        return None
    if not isinstance(signal, str) or signal not in _ACTIONS:
        raise StrategyOutputError(
            f"{source} gave signal {_show(signal)} for bar {_when(time_ms)}; "
            f"expected 'BUY', 'SELL', 'HOLD', '' or None (upper case)"
        )
    record: dict[str, Any] = {"t": time_ms, "signal": str(signal)}
    for key in _PRICE_KEYS:
        record[key] = _price(get(key), key, time_ms, source)
    record["confidence"] = _confidence(get("confidence"), time_ms, source)
    record["meta"] = _meta(get("meta"), time_ms, source)
    return record


def _is_missing(value: object) -> bool:
    """None, NaN, pd.NA or NaT — what pandas puts in a column where there is no value."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))  # type: ignore[call-overload]
    except (TypeError, ValueError):  # array-likes: not a missing scalar
        return False


def _number(value: object, key: str, time_ms: int, source: str, expected: str) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, Real):
        raise StrategyOutputError(
            f"{source} gave {key} {_show(value)} for bar {_when(time_ms)}; expected {expected}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise StrategyOutputError(
            f"{source} gave {key} {number!r} for bar {_when(time_ms)}; expected {expected}"
        )
    return number


def _price(value: object, key: str, time_ms: int, source: str) -> float | None:
    if _is_missing(value):
        return None
    expected = "a positive float, or None for no level"
    price = _number(value, key, time_ms, source, expected)
    if price <= 0:
        raise StrategyOutputError(
            f"{source} gave {key} {price!r} for bar {_when(time_ms)}; expected {expected}"
        )
    return price


def _confidence(value: object, time_ms: int, source: str) -> float:
    if _is_missing(value):
        return 1.0
    return _number(value, "confidence", time_ms, source, "a finite float (default 1.0)")


def _meta(value: object, time_ms: int, source: str) -> dict[str, Any]:
    if _is_missing(value):
        return {}
    if not isinstance(value, Mapping):
        raise StrategyOutputError(
            f"{source} gave meta {_show(value)} for bar {_when(time_ms)}; expected a dict"
        )
    try:
        text = json.dumps(dict(value), allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise StrategyOutputError(
            f"{source} gave a meta dict for bar {_when(time_ms)} that is not JSON-able: {exc}; "
            f"use str, int, float (not NaN: use None), bool, None, lists and dicts"
        ) from None
    meta: dict[str, Any] = json.loads(text)
    return meta


def _json_default(value: object) -> object:
    """Let numpy scalars and arrays through as the Python values they hold."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-able")


def _windows(
    strategy: BaseStrategy, frame: pd.DataFrame
) -> Callable[[int, int], pd.DataFrame | Window]:
    """`bars(start, stop)`: rows `start:stop` of `frame` as the strategy's `window` asks."""
    kind = type(strategy).window
    if kind == "numpy":
        return Window(frame)._bars
    if kind == "pandas":
        return partial(frame_window, frame)
    raise StrategyOutputError(
        f"{type(strategy).__name__}.window is {_show(kind)}; it says what decide() gets: "
        f"{' or '.join(map(repr, WINDOWS))} (a DataFrame, the default, or a Window of numpy "
        f"arrays); if it is your own attribute, give it another name."
    )


def _lookback(strategy: BaseStrategy) -> int:
    lookback = strategy.get_required_lookback()
    if isinstance(lookback, bool) or not isinstance(lookback, int | np.integer) or lookback < 1:
        raise StrategyOutputError(
            f"{type(strategy).__name__}.get_required_lookback() returned {_show(lookback)}; "
            f"expected a positive int: how many bars decide() needs, the current one included"
        )
    return int(lookback)


def _when(time_ms: int | np.integer) -> str:
    stamp = pd.Timestamp(int(time_ms), unit="ms", tz="UTC")
    return f"{stamp:%Y-%m-%d %H:%M:%S} UTC (open_time {int(time_ms)})"


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"
