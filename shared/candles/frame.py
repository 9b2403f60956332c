"""The canonical candle frame: the one in-memory shape of candles everywhere.

The Binance parser produces it, the Parquet store and the MongoDB repository store and return
it, strategies and the simulator consume it. Pinning exact column names, order and dtypes here
is what makes a backtest on the local store bit-identical to the same backtest on MongoDB.

A canonical frame has exactly the columns of :data:`CANDLE_COLUMNS`, in that order and with
those dtypes, one row per bar sorted by ``open_time`` with no duplicates, and a default
``RangeIndex``. Times are integer milliseconds since the epoch, UTC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

_INT64 = np.dtype("int64")
_FLOAT64 = np.dtype("float64")

#: Column name -> dtype of a canonical candle frame, in column order. Names follow the
#: MongoDB ``candles`` documents; the Binance CSV's ``quote_asset_volume`` becomes
#: ``quote_volume`` and so on (see :mod:`shared.candles.binance`).
CANDLE_COLUMNS: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        "open_time": _INT64,
        "open": _FLOAT64,
        "high": _FLOAT64,
        "low": _FLOAT64,
        "close": _FLOAT64,
        "volume": _FLOAT64,
        "close_time": _INT64,
        "quote_volume": _FLOAT64,
        "trades": _INT64,
        "taker_buy_base": _FLOAT64,
        "taker_buy_quote": _FLOAT64,
    }
)


class Span(NamedTuple):
    """Which bars a unit runs on: ``interval`` bars with ``start_ms <= open_time < end_ms``
    (ms since the epoch, UTC), after up to ``lookback`` earlier ones for warm-up."""

    interval: str
    start_ms: int
    end_ms: int
    lookback: int = 0


class SymbolCandles(NamedTuple):
    """One symbol's candles as a unit runs on them: warm-up bars, then the simulated ones."""

    #: The canonical frame, its ``lookback`` warm-up rows first.
    frame: pd.DataFrame
    #: The index of the first simulated row (the first with ``open_time >= start``).
    first: int


class Written(NamedTuple):
    """What writing candles to a store changed."""

    #: Bars the store did not have.
    new: int
    #: Stored bars replaced by a bar with other values (the same values change nothing).
    replaced: int


class Merged(NamedTuple):
    """The result of :func:`merge_frames`."""

    frame: pd.DataFrame
    #: Rows dropped because a later frame (or a later row) had the same ``open_time``.
    duplicates: int
    #: Of those, how many differed from the row that replaced them.
    conflicts: int


def validate_frame(frame: pd.DataFrame) -> None:
    """Raise ``ValueError`` unless ``frame`` is a canonical candle frame.

    A programming error, not a user error: user data is checked (with file and line) by the
    parser before it ever becomes a frame.
    """
    problems: list[str] = []
    columns = list(frame.columns)
    if columns != list(CANDLE_COLUMNS):
        problems.append(f"columns are {columns}, expected {list(CANDLE_COLUMNS)}")
    else:
        problems += [
            f"column {name!r} is {frame[name].dtype}, expected {dtype}"
            for name, dtype in CANDLE_COLUMNS.items()
            if frame[name].dtype != dtype
        ]
    if not (
        isinstance(frame.index, pd.RangeIndex) and frame.index.equals(pd.RangeIndex(len(frame)))
    ):
        problems.append("the index is not a default RangeIndex (use reset_index(drop=True))")
    if not problems:
        steps = np.diff(frame["open_time"].to_numpy())
        if (steps <= 0).any():
            row = int(np.flatnonzero(steps <= 0)[0]) + 1
            problems.append(f"open_time is not strictly increasing at row {row}")
    if problems:
        raise ValueError("not a canonical candle frame: " + "; ".join(problems))


def merge_frames(frames: Sequence[pd.DataFrame]) -> Merged:
    """Combine candle frames into one canonical frame; for a repeated ``open_time`` the last wins.

    "Last" is the order of ``frames`` and, within a frame, of its rows, so newer data given
    later replaces older data. Each frame must have the canonical columns and dtypes; order and
    uniqueness are what this function establishes.
    """
    combined = pd.concat(frames, ignore_index=True)
    superseded = combined.duplicated("open_time", keep="last").to_numpy()
    kept = combined[~superseded]
    conflicts = 0
    if superseded.any():
        replaced = combined[superseded]
        winners = kept.set_index("open_time").loc[replaced["open_time"]]
        differs = np.zeros(len(replaced), dtype=bool)
        for name in winners.columns:
            differs |= replaced[name].to_numpy() != winners[name].to_numpy()
        conflicts = int(differs.sum())
    frame = kept.sort_values("open_time", kind="stable", ignore_index=True)
    return Merged(frame, duplicates=int(superseded.sum()), conflicts=conflicts)


def utc_text(ms: int) -> str:
    """``ms`` since the epoch as ``2021-11-27 00:00:00 UTC``, for error messages."""
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):  # a garbled timestamp must not hide the error
        return f"{ms} ms, out of range"
