"""Real candles for the strategy tests: the sample store bundled with the package."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

SAMPLE_1H = Path(__file__).parents[3] / "stratorch" / "sample" / "1h"

SYMBOLS = (
    "BTCUSDT",
    "ETHUSDT",
    "SOLUSDT",
    "ADAUSDT",
    "XRPUSDT",
    "DOGEUSDT",
    "LINKUSDT",
    "LTCUSDT",
)


@functools.cache
def _load(symbol: str) -> pd.DataFrame:
    return pd.read_parquet(SAMPLE_1H / f"{symbol}.parquet")


def real_candles(symbol: str) -> pd.DataFrame:
    """The canonical 1h candle frame of `symbol` (RangeIndex, int64 open_time), a fresh copy."""
    return _load(symbol).copy()


def make_candles(close: Sequence[float], high: Sequence[float] | None = None) -> pd.DataFrame:
    """A canonical candle frame of hourly bars with the given closes (open = low = close)."""
    closes = [float(c) for c in close]
    highs = closes if high is None else [float(h) for h in high]
    n = len(closes)
    hour = 3_600_000
    open_time = [1_609_459_200_000 + i * hour for i in range(n)]  # 2021-01-01 00:00 UTC
    return pd.DataFrame(
        {
            "open_time": pd.Series(open_time, dtype="int64"),
            "open": closes,
            "high": highs,
            "low": closes,
            "close": closes,
            "volume": [1.0] * n,
            "close_time": pd.Series([t + hour - 1 for t in open_time], dtype="int64"),
            "quote_volume": [1.0] * n,
            "trades": pd.Series([1] * n, dtype="int64"),
            "taker_buy_base": [0.5] * n,
            "taker_buy_quote": [0.5] * n,
        }
    )
