"""Many backtests at once through the gateway: all complete, each exactly as ``stratorch run``
gives it, and nothing is left in any queue.

Sized for CI on the tests' Mongo server (FerretDB scans a collection per candle query): 16
backtests on the session's two symbol workers take a few minutes. ``benchmarks/load.py`` runs
the full 200 and prints the timings.
"""

from __future__ import annotations

import json

import pytest

from shared import topology
from tests.integration import client, load
from tests.integration.conftest import Reference
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

BACKTESTS = 16
PROCESS_SANDBOX = "shared.sandbox.process"


@pytest.mark.timeout(1200)
async def test_many_backtests_at_once_all_complete_as_stratorch_run_and_leave_no_message(
    stack: Stack, amqp_url: str, reference: Reference
) -> None:
    assert stack.gateway_url is not None
    batch = load.requests(BACKTESTS)

    ids = await load.submit(stack.gateway_url, batch)
    results = await load.collect(amqp_url, ids, timeout_s=900)

    assert ids == [r["id"] for r in batch]
    for request in batch:
        got = results[request["id"]]
        assert got["status"] == "completed", (got["errors"], stack.dump())
        assert got["cache_hit"] is False
        assert client.comparable(got) == client.comparable(await reference(request))
    depths = load.settled_queues(amqp_url)
    assert set(depths) >= {"backtest.requests", "backtest.work", "backtest.results.all"}
    # Each backtest's deadline timer (these and the session's earlier ones) waits out its
    # hold whatever became of the backtest; when due it finds the backtest ended and is
    # dropped. Nothing else may be left anywhere.
    rest = {q: d for q, d in depths.items() if not q.startswith(f"{topology.TIMERS}.")}
    assert all(depth == (0, 0) for depth in rest.values()), rest


def test_every_line_the_services_write_is_one_json_object(stack: Stack) -> None:
    """Their own lines, aio-pika's, uvicorn's and the process sandbox's warning alike."""
    for service in stack.services:
        for line in service.text().splitlines():
            assert isinstance(json.loads(line), dict), f"{service.name}: {line}"
    [warning, *_] = [
        r for r in stack.of("symbol_worker")[0].records() if r.get("logger") == PROCESS_SANDBOX
    ]
    assert warning["level"] == "warning" and "NOT a security boundary" in warning["event"]
