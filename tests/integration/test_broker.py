"""``RabbitBus`` on a real RabbitMQ: topology, confirms, manual acks, dead-lettering, errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest

from shared import topology
from shared.broker import (
    BrokerRefused,
    BrokerUnavailable,
    RabbitBus,
    TopologyConflict,
    redact,
)
from shared.bus import Delivery
from tests.integration.stack import Servers, vhost_url

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus(fresh_amqp_url: str) -> AsyncIterator[RabbitBus]:
    async with RabbitBus(fresh_amqp_url, prefetch=2, name="test") as bus:
        await bus.declare()
        yield bus


async def take(bus: RabbitBus, queue: str, n: int, timeout_s: float = 10) -> list[Delivery]:
    """The first ``n`` deliveries of ``queue``, left unsettled."""
    got: list[Delivery] = []
    # aclosing: leaving the loop must stop the consumer now, not when the generator is
    # garbage-collected (until then it would take redelivered messages for itself).
    async with asyncio.timeout(timeout_s), contextlib.aclosing(bus.consume(queue)) as deliveries:
        async for delivery in deliveries:
            got.append(delivery)
            if len(got) == n:
                break
    return got


async def queue_info(url: str, name: str) -> dict[str, object]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return {
            "messages": queue.declaration_result.message_count,
            "consumers": queue.declaration_result.consumer_count,
        }


async def test_declare_is_idempotent_and_makes_quorum_queues(
    bus: RabbitBus, fresh_amqp_url: str
) -> None:
    await bus.declare()  # again: no error
    connection = await aio_pika.connect(fresh_amqp_url)
    async with connection:
        channel = await connection.channel()
        for q in topology.QUEUES:
            await channel.declare_queue(q.name, passive=True)
        # Declaring a work queue as classic conflicts with the quorum one: it exists as such.
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await channel.declare_queue(topology.WORK, durable=True)


async def test_a_queue_declared_differently_is_a_clear_topology_conflict(
    fresh_amqp_url: str,
) -> None:
    connection = await aio_pika.connect(fresh_amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(topology.WORK, durable=True)  # classic, not quorum
    async with RabbitBus(fresh_amqp_url) as bus:
        with pytest.raises(TopologyConflict, match=r"backtest\.work.*delete_queue"):
            await bus.declare()


def declared_arguments(amqp_url: str, queue: str) -> dict[str, object]:
    """The arguments RabbitMQ holds for ``queue`` (``rabbitmqctl list_queues``)."""
    vhost = unquote(urlsplit(amqp_url).path[1:])
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "arguments", "--formatter=json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    [row] = [row for row in json.loads(out.stdout) if row["name"] == queue]
    arguments = row["arguments"]
    # rabbitmqctl prints a table as a dict, or as [[key, type, value], ...] (3.10).
    return {a[0]: a[-1] for a in arguments} if isinstance(arguments, list) else arguments


async def test_the_results_queue_is_bounded_and_an_old_unbounded_one_is_named_to_delete(
    bus: RabbitBus, fresh_amqp_url: str
) -> None:
    arguments = declared_arguments(fresh_amqp_url, topology.RESULTS_QUEUE)
    assert arguments["x-max-length"] == topology.RESULTS_MAX_LENGTH
    assert arguments["x-overflow"] == "drop-head"
    assert arguments["x-message-ttl"] == topology.RESULTS_TTL_MS

    # One declared without the bound (by hand): the declare fails until it is deleted once.
    connection = await aio_pika.connect(fresh_amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(topology.RESULTS_QUEUE)
        await channel.declare_queue(topology.RESULTS_QUEUE, durable=True)
        async with RabbitBus(fresh_amqp_url) as old:
            with pytest.raises(TopologyConflict, match=r"backtest\.results"):
                await old.declare()
        channel = await connection.channel()
        await channel.queue_delete(topology.RESULTS_QUEUE)
    async with RabbitBus(fresh_amqp_url) as migrated:
        await migrated.declare()
    assert declared_arguments(fresh_amqp_url, topology.RESULTS_QUEUE)["x-overflow"] == "drop-head"


async def test_messages_carry_the_contract_properties(bus: RabbitBus, fresh_amqp_url: str) -> None:
    await bus.publish(topology.RESULTS, "bt-1", b'{"a": 1}', message_id="m1", correlation_id="bt-1")
    connection = await aio_pika.connect(fresh_amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.RESULTS_QUEUE, passive=True)
        message = await queue.get(timeout=5)
        assert message is not None
        await message.ack()
    assert message.body == b'{"a": 1}'
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == "m1" and message.correlation_id == "bt-1"
    assert message.headers == {"x-schema-version": 1}
    assert message.routing_key == "bt-1"


async def test_prefetch_bounds_unsettled_deliveries_and_nack_requeues(
    bus: RabbitBus, fresh_amqp_url: str
) -> None:
    for i in range(3):
        await bus.publish(
            topology.WORK, topology.WORK, b"%d" % i, message_id=f"{i}", correlation_id="b"
        )
    held: list[Delivery] = []

    async def hold_all() -> None:
        async for delivery in bus.consume(topology.WORK):
            held.append(delivery)

    holder = asyncio.create_task(hold_all())
    await asyncio.sleep(1)
    assert [d.body for d in held] == [b"0", b"1"]  # prefetch 2: the third waits for a settle
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    for delivery in held:  # settling after the consumer stopped still works
        await delivery.nack(requeue=True)

    got = await take(bus, topology.WORK, 2)
    got += await take(bus, topology.WORK, 1)  # the first two are still unsettled
    assert sorted(d.body for d in got) == [b"0", b"1", b"2"]
    assert sorted(d.redelivered for d in got) == [False, True, True]
    for delivery in got:
        await delivery.ack()
    assert (await queue_info(fresh_amqp_url, topology.WORK))["messages"] == 0


async def test_a_message_that_keeps_failing_is_dead_lettered(
    bus: RabbitBus, fresh_amqp_url: str
) -> None:
    await bus.publish(topology.WORK, topology.WORK, b"poison", message_id="p", correlation_id="b")
    deliveries = 0
    while (await queue_info(fresh_amqp_url, topology.WORK))["messages"]:
        [delivery] = await take(bus, topology.WORK, 1)
        assert delivery.body == b"poison"
        await delivery.nack(requeue=True)
        deliveries += 1
        assert deliveries <= topology.DELIVERY_LIMIT + 1
    assert deliveries == topology.DELIVERY_LIMIT + 1
    [dead] = await take(bus, topology.DEAD, 1)
    assert dead.body == b"poison"
    await dead.ack()
    assert (await queue_info(fresh_amqp_url, topology.WORK))["messages"] == 0


async def test_stopping_a_consumer_requeues_what_it_had_not_handed_out(
    bus: RabbitBus, fresh_amqp_url: str
) -> None:
    for i in range(2):
        await bus.publish(
            topology.WORK, topology.WORK, b"%d" % i, message_id=f"{i}", correlation_id="b"
        )
    [first] = await take(bus, topology.WORK, 1)  # the second was prefetched, not handed out
    await first.ack()  # settling after the consumer stopped still works
    info = await queue_info(fresh_amqp_url, topology.WORK)
    assert info == {"messages": 1, "consumers": 0}


async def test_temporary_queues_follow_one_backtest(bus: RabbitBus) -> None:
    queue = await bus.bind_temporary(topology.EVENTS, "bt-a")
    await bus.bind_temporary(topology.RESULTS, "bt-a", queue=queue)
    await bus.publish(topology.EVENTS, "bt-b", b"other", message_id="1", correlation_id="bt-b")
    await bus.publish(topology.EVENTS, "bt-a", b"event", message_id="2", correlation_id="bt-a")
    await bus.publish(topology.RESULTS, "bt-a", b"result", message_id="3", correlation_id="bt-a")
    got = await take(bus, queue, 2)
    assert [d.body for d in got] == [b"event", b"result"]
    for d in got:
        await d.ack()
    await bus.delete_temporary(queue)
    await bus.delete_temporary(queue)  # gone already: fine
    await bus.ping()


async def test_events_nobody_listens_to_are_fine_but_lost_work_is_an_error(bus: RabbitBus) -> None:
    await bus.publish(topology.EVENTS, "nobody", b"{}", message_id="1", correlation_id="x")
    with pytest.raises(BrokerRefused, match="reached no queue"):
        await bus.publish(topology.WORK, "wrong-key", b"{}", message_id="2", correlation_id="x")


async def test_connection_errors_say_what_to_fix(servers: Servers) -> None:
    bad_password = servers.amqp_url.replace("guest:guest", "guest:wrong")
    with pytest.raises(BrokerRefused, match="refused the login") as caught:
        await RabbitBus(bad_password).connect()
    assert "wrong" not in str(caught.value)

    missing = vhost_url(servers.amqp_url, "stratorch-no-such-vhost")
    with pytest.raises(BrokerRefused, match=r"stratorch-no-such-vhost.*add_vhost"):
        await RabbitBus(missing).connect()

    nobody = "amqp://guest:guest@127.0.0.1:1/"
    with pytest.raises(BrokerUnavailable, match="after 2 tries"):
        await RabbitBus(nobody, connect_attempts=2, retry_delay_s=0.01).connect()

    closed = RabbitBus(servers.amqp_url)
    await closed.aclose()
    await closed.aclose()
    with pytest.raises(BrokerUnavailable, match="closed"):
        await closed.connect()


def test_urls_are_redacted() -> None:
    assert redact("amqp://user:secret@host:5672/vh") == "amqp://user@host:5672/vh"
    assert redact("amqp://h") == "amqp://h/"


async def test_a_temporary_queue_lost_with_the_connection_ends_its_consumer(
    bus: RabbitBus, fresh_amqp_url: str
) -> None:
    """A broker restart deletes exclusive queues, and the robust connection cannot restore
    them: their consumer must say so (not wait forever), and a new queue then works."""
    import subprocess
    from urllib.parse import unquote, urlsplit

    queue = await bus.bind_temporary(topology.EVENTS, "bt-a")
    consuming = asyncio.create_task(take(bus, queue, 1, timeout_s=60))
    await asyncio.sleep(0.5)
    vhost = unquote(urlsplit(fresh_amqp_url).path[1:])
    subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "test"], check=True, timeout=60
    )
    with pytest.raises(BrokerUnavailable, match="temporary queue"):
        await asyncio.wait_for(consuming, 10)

    async with asyncio.timeout(60):
        while True:
            try:
                again = await bus.bind_temporary(topology.EVENTS, "bt-a")
                break
            except BrokerUnavailable:
                await asyncio.sleep(0.5)
    await bus.publish(topology.EVENTS, "bt-a", b"after", message_id="1", correlation_id="bt-a")
    [delivery] = await take(bus, again, 1)
    assert delivery.body == b"after"
    await delivery.ack()


async def test_a_deadline_timer_comes_out_of_its_hold_queue_when_due(bus: RabbitBus) -> None:
    """RabbitMQ's per-queue TTL and dead-lettering are the deadline timers' clock."""
    started = time.monotonic()
    await bus.publish(topology.TIMERS, "2000", b"late", message_id="t1", correlation_id="bt-1")
    await bus.publish(topology.TIMERS, "500", b"soon", message_id="t2", correlation_id="bt-2")
    soon, late = await take(bus, topology.DEADLINES, 2)
    assert (soon.body, late.body) == (b"soon", b"late")  # a long hold never blocks a short one
    assert soon.correlation_id == "bt-2" and late.correlation_id == "bt-1"
    assert time.monotonic() - started >= 2.0
