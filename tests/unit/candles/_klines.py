"""Real Binance kline rows and small builders for candle tests.

``ADABTC_1M`` is verbatim data.binance.vision data: ``ADABTC-1m-2021-11-27.csv`` as shipped in
nautechsystems/nautilus_trader ``tests/test_data`` (LGPL-3.0); market data from Binance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from shared.candles import CANDLE_COLUMNS

ADABTC_1M = """\
1637971200000,0.00002853,0.00002854,0.00002851,0.00002854,36304.20000000,1637971259999,1.03547608,79,19523.00000000,0.55694227,0
1637971260000,0.00002854,0.00002860,0.00002854,0.00002859,89196.60000000,1637971319999,2.54751330,98,59004.20000000,1.68545512,0
1637971320000,0.00002859,0.00002860,0.00002857,0.00002859,26547.30000000,1637971379999,0.75867802,50,5425.90000000,0.15506127,0
1637971380000,0.00002858,0.00002862,0.00002849,0.00002857,162305.70000000,1637971439999,4.63429635,158,29169.60000000,0.83389490,0
1637971440000,0.00002856,0.00002857,0.00002854,0.00002855,4213.90000000,1637971499999,0.12031348,28,2036.50000000,0.05814797,0
1637971500000,0.00002854,0.00002858,0.00002854,0.00002857,7530.20000000,1637971559999,0.21510805,22,6910.10000000,0.19740082,0
1637971560000,0.00002858,0.00002859,0.00002857,0.00002858,3764.00000000,1637971619999,0.10756007,17,1536.40000000,0.04391146,0
1637971620000,0.00002857,0.00002862,0.00002855,0.00002862,42475.40000000,1637971679999,1.21439635,49,36855.50000000,1.05380435,0
1637971680000,0.00002862,0.00002863,0.00002861,0.00002863,4470.20000000,1637971739999,0.12792384,27,1597.90000000,0.04573202,0
1637971740000,0.00002863,0.00002865,0.00002863,0.00002865,8160.50000000,1637971799999,0.23366480,38,4978.00000000,0.14254743,0
"""

#: The header data.binance.vision puts on some files.
HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
    "taker_buy_volume,taker_buy_quote_volume,ignore"
)


def rows() -> list[list[str]]:
    """The ADABTC rows as lists of fields, fresh each call so tests can mutate them."""
    return [line.split(",") for line in ADABTC_1M.splitlines()]


def to_micros(fields: list[str]) -> list[str]:
    """A row as Binance writes it since 2025: open and close time in microseconds."""
    open_us = int(fields[0]) * 1000
    close_us = (int(fields[6]) + 1) * 1000 - 1  # the last microsecond of the bar
    return [str(open_us), *fields[1:6], str(close_us), *fields[7:]]


def write_csv(path: Path, table: Sequence[Sequence[str]], *, header: bool = False) -> Path:
    lines = ([HEADER] if header else []) + [",".join(fields) for fields in table]
    path.write_text("\n".join(lines) + "\n")
    return path


def candles(open_times: Sequence[int] | np.ndarray, *, close_offset: float = 0.0) -> pd.DataFrame:
    """A canonical frame of 1h bars at ``open_times`` whose close is ``100 + index + offset``."""
    times = np.asarray(open_times, dtype=np.int64)
    close = 100.0 + np.arange(len(times)) + close_offset
    frame = pd.DataFrame(
        {
            "open_time": times,
            "open": close - 0.5,
            "high": close + 1.0,
            "low": close - 1.0,
            "close": close,
            "volume": np.full(len(times), 10.0),
            "close_time": times + 3_599_999,
            "quote_volume": close * 10.0,
            "trades": np.arange(len(times), dtype=np.int64),
            "taker_buy_base": np.full(len(times), 4.0),
            "taker_buy_quote": close * 4.0,
        }
    )
    return frame.astype(dict(CANDLE_COLUMNS))
