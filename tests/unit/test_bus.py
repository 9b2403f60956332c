"""The in-memory bus routes like RabbitMQ and never loses an unacked message."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from services.runtime import TRANSIENT
from shared import topology
from shared.broker import BrokerUnavailable
from shared.bus import Delivery, InMemoryBus, topic_matches
from shared.errors import ServerUnavailable
from shared.mongo import MongoUnavailable
from shared.sandbox.docker import DockerUnavailable


def test_topic_patterns_match_like_amqp() -> None:
    assert topic_matches("#", "abc") and topic_matches("#", "a.b.c")
    assert topic_matches("a.*", "a.b") and not topic_matches("a.*", "a.b.c")
    assert topic_matches("a.#", "a") and topic_matches("*.b.#", "x.b.c.d")
    assert not topic_matches("abc", "abd")


async def test_results_reach_the_results_queue_and_a_client_binding() -> None:
    bus = InMemoryBus()
    bus.bind("mine", topology.RESULTS, "bt-1")
    await bus.publish(topology.RESULTS, "bt-1", b"one", message_id="m1", correlation_id="bt-1")
    await bus.publish(topology.RESULTS, "bt-2", b"two", message_id="m2", correlation_id="bt-2")
    mine = bus.consume("mine")
    delivery = await anext(mine)
    assert (delivery.body, delivery.correlation_id) == (b"one", "bt-1")
    assert delivery.headers["x-schema-version"] == 1
    await delivery.ack()
    everything = bus.consume(topology.RESULTS_QUEUE)
    bodies = [(await anext(everything)).body for _ in range(2)]
    assert bodies == [b"one", b"two"]


async def test_an_unacked_delivery_is_redelivered_when_its_consumer_stops() -> None:
    bus = InMemoryBus()
    await bus.publish(topology.WORK, topology.WORK, b"unit", message_id="m", correlation_id="b")
    consumer = bus.consume(topology.WORK)
    await anext(consumer)
    await consumer.aclose()  # the worker died before acking
    again = await asyncio.wait_for(anext(bus.consume(topology.WORK)), 1)
    assert again.body == b"unit" and again.redelivered
    await again.ack()


async def test_a_nacked_delivery_goes_back_on_the_queue() -> None:
    bus = InMemoryBus()
    await bus.publish(topology.WORK, topology.WORK, b"unit", message_id="m", correlation_id="b")
    consumer = bus.consume(topology.WORK)
    first = await anext(consumer)
    await first.nack(requeue=True)
    second = await asyncio.wait_for(anext(consumer), 1)
    assert second.body == b"unit" and second.redelivered


async def test_serve_publishes_outputs_then_acks_and_requeues_on_failure() -> None:
    from shared.bus import Outgoing, serve
    from shared.messages import BacktestEvent

    bus = InMemoryBus()
    bus.bind("watch", topology.EVENTS, "#")
    calls = 0

    async def flaky(delivery):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("mongo went away")
        event = BacktestEvent(backtest_id="b", type="planned", units_done=0, unit_count=1)
        return [Outgoing(topology.EVENTS, event, "b")]

    server = asyncio.create_task(serve(bus, topology.WORK, flaky, on_error="requeue"))
    await bus.publish(topology.WORK, topology.WORK, b"unit", message_id="m", correlation_id="b")
    event = await asyncio.wait_for(anext(bus.consume("watch")), 2)
    assert b'"planned"' in event.body and calls == 2
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await server


async def test_serve_in_raise_mode_stops_with_the_handlers_exception() -> None:
    from shared.bus import serve

    bus = InMemoryBus()

    async def broken(delivery):  # type: ignore[no-untyped-def]
        raise KeyError("bug")

    server = asyncio.create_task(serve(bus, topology.WORK, broken))
    await bus.publish(topology.WORK, topology.WORK, b"unit", message_id="m", correlation_id="b")
    with pytest.raises(KeyError):
        await asyncio.wait_for(server, 2)


async def _serving(bus: InMemoryBus, handler, **options):  # type: ignore[no-untyped-def]
    from shared.bus import serve

    return asyncio.create_task(serve(bus, topology.WORK, handler, on_error="requeue", **options))


async def _stop(server: asyncio.Task[None]) -> None:
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await server


async def test_a_poison_message_is_dead_lettered_at_once_with_its_reason() -> None:
    from shared.bus import Poison

    bus = InMemoryBus()
    calls = 0

    async def decode(delivery):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        raise Poison("not a valid WorkUnit: unit_id: Field required")

    server = await _serving(bus, decode)
    await bus.publish(topology.WORK, topology.WORK, b"{}", message_id="m", correlation_id="b")
    dead = await asyncio.wait_for(anext(bus.consume(topology.DEAD)), 2)
    await dead.ack()
    await _stop(server)
    assert calls == 1  # never retried
    assert dead.body == b"{}" and dead.correlation_id == "b"
    assert dead.headers[topology.REASON_HEADER] == "not a valid WorkUnit: unit_id: Field required"
    assert dead.headers[topology.QUEUE_HEADER] == topology.WORK
    assert dead.headers[topology.KIND_HEADER] == "internal"


async def test_a_handler_failing_on_the_last_delivery_dead_letters_with_the_exception() -> None:
    bus = InMemoryBus()
    calls = 0

    async def broken(delivery):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        raise LookupError("no plan")

    server = await _serving(bus, broken)
    await bus.publish(topology.WORK, topology.WORK, b"unit", message_id="m", correlation_id="b")
    dead = await asyncio.wait_for(anext(bus.consume(topology.DEAD)), 5)
    await dead.ack()
    await _stop(server)
    assert calls == topology.DELIVERY_LIMIT + 1
    assert dead.headers[topology.REASON_HEADER] == (
        f"its handler failed {topology.DELIVERY_LIMIT + 1} times; last: LookupError: no plan"
    )


async def test_an_outage_is_retried_in_place_then_given_up_as_unavailable() -> None:
    from shared.bus import Outgoing
    from shared.messages import BacktestEvent

    bus = InMemoryBus()
    bus.bind("watch", topology.EVENTS, "#")
    calls = 0

    async def flaky(delivery):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls < 3:
            raise TimeoutError("mongo is down")
        event = BacktestEvent(backtest_id="b", type="planned", units_done=0, unit_count=1)
        return [Outgoing(topology.EVENTS, event, "b")]

    server = await _serving(bus, flaky, transient=(TimeoutError,), outage_limit_s=30)
    await bus.publish(topology.WORK, topology.WORK, b"unit", message_id="m", correlation_id="b")
    await asyncio.wait_for(anext(bus.consume("watch")), 10)
    await _stop(server)
    assert calls == 3

    async def down(delivery):  # type: ignore[no-untyped-def]
        raise TimeoutError("mongo is down")

    server = await _serving(bus, down, transient=(TimeoutError,), outage_limit_s=1)
    await bus.publish(topology.WORK, topology.WORK, b"unit", message_id="m", correlation_id="b")
    dead = await asyncio.wait_for(anext(bus.consume(topology.DEAD)), 10)
    await dead.ack()
    await _stop(server)
    assert "x-delivery-count" not in dead.headers  # retried in place, never given back
    assert dead.headers[topology.KIND_HEADER] == "unavailable"
    reason = str(dead.headers[topology.REASON_HEADER])
    assert "STRATORCH_OUTAGE_LIMIT_S=1" in reason and "mongo is down" in reason


@pytest.mark.parametrize(
    "unavailable", [ServerUnavailable, MongoUnavailable, BrokerUnavailable, DockerUnavailable]
)
async def test_the_services_retry_every_server_unavailable_in_place(
    unavailable: type[ServerUnavailable],
) -> None:
    from shared.bus import Outgoing
    from shared.messages import BacktestEvent

    bus = InMemoryBus()
    bus.bind("watch", topology.EVENTS, "#")
    redelivered: list[bool] = []

    async def flaky(delivery: Delivery) -> list[Outgoing]:
        redelivered.append(delivery.redelivered)
        if len(redelivered) == 1:
            raise unavailable("the server is away")
        event = BacktestEvent(backtest_id="b", type="planned", units_done=0, unit_count=1)
        return [Outgoing(topology.EVENTS, event, "b")]

    server = await _serving(bus, flaky, transient=TRANSIENT, outage_limit_s=30)
    await bus.publish(topology.WORK, topology.WORK, b"unit", message_id="m", correlation_id="b")
    await asyncio.wait_for(anext(bus.consume("watch")), 10)
    await _stop(server)
    assert redelivered == [False, False]  # handled again in place, never given back


async def test_the_results_queue_drops_its_oldest_past_its_bound_but_a_client_gets_all() -> None:
    bus = InMemoryBus()
    bus.bind("mine", topology.RESULTS, "#")  # a client bound before publishing
    total = topology.RESULTS_MAX_LENGTH + 2
    for i in range(total):
        await bus.publish(
            topology.RESULTS, f"bt-{i}", b"%d" % i, message_id="m", correlation_id="b"
        )
    everything = bus.consume(topology.RESULTS_QUEUE)
    first = await anext(everything)
    assert first.body == b"2"  # results 0 and 1 were dropped (drop-head)
    mine = bus.consume("mine")
    assert (await anext(mine)).body == b"0"


def test_a_timer_waits_in_the_longest_hold_not_past_its_deadline() -> None:
    assert topology.timer_key(0) == "500" and topology.timer_key(499) == "500"
    assert topology.timer_key(1_999) == "500" and topology.timer_key(2_000) == "2000"
    assert topology.timer_key(3_600_000) == "2048000"
    assert topology.timer_key(10**9) == str(topology.TIMER_HOLDS_MS[-1])
    holds = [q for q in topology.QUEUES if q.exchange == topology.TIMERS]
    assert [q.arguments["x-message-ttl"] for q in holds] == list(topology.TIMER_HOLDS_MS)
    # One hold time per queue: RabbitMQ expires messages only at a queue's head.
    assert all(q.arguments["x-dead-letter-exchange"] == topology.DEADLINES for q in holds)


async def test_a_held_message_is_dead_lettered_when_its_ttl_is_up() -> None:
    bus = InMemoryBus()
    started = asyncio.get_running_loop().time()
    await bus.publish(topology.TIMERS, "500", b"timer", message_id="m", correlation_id="b")
    delivery = await asyncio.wait_for(anext(bus.consume(topology.DEADLINES)), 3)
    assert delivery.body == b"timer" and delivery.correlation_id == "b"
    assert asyncio.get_running_loop().time() - started >= 0.45


async def test_a_cancel_reaches_its_queue_and_every_listener() -> None:
    bus = InMemoryBus()
    bus.bind("worker-1", topology.CANCEL, "#")
    bus.bind("worker-2", topology.CANCEL, "#")
    await bus.publish(topology.CANCEL, "bt-1", b"stop", message_id="m", correlation_id="bt-1")
    for queue in (topology.CANCEL, "worker-1", "worker-2"):
        assert (await asyncio.wait_for(anext(bus.consume(queue)), 1)).body == b"stop"


async def test_a_message_is_handed_over_in_process_and_its_body_is_still_its_json() -> None:
    from shared.bus import GiveUp, Outgoing, publish
    from shared.messages import BacktestEvent, WorkUnit

    bus = InMemoryBus()
    bus.bind("watch", topology.EVENTS, "#")
    event = BacktestEvent(backtest_id="b", type="planned", units_done=0, unit_count=1)
    await publish(bus, Outgoing(topology.EVENTS, event, "b"))
    got = await asyncio.wait_for(anext(bus.consume("watch")), 2)
    assert got.decode(BacktestEvent) is event  # no JSON round trip
    assert BacktestEvent.model_validate_json(got.body) == event
    with pytest.raises(ValueError):  # another model: the body is validated as that
        got.decode(WorkUnit)

    async def give_up(delivery):  # type: ignore[no-untyped-def]
        raise GiveUp("never")

    # A dead letter of a handed-over message carries its JSON, as over RabbitMQ.
    server = await _serving(bus, give_up)
    await publish(bus, Outgoing(topology.WORK, event, "b"))
    dead = await asyncio.wait_for(anext(bus.consume(topology.DEAD)), 2)
    await dead.ack()
    await _stop(server)
    assert dead.body == event.model_dump_json(by_alias=True).encode()
