"""Bad messages on every queue, on the real broker and Mongo: each is dead-lettered once with
its reason (never retried five times), and its backtest ends ``failed`` naming the unit."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from tests.integration import client
from tests.integration.conftest import make_stack
from tests.integration.stack import Servers, Stack, create_vhost, delete_vhost
from tests.integration.test_shutdown import sleepy_unit

pytestmark = pytest.mark.integration

WORK = "backtest.work"
PROPOSALS = "backtest.proposals"
DEAD = "backtest.dead"


@pytest.fixture(scope="module")
def poison_stack(
    servers: Servers, mongo_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    """A symbol worker and portfolio_sim on a vhost of this module's own (its dead letters
    are these tests' alone)."""
    name, url = create_vhost(servers.amqp_url)
    stack = make_stack(servers, url, mongo_db, tmp_path_factory.mktemp("poison-logs"))
    stack.start("symbol_worker", STRATORCH_CONCURRENCY="1")
    stack.start("portfolio_sim")
    try:
        stack.wait_ready()
        yield stack, url
    finally:
        stack.stop()
        delete_vhost(name)


@pytest.fixture
async def channel(poison_stack: tuple[Stack, str]) -> AsyncIterator[AbstractChannel]:
    connection: AbstractConnection = await aio_pika.connect(poison_stack[1])
    async with connection:
        yield await connection.channel()


async def publish(channel: AbstractChannel, queue: str, body: bytes, backtest_id: str) -> None:
    """Publish as a (buggy) service would: the queue's direct exchange and routing key."""
    await client.publish(
        channel, body, correlation_id=backtest_id, exchange_name=queue, routing_key=queue
    )


async def dead_letter(channel: AbstractChannel, backtest_id: str) -> aio_pika.IncomingMessage:
    """The dead letter of ``backtest_id`` in the operators' queue (others are left there)."""
    queue = await channel.declare_queue(DEAD, passive=True)
    async with asyncio.timeout(60):
        while True:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.2)
                continue
            if message.correlation_id == backtest_id:
                await message.ack()
                return message  # type: ignore[return-value]
            await message.nack(requeue=True)
            await asyncio.sleep(0.05)


def unit(backtest_id: str, unit_id: str = "u0001") -> dict[str, Any]:
    body: dict[str, Any] = json.loads(sleepy_unit(backtest_id, 0).model_dump_json(by_alias=True))
    return {**body, "unit_id": unit_id, "unit_count": 2}


def batch(backtest_id: str, unit_id: str = "u0001", unit_count: int = 2) -> dict[str, Any]:
    return {
        "backtest_id": backtest_id,
        "unit_id": unit_id,
        "unit_count": unit_count,
        "symbols": ["BTCUSDT"],
    }


CASES = {
    "work-not-json": (WORK, lambda i: b'{"unit_id": "u0001", "backtest_id": ' + i.encode()),
    "work-invalid": (WORK, lambda i: json.dumps({**unit(i), "timeout_s": "soon"}).encode()),
    "proposals-not-json": (PROPOSALS, lambda i: b'{"unit_id": "u0001"; nope'),
    "proposals-invalid": (PROPOSALS, lambda i: json.dumps({**batch(i), "extra": 1}).encode()),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_bad_message_is_dead_lettered_once_and_fails_its_backtest(
    poison_stack: tuple[Stack, str], channel: AbstractChannel, case: str
) -> None:
    stack, _ = poison_stack
    queue, make = CASES[case]
    backtest_id = f"poison-{uuid.uuid4().hex[:12]}"
    results = await client.listen(channel, backtest_id)
    # The backtest's other unit is fine and arrives first: it waits for the bad one.
    await publish(channel, WORK, json.dumps(unit(backtest_id, "u0000")).encode(), backtest_id)
    await publish(channel, queue, make(backtest_id), backtest_id)

    result = await client.next_body(results, timeout_s=90)
    dead = await dead_letter(channel, backtest_id)

    assert result["status"] == "failed", stack.dump()
    [error] = result["errors"]
    assert error["kind"] == "internal"
    assert error["unit_id"] == "u0001"
    assert f"dead-lettered from {queue}" in error["message"]
    reason = dead.headers["x-stratorch-reason"]
    assert isinstance(reason, str) and reason in error["message"]
    word = "ProposalBatch" if queue == PROPOSALS else "WorkUnit"
    assert f"not a valid {word}" in reason
    assert dead.headers["x-stratorch-queue"] == queue
    assert dead.headers["x-stratorch-kind"] == "internal"
    assert "x-delivery-count" not in dead.headers, "it was delivered more than once"
    assert dead.body == make(backtest_id)


async def test_a_unit_whose_handler_keeps_failing_fails_its_backtest_after_the_limit(
    poison_stack: tuple[Stack, str], channel: AbstractChannel
) -> None:
    stack, _ = poison_stack
    backtest_id = f"failing-{uuid.uuid4().hex[:12]}"
    results = await client.listen(channel, backtest_id)
    # A unit naming uploaded code the store does not have (say, deleted): not the user's
    # doing, and it fails the same way on every delivery.
    missing = "0" * 64
    body = {
        **unit(backtest_id, "u0000"),
        "unit_count": 1,
        "strategy": {"source_sha256": missing, "class": "S", "params": {}},
    }
    await publish(channel, WORK, json.dumps(body).encode(), backtest_id)

    # Six deliveries, each loading candles first: 5-10 s apiece on a busy test server.
    result = await client.next_body(results, timeout_s=300)
    dead = await dead_letter(channel, backtest_id)

    assert result["status"] == "failed", stack.dump()
    [error] = result["errors"]
    assert error["unit_id"] == "u0000" and error["kind"] == "internal"
    reason = dead.headers["x-stratorch-reason"]
    assert reason == (
        f"its handler failed 6 times; last: ComponentError: no uploaded source has sha256 {missing}"
    )
    assert isinstance(reason, str) and reason in error["message"]
    assert dead.headers["x-delivery-count"] == 5  # the sixth delivery gave up
    worker = stack.of("symbol_worker")[0]
    requeued = [
        r
        for r in worker.logged("handler failed; message requeued")
        if r.get("backtest_id") == backtest_id
    ]
    assert len(requeued) == 5


async def test_a_message_rabbitmq_dead_letters_itself_fails_its_backtest(
    poison_stack: tuple[Stack, str], channel: AbstractChannel
) -> None:
    """A service that dies on a message every time (no exception to report): after the
    delivery limit RabbitMQ dead-letters it, and the backtest still ends."""
    stack, _ = poison_stack
    request = client.request()
    results = await client.listen(channel, request["id"])
    await client.publish(channel, json.dumps(request).encode(), correlation_id=request["id"])
    # This stack has no scheduler: the test takes the request and "dies" six times.
    requests = await channel.declare_queue("backtest.requests", passive=True)
    for _ in range(6):
        async with asyncio.timeout(30):
            while (message := await requests.get(fail=False)) is None:
                await asyncio.sleep(0.1)
        await message.nack(requeue=True)

    result = await client.next_body(results, timeout_s=60)
    dead = await dead_letter(channel, request["id"])

    assert result["status"] == "failed", stack.dump()
    [error] = result["errors"]
    assert error["kind"] == "internal" and error["unit_id"] is None
    assert "dead-lettered from backtest.requests" in error["message"]
    assert "RabbitMQ dead-lettered it (delivery_limit) after 6 deliveries" in error["message"]
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    assert "x-stratorch-reason" not in dead.headers


async def test_nothing_is_left_on_the_work_queues(channel: AbstractChannel) -> None:
    async def left(name: str) -> int:
        declared = await channel.declare_queue(name, passive=True)
        return declared.declaration_result.message_count or 0

    async with asyncio.timeout(30):
        while any([await left(name) for name in (WORK, PROPOSALS, "backtest.dead.watch")]):
            await asyncio.sleep(0.2)
