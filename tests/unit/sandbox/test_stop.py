"""``stop`` against both sandboxes: a cancelled backtest's runners are retired, its calls
refused."""

from __future__ import annotations

import asyncio
import time

import pandas as pd
import pytest

from shared.errors import Cancelled
from shared.sandbox import Sandbox, SandboxLimits
from shared.strategy import ComponentRef
from tests.unit.sandbox.kinds import Kind
from tests.unit.sandbox.support import source

SLEEPER = """
import time
from shared.strategy import BaseStrategy

class S(BaseStrategy):
    def signals(self, df):
        time.sleep(60)
"""
LIMITS = SandboxLimits(timeout_s=120)


async def test_stop_kills_the_call_in_flight_and_refuses_later_ones(
    kind: Kind, pooled: Sandbox, short: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    code = source(SLEEPER)
    call = asyncio.create_task(
        pooled.signals(code, short, interval="1h", limits=LIMITS, session="bt-1")
    )
    while not await kind.runners():
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.0)  # the call is under way in it
    stopped_at = time.perf_counter()
    await pooled.stop("bt-1")

    with pytest.raises(Cancelled) as caught:
        await asyncio.wait_for(call, 30)
    assert time.perf_counter() - stopped_at < 10
    assert caught.value.kind == "cancelled" and "bt-1" in caught.value.message
    assert await kind.runners() == []
    with pytest.raises(Cancelled):
        await pooled.describe(code, ["BTCUSDT"], session="bt-1")


async def test_stop_removes_the_idle_runners_of_that_session_only(
    kind: Kind, pooled: Sandbox
) -> None:
    code = ComponentRef.from_json("sma_cross")
    await pooled.describe(code, ["BTCUSDT"], session="bt-1")
    await pooled.describe(code, ["BTCUSDT"], session="bt-2")
    assert len(await kind.runners()) == 2  # warm, idle

    await pooled.stop("bt-1")
    assert len(await kind.runners()) == 1
    info = await pooled.describe(code, ["BTCUSDT"], session="bt-2")  # unaffected
    assert info.units == [["BTCUSDT"]]
    await pooled.stop("never-seen")  # nothing to stop: fine
