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
    """Check ``raw`` (a list of signal records) against ``times``, the simulated bar times.

    The loop checks what each record is (types, values); what compares records with the bars
    or levels with each other is then checked for all records at once. The error raised is
    still the first one a record-by-record check would meet.
    """
    if not isinstance(raw, list):
        raise InvalidOutput(
            f"signals for {symbol} must be a list, got {type(raw).__name__}", symbol=symbol
        )
    ts: list[int] = []  # appended once a record's 't' is an integer
    kinds: list[int] = []  # these four once the whole record is checked
    levels: list[tuple[float, float, float]] = []
    confidences: list[float] = []
    try:
        for i, record in enumerate(raw):
            if not isinstance(record, dict):
                raise InvalidOutput(
                    f"{symbol}: signal #{i} is not an object: {record!r:.80}", symbol=symbol
                )
            t = record.get("t")
            if type(t) is not int:
                raise InvalidOutput(
                    f"{symbol}: signal #{i} has no integer bar time 't': {t!r:.40}",
                    symbol=symbol,
                )
            if not _INT64_MIN <= t <= _INT64_MAX:
                raise _not_a_bar(symbol, t)
            ts.append(t)
            signal = record.get("signal")
            if signal not in _KINDS:
                raise InvalidOutput(
                    f"{symbol}: signal at t={t} is {signal!r:.40}; expected 'BUY' or 'SELL'",
                    symbol=symbol,
                )
            prices = [math.nan, math.nan, math.nan]
            for row, key in enumerate(("entry_price", "tp_price", "sl_price")):
                value = record.get(key)
                if value is None:
                    continue
                if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
                    raise InvalidOutput(
                        f"{symbol}: {key} at t={t} must be a positive finite number or null,"
                        f" got {value!r:.40}",
                        symbol=symbol,
                    )
                prices[row] = value
            conf = record.get("confidence", 1.0)
            if type(conf) not in (int, float) or not math.isfinite(conf):
                raise InvalidOutput(
                    f"{symbol}: confidence at t={t} must be a finite number", symbol=symbol
                )
            kinds.append(_KINDS[signal])
            levels.append((prices[0], prices[1], prices[2]))
            confidences.append(conf)
    except InvalidOutput:
        _check_against_bars(symbol, times, ts, kinds, levels)  # an earlier record's error first
        raise
    pos, kind, prices_ = _check_against_bars(symbol, times, ts, kinds, levels)
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    if len(pos) > 1 and (np.diff(pos) == 0).any():
        t = int(times[pos[np.flatnonzero(np.diff(pos) == 0)[0]]])
        raise InvalidOutput(f"{symbol}: two signals at the same bar t={t}", symbol=symbol)
    return SignalArrays(
        pos=pos,
        kind=kind[order],
        entry_price=prices_[0, order],
        tp_price=prices_[1, order],
        sl_price=prices_[2, order],
        confidence=np.array(confidences, dtype=np.float64)[order],
    )


_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def _check_against_bars(
    symbol: str,
    times: npt.NDArray[np.int64],
    ts: list[int],
    kinds: list[int],
    levels: list[tuple[float, float, float]],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int8], npt.NDArray[np.float64]]:
    """Each ``ts`` on a bar of ``times``, and each BUY's stop-loss below its take-profit
    (``kinds`` and ``levels`` may be one record shorter than ``ts``); raise for the first
    record that fails, its bar time before its levels. Each signal's bar index, kind and
    levels (one row per level)."""
    t = np.array(ts, dtype=np.int64)
    pos = np.searchsorted(times, t)
    on_bar = pos < len(times)
    on_bar[on_bar] = times[pos[on_bar]] == t[on_bar]
    kind = np.array(kinds, dtype=np.int8)
    prices = np.array(levels, dtype=np.float64).reshape(-1, 3).T
    crossed = (kind == BUY) & (prices[2] >= prices[1])
    bad_bar = int(np.argmin(on_bar)) if not on_bar.all() else len(ts)
    bad_level = int(np.argmax(crossed)) if crossed.any() else len(ts)
    if bad_bar < len(ts) and bad_bar <= bad_level:
        raise _not_a_bar(symbol, ts[bad_bar])
    if bad_level < len(ts):
        i = bad_level
        raise InvalidOutput(
            f"{symbol}: BUY at t={ts[i]} has sl_price {prices[2, i]} not below tp_price"
            f" {prices[1, i]}; a long's stop-loss must be below its take-profit",
            symbol=symbol,
        )
    return pos, kind, prices


def _not_a_bar(symbol: str, t: int) -> InvalidOutput:
    return InvalidOutput(
        f"{symbol}: signal at t={t} is not the open time of a simulated bar", symbol=symbol
    )
