"""Binance kline intervals and their lengths.

One table so that the request validator, the candle store and the metrics agree on what
``"1h"`` means. ``1M`` (a calendar month) has no fixed length; it is accepted for data but
its bar length is taken as 30 days where a length is needed (CAGR span, alignment checks skip it).
"""

from __future__ import annotations

from typing import Literal

Interval = Literal[
    "1s",
    "1m",
    "3m",
    "5m",
    "15m",
    "30m",
    "1h",
    "2h",
    "4h",
    "6h",
    "8h",
    "12h",
    "1d",
    "3d",
    "1w",
    "1M",
]

_SECOND = 1_000
_MINUTE = 60 * _SECOND
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR

INTERVAL_MS: dict[str, int] = {
    "1s": _SECOND,
    "1m": _MINUTE,
    "3m": 3 * _MINUTE,
    "5m": 5 * _MINUTE,
    "15m": 15 * _MINUTE,
    "30m": 30 * _MINUTE,
    "1h": _HOUR,
    "2h": 2 * _HOUR,
    "4h": 4 * _HOUR,
    "6h": 6 * _HOUR,
    "8h": 8 * _HOUR,
    "12h": 12 * _HOUR,
    "1d": _DAY,
    "3d": 3 * _DAY,
    "1w": 7 * _DAY,
    "1M": 30 * _DAY,
}

#: Intervals whose bars start at multiples of their length since the epoch. Weeks start on
#: Monday (the epoch was a Thursday) and months vary in length, so neither is checked.
ALIGNED_INTERVALS = frozenset(INTERVAL_MS) - {"1w", "1M"}


def interval_ms(interval: str) -> int:
    """Length of one bar of ``interval`` in milliseconds."""
    try:
        return INTERVAL_MS[interval]
    except KeyError:
        raise ValueError(
            f"unknown interval {interval!r}; expected one of {', '.join(INTERVAL_MS)}"
        ) from None
