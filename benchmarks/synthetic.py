"""SYNTHETIC candles for the benchmarks: a seeded geometric random walk, clearly not market data.

Shaped like the canonical candle frame so every store and the whole engine take it; what the
benchmarks measure is the machinery, not a strategy's edge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

T0 = 1_609_459_200_000  # 2021-01-01
MINUTE = 60_000


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


def write_store(root: Path, symbols: int, bars: int) -> list[str]:
    """A Parquet candle store of ``symbols`` × ``bars`` 1m bars (symbol ``i`` seeded ``i``);
    the symbols' names."""
    from shared.candles import ParquetCandleStore

    store = ParquetCandleStore(root)
    names = [f"SYN{i:02d}USDT" for i in range(symbols)]
    for i, name in enumerate(names):
        store.write(name, "1m", synthetic(bars, i, step_ms=MINUTE, sigma=0.001, spread=0.0007))
    return names
