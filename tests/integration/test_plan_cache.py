"""Planning on the real state store (the Mongo wire-protocol server): a request planned before
is planned again, or answered from the result cache, without starting a sandbox."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from services.scheduler import handler as scheduler
from shared import mongo, topology
from shared.candles import ParquetCandleStore
from shared.messages import BacktestResult, WorkUnit
from shared.ports import Ports
from shared.sandbox.port import StrategyInfo
from shared.sandbox.process import ProcessSandbox
from stratorch.paths import SAMPLE_STORE
from tests.integration import client
from tests.integration.mongo_fixtures import fresh_db, fresh_db_name, mongo_server_url

__all__ = ["fresh_db", "fresh_db_name", "mongo_server_url"]  # fixtures, used by name

pytestmark = pytest.mark.integration

Db = AsyncDatabase[dict[str, Any]]
SYMBOLS = ["BTCUSDT", "ETHUSDT"]


class CountingSandbox(ProcessSandbox):
    """The process sandbox, counting the strategies it was asked to describe."""

    described = 0

    async def describe(self, *args: Any, **kwargs: Any) -> StrategyInfo:
        self.described += 1
        return await super().describe(*args, **kwargs)


@pytest.fixture
async def ports(fresh_db: Db, mongo_server_url: str) -> AsyncIterator[Ports]:
    """The scheduler's ports on the real store, a month of the sample's bars in Mongo."""
    sample = ParquetCandleStore(SAMPLE_STORE)
    for symbol in SYMBOLS:
        bars = sample.read(symbol, "1h", start_ms=1_619_395_200_000, end_ms=1_622_505_600_000)
        await mongo.write_candles(fresh_db, symbol, "1h", bars)
    async with (
        CountingSandbox() as sandbox,
        mongo.MongoCandleSource(mongo_server_url, fresh_db.name) as candles,
    ):
        yield Ports(candles, sandbox, mongo.MongoStore(fresh_db))


async def plan(request: dict[str, Any], ports: Ports) -> list[Any]:
    out = await scheduler.handle(json.dumps(request).encode(), ports)
    return [o.message for o in out]


def units(messages: list[Any]) -> list[tuple[str, list[str], int]]:
    return [(m.unit_id, m.symbols, m.lookback) for m in messages if isinstance(m, WorkUnit)]


async def test_a_request_described_before_is_planned_without_a_sandbox(ports: Ports) -> None:
    sandbox = ports.sandbox
    assert isinstance(sandbox, CountingSandbox)
    first = await plan(client.request(symbols=SYMBOLS), ports)
    assert sandbox.described == 1
    assert len(units(first)) == 2

    # The same strategy and symbols again, other cash: planned from the stored description.
    again = await plan(client.request(symbols=SYMBOLS, initial_cash=5_000), ports)
    assert sandbox.described == 1
    assert units(again) == units(first)

    # Other params (another lookback) are another description: the sandbox is asked.
    strategy = {"builtin": "sma_cross", "params": {"fast": 5, "slow": 20}}
    other = await plan(client.request(symbols=SYMBOLS, strategy=strategy), ports)
    assert sandbox.described == 2
    assert {lookback for *_, lookback in units(other)} == {21}


async def test_a_cached_result_is_answered_without_a_sandbox(ports: Ports) -> None:
    sandbox = ports.sandbox
    assert isinstance(sandbox, CountingSandbox)
    first_request = client.request(symbols=SYMBOLS, initial_cash=4_321)
    await plan(first_request, ports)
    stored_plan = await ports.store.get_plan(first_request["id"])
    assert stored_plan is not None
    done = BacktestResult(backtest_id=first_request["id"], status="completed")
    await ports.store.put_cached(stored_plan.cache_key, done)
    assert sandbox.described == 1

    second_request = client.request(symbols=SYMBOLS, initial_cash=4_321)
    out = await scheduler.handle(json.dumps(second_request).encode(), ports)

    [answer] = [o for o in out if o.exchange == topology.RESULTS]
    assert answer.message.backtest_id == second_request["id"]
    assert answer.message.cache_hit is True
    assert not [o for o in out if o.exchange == topology.WORK]
    assert sandbox.described == 1
    assert await ports.store.get_result(second_request["id"]) == answer.message
