"""A strategy that buys on every bar: with ``max_holding_bars`` 1 each position closes at the
close of the bar it opened in, so every proposal is accepted and a backtest replays two WAL
events per bar and symbol (~11k per symbol over the whole bundled sample). The crash-recovery
tests send it as uploaded ``source`` (see :func:`request`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from shared.strategy import BaseStrategy


class EveryBar(BaseStrategy):
    def signals(self, df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"signal": ["BUY"] * len(df)}, index=df.index)


def request(
    backtest_id: str,
    symbols: list[str],
    *,
    start: str = "2020-12-01",
    end: str = "2021-07-18",
    **overrides: Any,
) -> dict[str, Any]:
    """A request running :class:`EveryBar` (uploaded) over ``symbols`` (by default over the
    whole bundled sample)."""
    return {
        "id": backtest_id,
        "strategy": {"source": Path(__file__).read_text(), "class": "EveryBar"},
        "symbols": symbols,
        "interval": "1h",
        "start": start,
        "end": end,
        "max_holding_bars": 1,
        "portfolio": {
            "builtin": "fixed_fraction",
            "params": {"fraction": 0.1, "max_positions": len(symbols)},
        },
        **overrides,
    }
