"""Validation of the raw signals a sandbox returns: the trusted side never believes them.

A strategy's output is untrusted data. Before anything is built from it, every record is
checked against the bars it claims to be about; one bad record fails the unit with
``invalid_output`` and a message naming the symbol, the bar and the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import InvalidOutput
from shared.strategy.run import SIGNAL_FIELDS, signal_records

BUY = 1
SELL = -1
_KINDS = {"BUY": BUY, "SELL": SELL}


@dataclass(frozen=True)
class SignalArrays:
    """Validated signals of one symbol, sorted by bar; ``pos`` indexes the simulated bars."""

    pos: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    entry_price: npt.NDArray[np.float64]  # NaN: market entry at the next open
    tp_price: npt.NDArray[np.float64]  # NaN: no take-profit
    sl_price: npt.NDArray[np.float64]  # NaN: no stop-loss
    confidence: npt.NDArray[np.float64]


def validate_signals(raw: Any, *, symbol: str, times: npt.NDArray[np.int64]) -> SignalArrays:
    """Check ``raw`` (a symbol's signal columns, :data:`shared.strategy.SIGNAL_FIELDS`)
    against ``times``, the simulated bar times.

    Each column is checked at once. Only when one holds something wrong are the signals
    checked one by one, so that the error raised is the first one a record-by-record check
    meets, naming its bar and value.
    """
    problem = _shape_problem(raw)
    if problem is not None:
        raise InvalidOutput(
            f"signals for {symbol} must be the columns {', '.join(SIGNAL_FIELDS)} (lists of one"
            f" length), got {problem}",
            symbol=symbol,
        )
    ts, kinds, levels, confidences = _at_once(raw) or _one_by_one(raw, symbol, times)
    pos, kind, prices = _check_against_bars(symbol, times, ts, kinds, levels)
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    if len(pos) > 1 and (np.diff(pos) == 0).any():
        t = int(times[pos[np.flatnonzero(np.diff(pos) == 0)[0]]])
        raise InvalidOutput(f"{symbol}: two signals at the same bar t={t}", symbol=symbol)
    return SignalArrays(
        pos=pos,
        kind=kind[order],
        entry_price=prices[0, order],
        tp_price=prices[1, order],
        sl_price=prices[2, order],
        confidence=np.asarray(confidences, dtype=np.float64)[order],
    )


def _shape_problem(raw: Any) -> str | None:
    """What keeps ``raw`` from being a symbol's signal columns, in words; None if nothing."""
    if not isinstance(raw, dict):
        return f"{type(raw).__name__} {raw!r:.60}"
    missing = [name for name in SIGNAL_FIELDS if name not in raw]
    if missing:
        return f"no {', '.join(map(repr, missing))}"
    extra = [name for name in raw if name not in SIGNAL_FIELDS]
    if extra:
        return f"the unknown {', '.join(map(repr, map(str, extra)))}"
    for name, column in raw.items():
        if not isinstance(column, list):
            return f"{name!r} as a {type(column).__name__}"
    lengths = {name: len(column) for name, column in raw.items()}
    if len(set(lengths.values())) > 1:
        return "lengths " + ", ".join(f"{name} {n}" for name, n in lengths.items())
    return None


#: What :func:`_at_once` and :func:`_one_by_one` give: each signal's bar time, kind, levels
#: (entry, take-profit, stop-loss; NaN where absent) and confidence.
_Checked = tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]
_NUMBER = {int, float}


def _at_once(columns: dict[str, list[Any]]) -> _Checked | None:
    """The signals of ``columns`` when each value is what it must be, checked column by
    column; None when any is not (:func:`_one_by_one` then says which)."""
    try:
        if not set(map(type, columns["t"])) <= {int}:
            return None
        t = np.array(columns["t"], dtype=np.int64)  # OverflowError outside int64
        signal = columns["signal"]
        if not set(map(type, signal)) <= {str} or not set(signal) <= _KINDS.keys():
            return None
        kind = np.array([_KINDS[s] for s in signal], dtype=np.int8)
        levels = np.empty((len(t), 3), dtype=np.float64)
        for row, key in enumerate(("entry_price", "tp_price", "sl_price")):
            column = columns[key]
            if not set(map(type, column)) <= {*_NUMBER, type(None)}:
                return None
            levels[:, row] = column  # None becomes NaN; OverflowError for a huge int
            given = np.array([value is not None for value in column], dtype=np.bool_)
            if not (np.isfinite(levels[given, row]) & (levels[given, row] > 0)).all():
                return None
        confidence = columns["confidence"]
        if not set(map(type, confidence)) <= _NUMBER:
            return None
        confidences = np.array(confidence, dtype=np.float64)
        if not np.isfinite(confidences).all():
            return None
    except OverflowError:
        return None
    return t, kind, levels, confidences


def _one_by_one(
    columns: dict[str, list[Any]], symbol: str, times: npt.NDArray[np.int64]
) -> _Checked:
    """The signals of ``columns`` checked record by record: the loop checks what each one is
    (types, values); what compares signals with the bars or levels with each other is then
    checked for all at once. Raises for the first bad signal, in order."""
    ts: list[int] = []  # appended once a record's 't' is an integer
    kinds: list[int] = []  # these four once the whole record is checked
    levels: list[tuple[float, float, float]] = []
    confidences: list[float] = []
    try:
        for record in signal_records(columns):
            t = record["t"]
            if type(t) is not int:
                raise InvalidOutput(
                    f"{symbol}: signal #{len(ts)} has no integer bar time 't': {t!r:.40}",
                    symbol=symbol,
                )
            if not _INT64_MIN <= t <= _INT64_MAX:
                raise _not_a_bar(symbol, t)
            ts.append(t)
            signal = record["signal"]
            if type(signal) is not str or signal not in _KINDS:
                raise InvalidOutput(
                    f"{symbol}: signal at t={t} is {signal!r:.40}; expected 'BUY' or 'SELL'",
                    symbol=symbol,
                )
            prices = [math.nan, math.nan, math.nan]
            for row, key in enumerate(("entry_price", "tp_price", "sl_price")):
                value = record[key]
                if value is None:
                    continue
                if type(value) not in _NUMBER or not _finite(value) or value <= 0:
                    raise InvalidOutput(
                        f"{symbol}: {key} at t={t} must be a positive finite number or null,"
                        f" got {value!r:.40}",
                        symbol=symbol,
                    )
                prices[row] = value
            conf = record["confidence"]
            if type(conf) not in _NUMBER or not _finite(conf):
                raise InvalidOutput(
                    f"{symbol}: confidence at t={t} must be a finite number", symbol=symbol
                )
            kinds.append(_KINDS[signal])
            levels.append((prices[0], prices[1], prices[2]))
            confidences.append(conf)
    except InvalidOutput:
        _check_against_bars(symbol, times, ts, kinds, levels)  # an earlier record's error first
        raise
    return ts, kinds, levels, confidences


def _finite(value: float) -> bool:
    """Whether ``value`` is a finite float: an integer beyond a float's range (JSON allows
    ``1e400`` written out as digits) is not."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def _check_against_bars(
    symbol: str,
    times: npt.NDArray[np.int64],
    ts: npt.ArrayLike,
    kinds: npt.ArrayLike,
    levels: npt.ArrayLike,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int8], npt.NDArray[np.float64]]:
    """Each ``ts`` on a bar of ``times``, and each BUY's stop-loss below its take-profit
    (``kinds`` and ``levels`` may be one record shorter than ``ts``); raise for the first
    record that fails, its bar time before its levels. Each signal's bar index, kind and
    levels (one row per level)."""
    t = np.asarray(ts, dtype=np.int64)
    pos = np.searchsorted(times, t)
    on_bar = pos < len(times)
    on_bar[on_bar] = times[pos[on_bar]] == t[on_bar]
    kind = np.asarray(kinds, dtype=np.int8)
    prices = np.asarray(levels, dtype=np.float64).reshape(-1, 3).T
    crossed = (kind == BUY) & (prices[2] >= prices[1])
    bad_bar = int(np.argmin(on_bar)) if not on_bar.all() else len(t)
    bad_level = int(np.argmax(crossed)) if crossed.any() else len(t)
    if bad_bar < len(t) and bad_bar <= bad_level:
        raise _not_a_bar(symbol, int(t[bad_bar]))
    if bad_level < len(t):
        i = bad_level
        raise InvalidOutput(
            f"{symbol}: BUY at t={t[i]} has sl_price {prices[2, i]} not below tp_price"
            f" {prices[1, i]}; a long's stop-loss must be below its take-profit",
            symbol=symbol,
        )
    return pos, kind, prices


def _not_a_bar(symbol: str, t: int) -> InvalidOutput:
    return InvalidOutput(
        f"{symbol}: signal at t={t} is not the open time of a simulated bar", symbol=symbol
    )
