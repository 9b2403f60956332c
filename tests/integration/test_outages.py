"""Servers going away during a backtest: the Mongo wire-protocol server (a private one: the
shared server is everybody's) and RabbitMQ (this test's vhost's connections closed, and a
private node really restarted)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from shared import mongo
from shared.mongo import MongoStore
from tests.integration import client
from tests.integration.conftest import WINDOW, Reference, make_stack, unavailable
from tests.integration.stack import (
    PrivateMongo,
    PrivateRabbit,
    Servers,
    ServersUnavailable,
    Stack,
    load_sample,
)


def close_connections(amqp_url: str) -> None:
    """What every client of the vhost sees when RabbitMQ restarts: its connection closed by
    the broker. (Per vhost: the broker itself is shared with other tests.)"""
    vhost = unquote(urlsplit(amqp_url).path[1:])
    subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "broker restart (test)"],
        check=True,
        timeout=60,
    )


pytestmark = pytest.mark.integration

DB = "stratorch_outage"


@pytest.fixture
def private_mongo(tmp_path: Path, servers: Servers) -> Iterator[PrivateMongo]:
    server = PrivateMongo(tmp_path / "ferretdb")
    try:
        server.start()
    except ServersUnavailable as exc:
        unavailable(str(exc))
    yield server
    server.kill()


@pytest.fixture
def private_rabbit(servers: Servers) -> Iterator[PrivateRabbit]:
    try:
        node = PrivateRabbit()
        node.start()
    except ServersUnavailable as exc:
        unavailable(str(exc))
    yield node
    node.remove()


@pytest.fixture
async def channel(fresh_amqp_url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(fresh_amqp_url)
    async with connection:
        yield await connection.channel()


async def start_stack(
    amqp_url: str, server: PrivateMongo, log_dir: Path, symbols: list[str], **env: str
) -> Stack:
    """scheduler, one symbol worker (one unit at a time), portfolio_sim on ``server``."""
    await load_sample(server.url, DB, symbols, **WINDOW)
    url = server.url
    stack = Stack.configure(
        amqp_url=amqp_url, mongo_url=url, candles_mongo_url=url, db=DB, log_dir=log_dir
    )
    stack.start("scheduler", **env)
    stack.start("symbol_worker", STRATORCH_CONCURRENCY="1", **env)
    stack.start("portfolio_sim", **env)
    try:
        await asyncio.to_thread(stack.wait_ready)
    except BaseException:
        stack.stop()
        raise
    return stack


async def submit(
    channel: AbstractChannel, request: dict[str, Any]
) -> tuple[AbstractQueue, AbstractQueue]:
    """Listen to the backtest's result and events, publish it, wait until it is planned."""
    results = await client.listen(channel, request["id"])
    events = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await events.bind("backtest.events", routing_key=request["id"])
    await client.publish(channel, json.dumps(request).encode(), correlation_id=request["id"])
    planned = await client.next_body(events, timeout_s=180)
    assert planned["type"] == "planned", planned
    return results, events


async def message_count(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def test_a_mongo_outage_of_10_s_mid_backtest_is_ridden_out(
    fresh_amqp_url: str,
    private_mongo: PrivateMongo,
    channel: AbstractChannel,
    reference: Reference,
    tmp_path: Path,
) -> None:
    request = client.request(symbols=client.ALL_SYMBOLS, initial_cash=11_111)
    stack = await start_stack(fresh_amqp_url, private_mongo, tmp_path / "logs", client.ALL_SYMBOLS)
    try:
        results, _ = await submit(channel, request)
        private_mongo.kill()
        await asyncio.sleep(10)
        private_mongo.start()
        back = time.monotonic()
        result = await client.next_body(results, timeout_s=180)
        recovered_s = time.monotonic() - back

        assert result["status"] == "completed", (result["errors"], stack.dump())
        assert client.comparable(result) == client.comparable(await reference(request))
        retried = [r for s in stack.services for r in s.logged("server unavailable; retrying")]
        assert retried, "the outage did not hit the backtest"
        for queue in ("backtest.dead", "backtest.work", "backtest.proposals"):
            assert await message_count(channel, queue) == 0, queue
        print(f"\nmongo outage 10 s: result {recovered_s:.1f} s after the server was back")
    finally:
        stack.stop()


async def test_a_mongo_outage_past_the_limit_fails_the_backtest_clearly(
    fresh_amqp_url: str, private_mongo: PrivateMongo, channel: AbstractChannel, tmp_path: Path
) -> None:
    symbols = ["BTCUSDT", "ETHUSDT"]
    request = client.request(symbols=symbols, initial_cash=22_222)
    stack = await start_stack(
        fresh_amqp_url, private_mongo, tmp_path / "logs", symbols, STRATORCH_OUTAGE_LIMIT_S="4"
    )
    try:
        results, _ = await submit(channel, request)
        private_mongo.kill()
        down = time.monotonic()
        result = await client.next_body(results, timeout_s=120)
        failed_s = time.monotonic() - down

        assert result["status"] == "failed", stack.dump()
        assert result["metrics"] is None and result["trades"] == []
        [error] = result["errors"]
        assert error["kind"] == "unavailable"
        assert error["unit_id"] in ("u0000", "u0001")
        assert "STRATORCH_OUTAGE_LIMIT_S=4" in error["message"]
        assert "could not be stored" in error["message"]  # the store was down too

        # The server comes back: the failure may be stored (if a dead letter of the backtest
        # is still being handled), a half-finished result never is.
        private_mongo.start()
        client_ = await mongo.connect(private_mongo.url)
        try:
            store = MongoStore(client_[DB])
            deadline = time.monotonic() + 15
            while (stored := await store.get_result(request["id"])) is None:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            if stored is not None:
                assert stored.status == "failed" and stored.errors[0].kind == "unavailable"
            assert await store.units_done(request["id"]) < len(symbols)
        finally:
            await client_.close()
        dead = await channel.declare_queue("backtest.dead", passive=True)
        letter = await dead.get(timeout=10)
        assert letter is not None and letter.headers["x-stratorch-kind"] == "unavailable"
        assert letter.headers["x-stratorch-queue"] == "backtest.work"
        print(f"\nmongo outage past a 4 s limit: failed result {failed_s:.1f} s after it began")
    finally:
        stack.stop()


#: ``sma_cross`` taking a second over each unit's signals.
UNHURRIED = """
import time
from shared.strategy.builtins import SmaCross

class Unhurried(SmaCross):
    def signals(self, df):
        time.sleep(1.0)
        return super().signals(df)
"""


async def through_the_gateway(
    stack: Stack, request: dict[str, Any], disrupt: Callable[[], None], *, timeout_s: float
) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """Run ``request`` on a stack of one symbol worker, following its events from the gateway;
    at the first ``unit_done``, ``disrupt`` the broker (in a thread). The events, the final
    status, and the seconds from the end of the disruption to the end of the event stream.

    :param timeout_s: the longest the event stream may stay silent."""
    stack.start("scheduler")
    stack.start("symbol_worker", STRATORCH_CONCURRENCY="1")
    stack.start("portfolio_sim")
    stack.start_gateway()
    await asyncio.to_thread(stack.wait_ready)
    async with httpx.AsyncClient(base_url=stack.gateway_url or "", trust_env=False) as http:
        accepted = (await http.post("/backtests", json=request, timeout=30)).json()
        events: list[dict[str, Any]] = []
        disrupted_at = 0.0
        async with http.stream("GET", accepted["events_url"], timeout=timeout_s) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                events.append(json.loads(line.partition(":")[2]))
                if events[-1]["type"] == "unit_done" and not disrupted_at:
                    await asyncio.to_thread(disrupt)
                    disrupted_at = time.monotonic()
        assert disrupted_at, f"no unit_done event: {events}"
        recovered_s = time.monotonic() - disrupted_at
        status = (await http.get(accepted["status_url"], timeout=30)).json()
    return events, status, recovered_s


async def test_the_broker_going_away_mid_backtest_and_mid_event_stream_is_ridden_out(
    servers: Servers, fresh_amqp_url: str, mongo_db: str, reference: Reference, tmp_path: Path
) -> None:
    stack = make_stack(servers, fresh_amqp_url, mongo_db, tmp_path)
    # Units of a second or more each, one at a time: the backtest is still running when the
    # broker's connections close at the first unit_done, and so is the event stream.
    strategy = {
        "source": UNHURRIED,
        "class": "Unhurried",
        "params": client.REQUEST["strategy"]["params"],
    }
    request = client.request(symbols=client.ALL_SYMBOLS, initial_cash=33_333, strategy=strategy)
    try:
        events, status, recovered_s = await through_the_gateway(
            stack, request, lambda: close_connections(fresh_amqp_url), timeout_s=180
        )

        assert events[-1]["type"] == "finished", events
        assert events[-1]["status"] == "completed", stack.dump()
        result = status["result"]
        assert result["status"] == "completed"
        assert client.comparable(result) == client.comparable(await reference(request))
        [gateway] = stack.of("gateway")
        assert gateway.logged("event stream lost its queue; subscribing again"), gateway.text()
        lost = [s.name for s in stack.services if s.logged("broker connection lost; reconnecting")]
        assert sorted(lost) == sorted(s.name for s in stack.services), lost
        print(f"\nbroker connections closed: backtest finished {recovered_s:.1f} s later")
    finally:
        stack.stop()


async def test_a_rabbitmq_restart_mid_backtest_is_ridden_out(
    servers: Servers,
    private_rabbit: PrivateRabbit,
    mongo_db: str,
    reference: Reference,
    tmp_path: Path,
) -> None:
    """The broker stopped (as ``systemctl stop`` does) after the first unit is done and
    started again a few seconds later, on its own data: every service reconnects, the
    durable queues kept the units and batches, the event stream resumes, and the result is
    ``stratorch run``'s."""

    def restart() -> None:
        private_rabbit.shutdown()
        time.sleep(3)  # down for a while, as a restart is
        private_rabbit.start()

    stack = make_stack(servers, private_rabbit.url, mongo_db, tmp_path)
    request = client.request(symbols=client.ALL_SYMBOLS, initial_cash=44_444)
    try:
        events, status, recovered_s = await through_the_gateway(
            stack, request, restart, timeout_s=300
        )

        assert events[-1]["type"] == "finished", events
        result = status["result"]
        assert result["status"] == "completed", stack.dump()
        assert client.comparable(result) == client.comparable(await reference(request))
        lost = [s.name for s in stack.services if s.logged("broker connection lost; reconnecting")]
        assert sorted(lost) == sorted(s.name for s in stack.services), lost
        print(f"\nRabbitMQ restarted: backtest finished {recovered_s:.1f} s after it was back")
    finally:
        stack.stop()
