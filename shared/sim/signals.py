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
    """Check ``raw`` (a list of signal records) against ``times``, the simulated bar times."""
    if not isinstance(raw, list):
        raise InvalidOutput(
            f"signals for {symbol} must be a list, got {type(raw).__name__}", symbol=symbol
        )
    n = len(raw)
    pos = np.empty(n, dtype=np.int64)
    kind = np.empty(n, dtype=np.int8)
    prices = np.full((3, n), np.nan)
    confidence = np.ones(n)
    for i, record in enumerate(raw):
        if not isinstance(record, dict):
            raise InvalidOutput(
                f"{symbol}: signal #{i} is not an object: {record!r:.80}", symbol=symbol
            )
        t = record.get("t")
        if type(t) is not int:
            raise InvalidOutput(
                f"{symbol}: signal #{i} has no integer bar time 't': {t!r:.40}", symbol=symbol
            )
        j = int(np.searchsorted(times, t))
        if j >= len(times) or times[j] != t:
            raise InvalidOutput(
                f"{symbol}: signal at t={t} is not the open time of a simulated bar", symbol=symbol
            )
        pos[i] = j
        signal = record.get("signal")
        if signal not in _KINDS:
            raise InvalidOutput(
                f"{symbol}: signal at t={t} is {signal!r:.40}; expected 'BUY' or 'SELL'",
                symbol=symbol,
            )
        kind[i] = _KINDS[signal]
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
            prices[row, i] = value
        conf = record.get("confidence", 1.0)
        if type(conf) not in (int, float) or not math.isfinite(conf):
            raise InvalidOutput(
                f"{symbol}: confidence at t={t} must be a finite number", symbol=symbol
            )
        confidence[i] = conf
        if kind[i] == BUY and prices[2, i] >= prices[1, i]:
            raise InvalidOutput(
                f"{symbol}: BUY at t={t} has sl_price {prices[2, i]} not below tp_price"
                f" {prices[1, i]}; a long's stop-loss must be below its take-profit",
                symbol=symbol,
            )
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    if n > 1 and (np.diff(pos) == 0).any():
        t = int(times[pos[np.flatnonzero(np.diff(pos) == 0)[0]]])
        raise InvalidOutput(f"{symbol}: two signals at the same bar t={t}", symbol=symbol)
    return SignalArrays(
        pos=pos,
        kind=kind[order],
        entry_price=prices[0, order],
        tp_price=prices[1, order],
        sl_price=prices[2, order],
        confidence=confidence[order],
    )
