"""SYNTHETIC candles for the benchmarks: a seeded geometric random walk, clearly not market data.

Shaped like the canonical candle frame so every store and the whole engine take it; what the
benchmarks measure is the machinery, not a strategy's edge.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

T0 = 1_609_459_200_000  # 2021-01-01


def synthetic(
    n: int,
    seed: int,
    *,
    step_ms: int,
    sigma: float,
    spread: float,
    volume: tuple[float, float] = (1.0, 100.0),
) -> pd.DataFrame:
    """``n`` bars ``step_ms`` apart from 2021-01-01: log-returns ~ N(0, ``sigma``), wicks
    ~ |N(0, ``spread``)| of the close, volume uniform in ``volume``."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, sigma, n)))
    open_ = np.concatenate([[100.0], close[:-1]])
    wick = np.abs(rng.normal(0, spread, n)) * close
    open_time = T0 + step_ms * np.arange(n, dtype=np.int64)
    vol = rng.uniform(*volume, n)
    return pd.DataFrame(
        {
            "open_time": open_time,
            "open": open_,
            "high": np.maximum(open_, close) + wick,
            "low": np.minimum(open_, close) - wick,
            "close": close,
            "volume": vol,
            "close_time": open_time + step_ms - 1,
            "quote_volume": vol * close,
            "trades": rng.integers(10, 1000, n).astype(np.int64),
            "taker_buy_base": vol / 2,
            "taker_buy_quote": vol * close / 2,
        }
    )
