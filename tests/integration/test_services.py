"""The four services on real RabbitMQ and Mongo, driven as a user drives them: publish a
request to ``backtest.requests`` with plain aio-pika, read the result from
``backtest.results``."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from tests.integration import client
from tests.integration.conftest import Reference
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


async def test_a_published_request_gives_exactly_what_stratorch_run_gives(
    stack: Stack, amqp: AbstractConnection, reference: Reference
) -> None:
    request = client.request()
    channel = await amqp.channel()
    await client.publish(channel, json.dumps(request).encode(), correlation_id=request["id"])

    # Read the durable results queue (as an operator's consumer would), skipping others.
    results = await channel.declare_queue("backtest.results.all", passive=True)
    got: dict[str, Any] | None = None
    async with asyncio.timeout(120), results.iterator() as messages:
        async for message in messages:
            await message.ack()
            body = json.loads(message.body)
            if body["backtest_id"] != request["id"]:
                continue  # an earlier test's
            assert message.content_type == "application/json"
            assert message.correlation_id == request["id"]
            assert message.headers["x-schema-version"] == 1
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            got = body
            break
    await channel.close()

    assert got is not None
    assert got["status"] == "completed", (got["errors"], stack.dump())
    assert got["cache_hit"] is False
    want = await reference(request)
    assert want["status"] == "completed"
    for field in ("metrics", "per_symbol", "trades", "equity_curve"):
        assert got[field] == want[field], field
    assert client.comparable(got) == client.comparable(want)


async def test_both_symbol_workers_take_units(
    stack: Stack, amqp: AbstractConnection, reference: Reference
) -> None:
    request = client.request(symbols=client.ALL_SYMBOLS, initial_cash=12_345)
    result = await client.backtest(amqp, json.dumps(request).encode(), backtest_id=request["id"])
    assert result["status"] == "completed", (result["errors"], stack.dump())

    by_worker: dict[int, set[str]] = {}
    for worker in stack.of("symbol_worker"):
        units = {
            r["unit_id"] for r in worker.logged("handled") if r.get("backtest_id") == request["id"]
        }
        assert all(r["pid"] == worker.pid for r in worker.logged("handled"))
        by_worker[worker.pid] = units
    assert len(by_worker) == 2
    assert all(by_worker.values()), f"a worker took no unit: {by_worker}\n{stack.dump()}"
    assert set().union(*by_worker.values()) == {f"u{i:04d}" for i in range(8)}
    assert client.comparable(result) == client.comparable(await reference(request))


async def test_the_same_request_twice_is_answered_from_the_cache(
    stack: Stack, amqp: AbstractConnection
) -> None:
    # A cash amount no other test uses, so the first run is a cache miss.
    fields = {"initial_cash": 7_777.0, "symbols": ["BTCUSDT", "LTCUSDT"]}
    first_request = client.request(**fields)
    second_request = client.request(**fields)

    first = await client.backtest(
        amqp, json.dumps(first_request).encode(), backtest_id=first_request["id"]
    )
    started = time.perf_counter()
    second = await client.backtest(
        amqp, json.dumps(second_request).encode(), backtest_id=second_request["id"]
    )
    cached_s = time.perf_counter() - started

    assert first["status"] == "completed" and first["cache_hit"] is False
    assert second["status"] == "completed" and second["cache_hit"] is True
    assert second["backtest_id"] == second_request["id"]
    assert second["metrics"] == first["metrics"]
    assert second["trades"] == first["trades"]
    assert client.comparable(second) == client.comparable(first)
    print(f"\ncache hit answered in {cached_s * 1000:.0f} ms")


BACKWARDS = client.request(start="2021-06-01", end="2021-01-01")


@pytest.mark.parametrize(
    ("body", "backtest_id", "words"),
    [
        # No readable id: the result goes out under the message's correlation id.
        (b'{"strategy": "sma_cross", "symbols": [BTCUSDT', "bad-json-1", ["JSON"]),
        (json.dumps(BACKWARDS).encode(), BACKWARDS["id"], ["end", "after", "start"]),
    ],
    ids=["invalid-json", "end-before-start"],
)
async def test_a_malformed_request_comes_back_rejected_and_nothing_is_lost(
    stack: Stack, amqp: AbstractConnection, body: bytes, backtest_id: str, words: list[str]
) -> None:
    result = await client.backtest(amqp, body, backtest_id=backtest_id, timeout_s=60)

    assert result["backtest_id"] == backtest_id
    assert result["status"] == "rejected"
    [error] = result["errors"]
    assert error["kind"] == "rejected"
    for word in words:
        assert word in error["message"], error["message"]
    channel = await amqp.channel()
    try:
        # Acked (not left on the queue) and not dead-lettered.
        for name in ("backtest.requests", "backtest.dead"):
            queue = await channel.declare_queue(name, passive=True)
            assert queue.declaration_result.message_count == 0, name
    finally:
        await channel.close()
