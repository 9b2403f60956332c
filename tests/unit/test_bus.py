"""The in-memory bus routes like RabbitMQ and never loses an unacked message."""

from __future__ import annotations

import asyncio

from shared import topology
from shared.bus import InMemoryBus, topic_matches


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
    delivery, ack = await anext(mine)
    assert (delivery.body, delivery.correlation_id) == (b"one", "bt-1")
    assert delivery.headers["x-schema-version"] == 1
    await ack()
    everything = bus.consume(topology.RESULTS)
    bodies = [(await anext(everything))[0].body for _ in range(2)]
    assert bodies == [b"one", b"two"]


async def test_an_unacked_delivery_is_redelivered_when_its_consumer_stops() -> None:
    bus = InMemoryBus()
    await bus.publish(topology.WORK, topology.WORK, b"unit", message_id="m", correlation_id="b")
    consumer = bus.consume(topology.WORK)
    await anext(consumer)
    await consumer.aclose()  # the worker died before acking
    again, ack = await asyncio.wait_for(anext(bus.consume(topology.WORK)), 1)
    assert again.body == b"unit" and again.redelivered
    await ack()
