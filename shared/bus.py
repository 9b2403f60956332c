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
from typing import Literal, Protocol

import structlog

from shared.messages import SCHEMA_VERSION, Message
from shared.topology import EXCHANGES, QUEUES, ExchangeType, routing_key

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Outgoing:
    """A message a handler wants published to ``exchange``."""

    exchange: str
    message: Message
    backtest_id: str
    #: Published as the ``user_id`` property: the tenant a request is sent for (the gateway).
    user_id: str | None = None

    @property
    def routing_key(self) -> str:
        return routing_key(self.exchange, self.backtest_id)


Settle = Callable[[bool, bool], Awaitable[None]]  # (ack?, requeue?)


@dataclass
class Delivery:
    """One received message, settled exactly once with :meth:`ack` or :meth:`nack`.

    ``correlation_id`` is the backtest id when the sender set it. ``user_id`` is the
    message's ``user_id`` property: RabbitMQ refuses a publish whose ``user_id`` is not the
    publisher's own user (unless it has the ``impersonator`` tag), so it can be trusted.
    """

    body: bytes
    message_id: str | None = None
    correlation_id: str | None = None
    headers: dict[str, object] = field(default_factory=dict)
    redelivered: bool = False
    user_id: str | None = None
    settle: Settle | None = field(default=None, repr=False)

    async def ack(self) -> None:
        if self.settle is not None:
            await self.settle(True, False)

    async def nack(self, *, requeue: bool) -> None:
        if self.settle is not None:
            await self.settle(False, requeue)


class Bus(Protocol):
    async def publish(
        self,
        exchange: str,
        key: str,
        body: bytes,
        *,
        message_id: str,
        correlation_id: str,
        user_id: str | None = None,
    ) -> None: ...

    def consume(self, queue: str) -> AsyncIterator[Delivery]:
        """Deliveries of ``queue``, until the consumer is cancelled or closed."""
        ...


async def publish(bus: Bus, out: Outgoing) -> None:
    """Publish one handler output with the properties every message carries."""
    await bus.publish(
        out.exchange,
        out.routing_key,
        out.message.model_dump_json(by_alias=True).encode(),
        message_id=uuid.uuid4().hex,
        correlation_id=out.backtest_id,
        user_id=out.user_id,
    )


Handler = Callable[[Delivery], Awaitable[Sequence[Outgoing]]]
OnError = Literal["raise", "requeue"]


async def serve(
    bus: Bus,
    queue: str,
    handler: Handler,
    *,
    concurrency: int = 1,
    on_error: OnError = "raise",
    grace_s: float = 30.0,
) -> None:
    """Consume ``queue`` until cancelled: handle, publish the outputs, then ack.

    :param concurrency: deliveries in flight at once (the broker prefetch should match).
    :param on_error: what a handler exception (a bug or an outage: user errors come back as
        messages) does. ``"raise"`` stops serving with it (``stratorch run``: surface it);
        ``"requeue"`` logs it and nacks the delivery back to the queue, where the broker's
        delivery limit dead-letters a message that keeps failing (services).
    :param grace_s: on cancellation (SIGTERM), how long in-flight deliveries may finish
        before they are cancelled too; their messages are then redelivered, never lost.
    """
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    failures: list[Exception] = []
    me = asyncio.current_task()

    async def one(delivery: Delivery) -> None:
        try:
            outputs = await handler(delivery)
            # Once the handler's work is done, publishing it and acking must not be torn
            # apart by a shutdown: either both happen or the message comes back.
            await asyncio.shield(_publish_then_ack(bus, outputs, delivery))
        except Exception as exc:
            if on_error == "raise":
                failures.append(exc)
                if me is not None:
                    me.cancel()
            else:
                log.exception("handler failed; message requeued", queue=queue)
                await delivery.nack(requeue=True)
        finally:
            slots.release()

    try:
        async for delivery in bus.consume(queue):
            await slots.acquire()
            task = asyncio.create_task(one(delivery))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except asyncio.CancelledError:
        if failures:
            for task in tasks:
                task.cancel()
            raise failures[0] from None
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        raise


async def _publish_then_ack(bus: Bus, outputs: Sequence[Outgoing], delivery: Delivery) -> None:
    for out in outputs:
        await publish(bus, out)
    await delivery.ack()


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
        self,
        exchange: str,
        key: str,
        body: bytes,
        *,
        message_id: str,
        correlation_id: str,
        user_id: str | None = None,
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
                    Delivery(body, message_id, correlation_id, dict(headers), user_id=user_id)
                )

    async def consume(self, queue: str) -> AsyncIterator[Delivery]:
        q = self._queues[queue]
        unacked: dict[int, Delivery] = {}
        try:
            while True:
                delivery = await q.get()
                tag = id(delivery)
                unacked[tag] = delivery

                async def settle(ack: bool, requeue: bool, tag: int = tag) -> None:
                    settled = unacked.pop(tag, None)
                    if settled is not None and not ack and requeue:
                        settled.redelivered = True
                        q.put_nowait(settled)

                delivery.settle = settle
                yield delivery
        finally:
            for delivery in unacked.values():
                delivery.redelivered = True
                q.put_nowait(delivery)
