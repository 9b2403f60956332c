"""Fixtures of the sandbox tests: the bundled real candles and a sandbox closed afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pandas as pd
import pytest

from shared.candles.frame import validate_frame
from shared.sandbox import ProcessSandbox
from tests.unit.sandbox.support import SAMPLE


@pytest.fixture(scope="session")
def btc() -> pd.DataFrame:
    frame = pd.read_parquet(SAMPLE)
    validate_frame(frame)
    return frame


@pytest.fixture
def short(btc: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, int]]:
    """300 bars of BTCUSDT, the first 10 of them warm-up."""
    return {"BTCUSDT": (btc.iloc[:300].reset_index(drop=True), 10)}


@pytest.fixture
async def sandbox() -> AsyncIterator[ProcessSandbox]:
    async with ProcessSandbox() as sandbox:
        yield sandbox
