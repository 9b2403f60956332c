"""An importable strategy module for the loader's `{"module": ..., "class": ...}` form."""

from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd

from shared.strategy import BaseStrategy


class AlwaysBuy(BaseStrategy):
    """BUY on every bar, at a fixed distance from the close."""

    params: ClassVar[dict[str, Any]] = {"distance": 0.01}

    def decide(self, df: pd.DataFrame, interval: str, **kw: Any) -> dict[str, Any] | None:
        close = float(df["close"].iloc[-1])
        d = self.params["distance"]
        return {"signal": "BUY", "tp_price": close * (1 + d), "sl_price": close * (1 - d)}


def equal_weight(symbols: list[str]) -> dict[str, float]:
    """A plain function: the loader returns it as it is."""
    return {s: 1 / len(symbols) for s in symbols}
