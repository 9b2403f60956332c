"""``ProcessSandbox.stop``: a cancelled backtest's children are killed, its calls refused."""

from __future__ import annotations

import asyncio
import time

import pandas as pd
import pytest

from shared.errors import Cancelled
from shared.sandbox import ProcessSandbox, SandboxLimits
from shared.strategy import ComponentRef
from tests.unit.sandbox.support import runners, source

SLEEPER = """
import time
from shared.strategy import BaseStrategy

class S(BaseStrategy):
    def signals(self, df):
        time.sleep(60)
"""
LIMITS = SandboxLimits(timeout_s=120)


async def test_stop_kills_the_call_in_flight_and_refuses_later_ones(
    sandbox: ProcessSandbox, short: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    code = source(SLEEPER)
    call = asyncio.create_task(
        sandbox.signals(code, short, interval="1h", limits=LIMITS, session="bt-1")
    )
    while not runners():
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # the call is under way in it
    stopped_at = time.perf_counter()
    await sandbox.stop("bt-1")

    with pytest.raises(Cancelled) as caught:
        await asyncio.wait_for(call, 10)
    assert time.perf_counter() - stopped_at < 5
    assert caught.value.kind == "cancelled" and "bt-1" in caught.value.message
    assert runners() == []
    with pytest.raises(Cancelled):
        await sandbox.describe(code, ["BTCUSDT"], session="bt-1")


async def test_stop_removes_the_idle_children_of_that_session_only(sandbox: ProcessSandbox) -> None:
    code = ComponentRef.from_json("sma_cross")
    await sandbox.describe(code, ["BTCUSDT"], session="bt-1")
    await sandbox.describe(code, ["BTCUSDT"], session="bt-2")
    assert len(runners()) == 2  # warm, idle

    await sandbox.stop("bt-1")
    assert len(runners()) == 1
    info = await sandbox.describe(code, ["BTCUSDT"], session="bt-2")  # unaffected
    assert info.units == [["BTCUSDT"]]
    await sandbox.stop("never-seen")  # nothing to stop: fine
