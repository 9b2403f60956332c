"""A sweep on the real stack (two symbol workers) ranks as ``stratorch run`` ranks it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractConnection

from tests.integration import client
from tests.integration.conftest import Reference
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

GRID = {"fast": [5, 10], "slow": [30, 50], "sl_pct": [0.015, 0.03]}


async def test_a_sweep_on_the_stack_ranks_as_stratorch_run_does(
    stack: Stack, amqp: AbstractConnection, reference: Reference
) -> None:
    request = client.request(symbols=["BTCUSDT", "ETHUSDT"], sweep={"grid": GRID})
    channel = await amqp.channel()
    events = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await events.bind("backtest.events", routing_key=request["id"])
    result = await client.backtest(
        amqp, json.dumps(request).encode(), backtest_id=request["id"], timeout_s=300
    )
    assert result["status"] == "completed", (result["errors"], stack.dump())

    want = await reference(request)
    ranking = result["sweep"]["ranking"]
    assert [r["params"] for r in ranking] == [r["params"] for r in want["sweep"]["ranking"]]
    assert ranking == want["sweep"]["ranking"]  # every combination's metrics, bit for bit
    assert client.comparable(result) == client.comparable(want)

    # Progress is counted in combinations, up to all eight, then the sweep's finished event.
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(30), events.iterator() as messages:
        async for message in messages:
            await message.ack()
            seen.append(json.loads(message.body))
            if seen[-1]["type"] == "finished":
                break
    assert seen[0] == {**seen[0], "type": "planned", "unit_count": 8}
    ended = [e for e in seen if e["type"] == "unit_done"]
    assert sorted(e["unit_id"] for e in ended) == [f"{request['id']}:c{i:04d}" for i in range(8)]
    # Two combinations ending at once may both count the other (2, 2 rather than 1, 2): the
    # counts as published only reach all eight; followers show the largest seen.
    assert max(e["units_done"] for e in ended) == 8
    assert seen[-1]["status"] == "completed"
    await channel.close()

    # The gateway's status of the sweep counts combinations too.
    assert stack.gateway_url is not None
    async with httpx.AsyncClient(base_url=stack.gateway_url, trust_env=False) as http:
        status = (await http.get(f"/backtests/{request['id']}", timeout=30)).json()
    assert status["status"] == "completed"
    assert status["progress"] == {"units_done": 8, "unit_count": 8}
    assert status["result"]["sweep"]["ranking"] == ranking
