"""The scheduler's id rule: the first request with an id owns it; another request with that id
is answered on its own routing key and can neither end nor join the owner's backtest."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.scheduler.handler import handle
from shared import topology
from shared.candles import ParquetCandleStore
from shared.messages import BacktestResult, WorkUnit
from shared.ports import Ports
from shared.sandbox.process import ProcessSandbox
from shared.store import FileStore
from stratorch.paths import SAMPLE_STORE

REQUEST: dict[str, Any] = {
    "id": "owned",
    "strategy": {"builtin": "sma_cross"},
    "symbols": ["BTCUSDT", "ETHUSDT"],
    "interval": "1h",
    "start": "2021-01-01",
    "end": "2021-01-15",
}


@pytest.fixture
async def ports(tmp_path: Path) -> AsyncIterator[Ports]:
    async with ProcessSandbox() as sandbox:
        yield Ports(ParquetCandleStore(SAMPLE_STORE), sandbox, FileStore(tmp_path))


def raw(**overrides: Any) -> bytes:
    return json.dumps({**REQUEST, **overrides}).encode()


async def test_another_request_with_a_taken_id_never_touches_the_owner(ports: Ports) -> None:
    owner = await handle(raw(), ports, correlation_id="owned")
    units = [o.message for o in owner if o.exchange == topology.WORK]
    assert [u.symbols for u in units if isinstance(u, WorkUnit)] == [["BTCUSDT"], ["ETHUSDT"]]
    plan = await ports.store.get_plan("owned")

    for other in (raw(symbols=["SOLUSDT"]), raw(symbols="not a list"), b"{oops"):
        [answer] = await handle(other, ports, correlation_id="owned")
        assert answer.exchange == topology.RESULTS
        assert answer.routing_key == "duplicate/owned"  # not "owned": the owner's listeners
        assert isinstance(answer.message, BacktestResult)
        assert answer.message.status == "rejected" and answer.message.backtest_id == "owned"
        assert "'owned' is the id of another request" in answer.message.errors[0].message

    # Nothing of the others was stored: the owner is still running, with its own plan.
    assert await ports.store.get_result("owned") is None
    assert await ports.store.get_plan("owned") == plan


async def test_the_same_request_again_gets_the_outcome_that_stands(ports: Ports) -> None:
    first = await handle(raw(strategy={"builtin": "nope"}), ports)
    [result, _finished] = first
    assert isinstance(result.message, BacktestResult) and result.message.status == "rejected"
    again = await handle(raw(strategy={"builtin": "nope"}), ports)
    assert [(o.exchange, o.routing_key, o.message) for o in again] == [
        (o.exchange, o.routing_key, o.message) for o in first
    ]


async def test_a_request_without_id_takes_its_messages_correlation_id(ports: Ports) -> None:
    body = {k: v for k, v in REQUEST.items() if k != "id"}
    out = await handle(json.dumps(body).encode(), ports, correlation_id="from-message")
    assert {o.backtest_id for o in out} == {"from-message"}
