"""A strategy that takes its time (``params["seconds"]``) and never trades: a unit that is
reliably still running when a test stops its worker. Loaded by module name in the sandbox."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import pandas as pd

from shared.strategy import BaseStrategy


class Sleepy(BaseStrategy):
    params: ClassVar[dict[str, Any]] = {"seconds": 3.0}

    def signals(self, df: pd.DataFrame) -> pd.DataFrame:
        time.sleep(float(self.params["seconds"]))
        return pd.DataFrame({"signal": [None] * len(df)}, index=df.index)
