"""The message bus port, and its in-memory implementation used by ``stratorch run``.

Handlers never see the bus: they return :class:`Outgoing` messages, and :func:`serve`
publishes those and acknowledges the delivery only afterwards — the same order the RabbitMQ
wiring keeps (ack after the effect is durable), so a crash never loses a message.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shared.messages import SCHEMA_VERSION, Message
from shared.topology import EXCHANGES, QUEUES, ExchangeType, routing_key


@dataclass(frozen=True)
class Outgoing:
    """A message a handler wants published to ``exchange``."""

    exchange: str
    message: Message
    backtest_id: str

    @property
    def routing_key(self) -> str:
        return routing_key(self.exchange, self.backtest_id)


@dataclass
class Delivery:
    """One received message. ``correlation_id`` is the backtest id when the sender set it."""

    body: bytes
    message_id: str | None = None
    correlation_id: str | None = None
    headers: dict[str, object] = field(default_factory=dict)
    redelivered: bool = False


class Bus(Protocol):
    async def publish(
        self, exchange: str, key: str, body: bytes, *, message_id: str, correlation_id: str
    ) -> None: ...

    def consume(self, queue: str) -> AsyncIterator[tuple[Delivery, Callable[[], Awaitable[None]]]]:
        """Deliveries with their ack callback, until the consumer is cancelled."""
        ...


async def publish(bus: Bus, out: Outgoing) -> None:
    """Publish one handler output with the properties every message carries."""
    await bus.publish(
        out.exchange,
        out.routing_key,
        out.message.model_dump_json(by_alias=True).encode(),
        message_id=uuid.uuid4().hex,
        correlation_id=out.backtest_id,
    )


Handler = Callable[[Delivery], Awaitable[Sequence[Outgoing]]]


async def serve(bus: Bus, queue: str, handler: Handler, *, concurrency: int = 1) -> None:
    """Consume ``queue`` until cancelled: handle, publish the outputs, then ack.

    At most ``concurrency`` deliveries are in flight. A handler that raises (a bug: user
    errors come back as messages) stops the consumer with that exception, leaving its
    delivery unacked so it is redelivered, never lost.
    """
    slots = asyncio.Semaphore(concurrency)

    async def one(delivery: Delivery, ack: Callable[[], Awaitable[None]]) -> None:
        try:
            for out in await handler(delivery):
                await publish(bus, out)
            await ack()
        finally:
            slots.release()

    async with asyncio.TaskGroup() as group:
        async for delivery, ack in bus.consume(queue):
            await slots.acquire()
            group.create_task(one(delivery, ack))


def topic_matches(binding: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more."""

    def match(b: list[str], k: list[str]) -> bool:
        if not b:
            return not k
        if b[0] == "#":
            return any(match(b[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and b[0] in ("*", k[0]) and match(b[1:], k[1:])

    return match(binding.split("."), key.split("."))


class InMemoryBus:
    """RabbitMQ's routing (topic, direct, fanout) and at-least-once delivery, in one process.

    A delivery that is not acked before its consumer stops is put back on the queue, as
    RabbitMQ would on a lost channel.
    """

    def __init__(self) -> None:
        self._types: dict[str, ExchangeType] = {e.name: e.type for e in EXCHANGES}
        self._queues: dict[str, asyncio.Queue[Delivery]] = {}
        self._bindings: list[tuple[str, str, str]] = []
        for q in QUEUES:
            self.bind(q.name, q.exchange, q.routing_key)

    def bind(self, queue: str, exchange: str, key: str) -> None:
        """Declare ``queue`` (idempotently) and bind it, like ``queue_bind``."""
        self._queues.setdefault(queue, asyncio.Queue())
        self._bindings.append((exchange, key, queue))

    async def publish(
        self, exchange: str, key: str, body: bytes, *, message_id: str, correlation_id: str
    ) -> None:
        kind = self._types[exchange]
        headers: dict[str, object] = {"x-schema-version": SCHEMA_VERSION}
        for ex, bound_key, queue in self._bindings:
            if ex != exchange:
                continue
            if (
                kind == "fanout"
                or (kind == "direct" and bound_key == key)
                or (kind == "topic" and topic_matches(bound_key, key))
            ):
                self._queues[queue].put_nowait(
                    Delivery(body, message_id, correlation_id, dict(headers))
                )

    async def consume(
        self, queue: str
    ) -> AsyncIterator[tuple[Delivery, Callable[[], Awaitable[None]]]]:
        q = self._queues[queue]
        unacked: dict[int, Delivery] = {}
        try:
            while True:
                delivery = await q.get()
                tag = id(delivery)
                unacked[tag] = delivery

                async def ack(tag: int = tag) -> None:
                    unacked.pop(tag, None)

                yield delivery, ack
        finally:
            for delivery in unacked.values():
                delivery.redelivered = True
                q.put_nowait(delivery)
