"""The ports a handler is given: everything it reads or writes outside its own message.

Each has two implementations (see DESIGN.md "Ports"): the real stack's (MongoDB, Docker)
and the embedded default's (Parquet files, a subprocess, local files). Handlers only see
these protocols, so the same handler runs in ``stratorch run``, in the services and in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pandas as pd

from shared.candles.frame import Span
from shared.sandbox.port import Sandbox
from shared.store import Store


class CandleSource(Protocol):
    async def load(self, symbol: str, window: Span) -> pd.DataFrame:
        """``symbol``'s bars in ``window``, warm-up first (the canonical candle frame); raises
        :class:`shared.errors.NoDataError` when there are none."""
        ...

    async def fingerprint(self, symbol: str, window: Span) -> str:
        """Identifies the bars :meth:`load` would return (``"no_data"`` if none); it changes
        when they do. Part of the result cache key."""
        ...


@dataclass(frozen=True)
class Ports:
    candles: CandleSource
    sandbox: Sandbox
    store: Store
