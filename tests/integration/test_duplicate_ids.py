"""Ids on the running stack: two different requests with one id never mix, and an event
stream's queue goes when its client does."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from aio_pika.abc import AbstractConnection, AbstractQueue

from shared import mongo
from tests.integration import client
from tests.integration.conftest import Reference
from tests.integration.stack import Servers, Stack

pytestmark = pytest.mark.integration


async def drain(queue: AbstractQueue, *, until: float) -> list[tuple[str, dict[str, Any]]]:
    """(routing key, body) of every message that reaches ``queue`` before ``until``."""
    got: list[tuple[str, dict[str, Any]]] = []
    while time.monotonic() < until:
        message = await queue.get(fail=False)
        if message is None:
            await asyncio.sleep(0.2)
            continue
        await message.ack()
        got.append((message.routing_key or "", json.loads(message.body)))
    return got


async def test_two_different_requests_with_one_id_never_mix(
    stack: Stack, amqp: AbstractConnection, reference: Reference
) -> None:
    # Same unit ids (u0000, u0001), other symbols: mixed batches would show in the result.
    first = client.request(symbols=["BTCUSDT", "ETHUSDT"])
    second = {**first, "symbols": ["SOLUSDT", "ADAUSDT"]}
    backtest_id = first["id"]
    channel = await amqp.channel()
    inbox = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await inbox.bind("backtest.results", routing_key=backtest_id)
    await inbox.bind("backtest.results", routing_key=f"duplicate/{backtest_id}")
    await asyncio.gather(
        *(
            client.publish(channel, json.dumps(r).encode(), correlation_id=backtest_id)
            for r in (first, second)
        )
    )

    got: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + 180
    while len({key for key, _ in got}) < 2 and time.monotonic() < deadline:
        got += await drain(inbox, until=time.monotonic() + 1)
    got += await drain(inbox, until=time.monotonic() + 3)  # anything published twice
    await channel.close()

    results = [body for key, body in got if key == backtest_id]
    refusals = [body for key, body in got if key == f"duplicate/{backtest_id}"]
    assert results and refusals, (got, stack.dump())
    assert all(r == results[0] for r in results)
    result = results[0]
    assert result["status"] == "completed", result["errors"]
    owner = first if sorted(result["per_symbol"]) == sorted(first["symbols"]) else second
    assert sorted(result["per_symbol"]) == sorted(owner["symbols"])  # one request's batches
    assert client.comparable(result) == client.comparable(await reference(owner))
    for refusal in refusals:
        assert refusal["status"] == "rejected" and refusal["backtest_id"] == backtest_id
        assert "is the id of another request" in refusal["errors"][0]["message"]


def temporary_queues(amqp_url: str) -> set[str]:
    vhost = unquote(urlsplit(amqp_url).path[1:])
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {name for name in out.stdout.split() if name.startswith("amq.gen-")}


async def test_an_event_stream_queue_goes_when_its_client_does(
    stack: Stack, servers: Servers, mongo_db: str, amqp_url: str
) -> None:
    # A backtest that stays queued: accepted, never published.
    backtest_id = client.request()["id"]
    connection = await mongo.connect(servers.mongo_url)
    try:
        store = mongo.MongoStore(connection[mongo_db])
        await store.accept(backtest_id, "0" * 64, tenant="anonymous")
    finally:
        await connection.close()
    before = await asyncio.to_thread(temporary_queues, amqp_url)

    assert stack.gateway_url is not None
    async with (
        httpx.AsyncClient(base_url=stack.gateway_url, timeout=30, trust_env=False) as http,
        http.stream("GET", f"/backtests/{backtest_id}/events") as response,
    ):
        assert response.status_code == 200
        during = await asyncio.to_thread(temporary_queues, amqp_url)
        assert len(during - before) == 1  # the stream's own queue
    # The client is gone: its queue must go too, promptly.
    closed = time.monotonic()
    deadline = closed + 10
    while (left := await asyncio.to_thread(temporary_queues, amqp_url) & during - before) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.5)
    assert not left, f"the stream's queue {left} outlived its client by 10 s"
    print(f"\nthe stream's queue was gone {time.monotonic() - closed:.1f} s after its client")
