"""The message bus port, and its in-memory implementation used by ``stratorch run``.

Handlers never see the bus: they return :class:`Outgoing` messages, and :func:`serve`
publishes those and acknowledges the delivery only afterwards — the same order the RabbitMQ
wiring keeps (ack after the effect is durable), so a crash never loses a message.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import structlog

from shared.errors import ErrorKind
from shared.messages import SCHEMA_VERSION, Message
from shared.topology import (
    DEAD,
    DELIVERY_LIMIT,
    EXCHANGES,
    KIND_HEADER,
    QUEUE_HEADER,
    QUEUES,
    REASON_HEADER,
    ExchangeType,
    routing_key,
)

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=Message)

#: Characters of a reason kept in a dead letter's header (a traceback-sized message is not
#: what an operator scans a queue for).
_MAX_REASON = 2000


@dataclass(frozen=True)
class Outgoing:
    """A message a handler wants published to ``exchange``."""

    exchange: str
    message: Message
    backtest_id: str
    #: The routing key, when not the exchange's usual one (:func:`shared.topology.routing_key`).
    key: str | None = None
    #: Published as the ``user_id`` property: the tenant a request is sent for (the gateway).
    user_id: str | None = None

    @property
    def routing_key(self) -> str:
        return self.key or routing_key(self.exchange, self.backtest_id)


Settle = Callable[[bool, bool], Awaitable[None]]  # (ack?, requeue?)


class Delivery:
    """One received message, settled exactly once with :meth:`ack` or :meth:`nack`.

    ``correlation_id`` is the backtest id when the sender set it. ``user_id`` is the
    message's ``user_id`` property: RabbitMQ refuses a publish whose ``user_id`` is not the
    publisher's own user (unless it has the ``impersonator`` tag), so it can be trusted.

    ``body`` is the message's bytes. A bus in this process (:class:`InMemoryBus`) hands a
    handler's message over as it is instead: :meth:`decode` then returns it without a JSON
    round trip (a million-bar unit's batch is ~25 MB of JSON), and ``body`` encodes it only
    if something asks for the bytes (a dead letter).
    """

    def __init__(
        self,
        body: bytes | Message,
        message_id: str | None = None,
        correlation_id: str | None = None,
        headers: dict[str, object] | None = None,
        redelivered: bool = False,
        user_id: str | None = None,
        settle: Settle | None = None,
    ) -> None:
        self._body = body if isinstance(body, bytes) else None
        self.message = None if isinstance(body, bytes) else body
        self.message_id = message_id
        self.correlation_id = correlation_id
        self.headers = {} if headers is None else headers
        self.redelivered = redelivered
        self.user_id = user_id
        self.settle = settle

    @property
    def body(self) -> bytes:
        if self._body is None:
            assert self.message is not None
            self._body = encode(self.message)
        return self._body

    def decode(self, model: type[M]) -> M:
        """The message as ``model``: the one handed over, else ``body`` validated.

        :raises pydantic.ValidationError: ``body`` is not a valid ``model``.
        """
        if isinstance(self.message, model):
            return self.message
        return model.model_validate_json(self.body)

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
        body: bytes | Message,
        *,
        message_id: str,
        correlation_id: str,
        headers: Mapping[str, object] | None = None,
        user_id: str | None = None,
    ) -> None:
        """Publish ``body``: bytes, or a message the bus encodes (:func:`encode`) if it
        carries bytes; a bus in this process hands it over as it is (see :class:`Delivery`).
        ``headers`` are added to the ``x-schema-version`` one. ``user_id`` is the message's
        property: the tenant a request is sent for."""
        ...

    def consume(self, queue: str) -> AsyncIterator[Delivery]:
        """Deliveries of ``queue``, until the consumer is cancelled or closed."""
        ...


async def publish(bus: Bus, out: Outgoing) -> None:
    """Publish one handler output with the properties every message carries."""
    await bus.publish(
        out.exchange,
        out.routing_key,
        out.message,
        message_id=uuid.uuid4().hex,
        correlation_id=out.backtest_id,
        user_id=out.user_id,
    )


def encode(message: Message) -> bytes:
    """``message`` as a message body: its JSON."""
    return message.model_dump_json(by_alias=True).encode()


Handler = Callable[[Delivery], Awaitable[Sequence[Outgoing]]]
#: What to publish instead when a delivery is given up (see :func:`serve`); gets the reason.
Abandon = Callable[[Delivery, "GiveUp"], Awaitable[Sequence[Outgoing]]]
OnError = Literal["raise", "requeue"]

#: Pauses between retries through an outage: doubled from the first, capped.
_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 10.0


class GiveUp(Exception):
    """A delivery will never be handled; :func:`serve` dead-letters it with ``reason``.

    :param reason: what went wrong, for the dead letter's header and the failed result.
    :param kind: the error kind the backtest fails with (``internal``, ``unavailable``).
    """

    def __init__(self, reason: str, *, kind: ErrorKind = "internal") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind: ErrorKind = kind


class Poison(GiveUp):
    """A delivery that cannot be decoded (not JSON, not the queue's message): retrying can
    never help, so it is dead-lettered at once. Raised by the decoding in front of a handler."""


async def serve(
    bus: Bus,
    queue: str,
    handler: Handler,
    *,
    concurrency: int = 1,
    on_error: OnError = "raise",
    grace_s: float = 30.0,
    transient: tuple[type[Exception], ...] = (),
    outage_limit_s: float = 120.0,
    delivery_limit: int = DELIVERY_LIMIT,
    abandon: Abandon | None = None,
) -> None:
    """Consume ``queue`` until cancelled: handle, publish the outputs, then ack.

    What a failure does:

    - :class:`Poison` (undecodable): dead-lettered at once, with the reason.
    - an exception in ``transient`` (an outage: a server unreachable): handled again
      after a pause (0.5 s, doubled up to 10 s) without giving the message back, so an
      outage does not use up its deliveries; after ``outage_limit_s`` it is given up with
      kind ``unavailable``.
    - anything else (a bug): see ``on_error``.

    A delivery given up is published to ``backtest.dead`` with the reason, its kind and the
    queue in headers (:data:`shared.topology.REASON_HEADER`...) and acked — or, with
    ``abandon``, what ``abandon`` returns is published instead (the consumer of dead letters
    itself).

    :param concurrency: deliveries in flight at once (the broker prefetch should match).
    :param on_error: what any other handler exception (a bug) does.
        ``"raise"`` stops serving with it (``stratorch run``: surface it); ``"requeue"`` logs
        it and nacks the delivery back to the queue — until its last delivery
        (``x-delivery-count`` reaches ``delivery_limit``), which is given up with the
        exception as the reason (services).
    :param grace_s: on cancellation (SIGTERM), how long in-flight deliveries may finish
        before they are cancelled too; their messages are then redelivered, never lost.
    :param transient: exception types meaning "a server is down, try again later"; the
        services pass :class:`shared.errors.ServerUnavailable`.
    :param outage_limit_s: how long one delivery is retried through an outage.
    :param delivery_limit: the queue's ``x-delivery-limit``.
    :param abandon: what to publish for a delivery given up; ``None``: dead-letter it.
    """
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    failures: list[Exception] = []
    me = asyncio.current_task()

    async def attempt(delivery: Delivery) -> None:
        started = time.monotonic()
        delay = _RETRY_FIRST_S
        while True:
            try:
                outputs = await handler(delivery)
                # Once the handler's work is done, publishing it and acking must not be torn
                # apart by a shutdown: either both happen or the message comes back.
                await asyncio.shield(_publish_then_ack(bus, outputs, delivery))
                return
            except transient as exc:
                waited = time.monotonic() - started
                if waited + delay > outage_limit_s:
                    raise GiveUp(
                        f"a server was unreachable for {waited:.0f} s, past the outage limit"
                        f" (STRATORCH_OUTAGE_LIMIT_S={outage_limit_s:g}): {exc}",
                        kind="unavailable",
                    ) from exc
                log.warning(
                    "server unavailable; retrying",
                    queue=queue,
                    backtest_id=delivery.correlation_id,
                    error=str(exc),
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    async def give_up(delivery: Delivery, exc: GiveUp) -> None:
        log.error(
            "giving up a delivery",
            queue=queue,
            backtest_id=delivery.correlation_id,
            kind=exc.kind,
            reason=exc.reason,
        )
        if abandon is not None:
            outputs = await abandon(delivery, exc)
            await asyncio.shield(_publish_then_ack(bus, outputs, delivery))
        else:
            await asyncio.shield(_dead_letter(bus, queue, delivery, exc))

    async def one(delivery: Delivery) -> None:
        try:
            try:
                await attempt(delivery)
            except GiveUp as exc:
                await give_up(delivery, exc)
            except Exception as exc:
                count = delivery.headers.get("x-delivery-count", 0)
                if on_error == "raise" or not isinstance(count, int) or count < delivery_limit:
                    raise
                log.exception(
                    "handler failed on the last delivery",
                    queue=queue,
                    backtest_id=delivery.correlation_id,
                )
                reason = f"its handler failed {count + 1} times; last: {type(exc).__name__}: {exc}"
                await give_up(delivery, GiveUp(reason))
        except Exception as exc:
            if on_error == "raise":
                failures.append(exc)
                if me is not None:
                    me.cancel()
            else:
                log.exception(
                    "handler failed; message requeued",
                    queue=queue,
                    backtest_id=delivery.correlation_id,
                )
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


async def _dead_letter(bus: Bus, queue: str, delivery: Delivery, exc: GiveUp) -> None:
    """Publish the delivery as it came to ``backtest.dead``, saying why; then ack it."""
    headers = {
        **delivery.headers,
        REASON_HEADER: exc.reason[:_MAX_REASON],
        KIND_HEADER: exc.kind,
        QUEUE_HEADER: queue,
    }
    await bus.publish(
        DEAD,
        queue,
        delivery.body,
        message_id=delivery.message_id or uuid.uuid4().hex,
        correlation_id=delivery.correlation_id or "",
        headers=headers,
    )
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
    RabbitMQ would on a lost channel. A queue declared with ``x-max-length`` drops its oldest
    message when a new one would exceed it (``drop-head``). A queue with a message TTL and a
    dead-letter exchange (the deadline timers' hold queues, never consumed) dead-letters each
    message when its TTL is up, as RabbitMQ does; other TTLs are not simulated (a
    ``stratorch run`` lasts one backtest).
    """

    def __init__(self) -> None:
        self._types: dict[str, ExchangeType] = {e.name: e.type for e in EXCHANGES}
        self._queues: dict[str, asyncio.Queue[Delivery]] = {}
        self._max_length = {
            q.name: limit
            for q in QUEUES
            if isinstance(limit := q.arguments.get("x-max-length"), int)
        }
        self._bindings: list[tuple[str, str, str]] = []
        #: queue -> (seconds a message is held, the exchange it is dead-lettered to)
        self._holds: dict[str, tuple[float, str]] = {}
        for q in QUEUES:
            self.bind(q.name, q.exchange, q.routing_key)
            ttl, dead = q.arguments.get("x-message-ttl"), q.arguments.get("x-dead-letter-exchange")
            if isinstance(ttl, int) and dead is not None:
                self._holds[q.name] = (ttl / 1000, str(dead))

    def bind(self, queue: str, exchange: str, key: str) -> None:
        """Declare ``queue`` (idempotently) and bind it, like ``queue_bind``."""
        self._queues.setdefault(queue, asyncio.Queue())
        self._bindings.append((exchange, key, queue))

    async def publish(
        self,
        exchange: str,
        key: str,
        body: bytes | Message,
        *,
        message_id: str,
        correlation_id: str,
        headers: Mapping[str, object] | None = None,
        user_id: str | None = None,
    ) -> None:
        sent: dict[str, object] = {**(headers or {}), "x-schema-version": SCHEMA_VERSION}
        self._route(
            exchange, key, Delivery(body, message_id, correlation_id, sent, user_id=user_id)
        )

    def _route(self, exchange: str, key: str, message: Delivery) -> None:
        kind = self._types[exchange]
        loop = asyncio.get_running_loop()
        for ex, bound_key, queue in self._bindings:
            if ex != exchange:
                continue
            if (
                kind == "fanout"
                or (kind == "direct" and bound_key == key)
                or (kind == "topic" and topic_matches(bound_key, key))
            ):
                copy = Delivery(
                    message.body if message.message is None else message.message,
                    message.message_id,
                    message.correlation_id,
                    dict(message.headers),
                    user_id=message.user_id,
                )
                hold = self._holds.get(queue)
                if hold is not None:
                    loop.call_later(hold[0], self._route, hold[1], key, copy)
                    continue
                target = self._queues[queue]
                limit = self._max_length.get(queue)
                if limit is not None and target.qsize() >= limit:
                    target.get_nowait()  # drop-head: the oldest goes
                target.put_nowait(copy)

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
                        _redeliver(settled, q)

                delivery.settle = settle
                yield delivery
        finally:
            for delivery in unacked.values():
                _redeliver(delivery, q)


def _redeliver(delivery: Delivery, queue: asyncio.Queue[Delivery]) -> None:
    """Put ``delivery`` back, counted as a quorum queue counts (``x-delivery-count``)."""
    count = delivery.headers.get("x-delivery-count", 0)
    delivery.headers["x-delivery-count"] = (count if isinstance(count, int) else 0) + 1
    delivery.redelivered = True
    queue.put_nowait(delivery)
