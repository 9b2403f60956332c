"""``RabbitBus``: the :class:`shared.bus.Bus` port on RabbitMQ, with aio-pika.

What it guarantees, and why:

- **Nothing is lost on the way in.** Every publish waits for the broker's confirm (publisher
  confirms) and is persistent; a message to an exchange that has a queue of the topology is
  ``mandatory``, so an unroutable one raises instead of vanishing. ``backtest.events`` is the
  exception: nobody may be listening to a backtest's progress, and that is fine.
- **Nothing is lost on the way out.** Deliveries are acknowledged manually, by the
  :class:`~shared.bus.Delivery`'s ``ack``/``nack`` — :func:`shared.bus.serve` acks only after
  the handler's outputs are published. Each consumer has its own channel with a bounded
  prefetch, so a slow worker holds at most ``prefetch`` messages others could take.
- **Outages are survived.** The connection is robust: after a network blip or a broker
  restart aio-pika reconnects, re-declares and resumes consuming. Deliveries received before
  the loss cannot be settled any more (their channel is gone); the broker redelivers them and
  the idempotent handlers make the second run change nothing. A publish interrupted by the
  loss is retried a few times (duplicates are harmless for the same reason).

Errors are mapped at this boundary to :class:`BrokerError` subclasses whose messages say
what was attempted and how to fix it; the aio-pika/aiormq error is chained.

Hierarchy::

    BrokerError              base: a broker operation failed
    ├── BrokerUnavailable    cannot connect, or the connection was lost for good (also a
    │                        shared.errors.ServerUnavailable: retried, not given up)
    ├── BrokerRefused        the broker said no: bad login, unknown vhost, refused publish
    └── TopologyConflict     a queue or exchange exists with other settings than ours

Note: RabbitMQ cancels a consumer that holds an unacked delivery longer than its
``consumer_timeout`` (30 min by default; the Debian 3.10 broker has no per-queue override).
Units are bounded by ``unit_timeout_s`` (≤ 1 h) and are normally far shorter; raise the
broker-wide setting deliberately if you need longer units, this module does not change it.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncGenerator, Mapping
from types import TracebackType
from typing import Any, Literal, Self, cast
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    HeadersType,
)

from shared import topology
from shared.bus import Delivery, encode
from shared.errors import ServerUnavailable
from shared.messages import SCHEMA_VERSION, Message

__all__ = [
    "BrokerError",
    "BrokerRefused",
    "BrokerUnavailable",
    "RabbitBus",
    "TopologyConflict",
    "redact",
]

log = structlog.get_logger(__name__)

#: Exchanges a topology queue is bound to: a message there that reaches no queue is an error.
_ROUTED = frozenset(q.exchange for q in topology.QUEUES)
#: Errors of a connection or channel that went away (retrying after reconnect may help).
_TRANSIENT: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    OSError,  # ConnectionError, and a host name that does not resolve
    asyncio.TimeoutError,
)
#: ... or any AMQP error: what settling a delivery or a health check may run into.
_SETTLE_LOST: tuple[type[BaseException], ...] = (*_TRANSIENT, aiormq.exceptions.AMQPError)
_AUTH: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ProbableAuthenticationError,
)
_PUBLISH_ATTEMPTS = 3


class BrokerError(Exception):
    """A broker operation failed; the message says which and what to check."""


class BrokerUnavailable(BrokerError, ServerUnavailable):
    """RabbitMQ cannot be reached (at start, after the retries), or the bus is closed."""


class BrokerRefused(BrokerError):
    """RabbitMQ answered but refused: a bad login, an unknown vhost, a nacked or unroutable
    publish."""


class TopologyConflict(BrokerError):
    """An exchange or queue already exists with other settings than :mod:`shared.topology`'s."""


def redact(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    user = f"{unquote(parts.username)}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path or '/'}"


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def queue_arguments(queue: topology.Queue) -> dict[str, Any]:
    """The ``x-`` arguments ``queue`` is declared with (quorum type included)."""
    args: dict[str, Any] = dict(queue.arguments)
    if queue.quorum:
        args["x-queue-type"] = "quorum"
    return args


class RabbitBus:
    """The message bus on RabbitMQ. Use as ``async with RabbitBus(url) as bus:``.

    :param url: the AMQP URL, e.g. ``amqp://user:pass@host:5672/vhost``.
    :param prefetch: unacknowledged deliveries each consumer may hold; match it to the
        :func:`shared.bus.serve` concurrency so a worker never sits on messages it is not
        working on while another worker idles.
    :param name: shown as the connection name in the management UI (which service it is).
    :param connect_attempts: tries at start before giving up with :class:`BrokerUnavailable`
        (a service started beside its broker must wait for it, not crash); after the first
        connection, reconnecting is aio-pika's, forever.
    :param retry_delay_s: the first pause between tries; doubled each time, capped at 10 s.
    :param publish_timeout_s: how long a publish may wait for the broker's confirm (a broker
        under a memory alarm blocks publishers).
    """

    def __init__(
        self,
        url: str,
        *,
        prefetch: int = 1,
        name: str = "stratorch",
        connect_attempts: int = 10,
        retry_delay_s: float = 0.5,
        publish_timeout_s: float = 60.0,
    ) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self._url = url
        self._prefetch = prefetch
        self._name = name
        self._connect_attempts = max(1, connect_attempts)
        self._retry_delay_s = retry_delay_s
        self._publish_timeout_s = publish_timeout_s
        self._state: Literal["unopened", "opened", "closed"] = "unopened"
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None  # publishing and declaring
        self._exchanges: dict[str, AbstractExchange] = {}
        self._consumer_channels: set[AbstractChannel] = set()

    def __repr__(self) -> str:
        return f"<RabbitBus {redact(self._url)} state={self._state}>"

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Connect (with logged retries) and open the publishing channel."""
        if self._state == "closed":
            raise BrokerUnavailable(f"{self!r} is closed; create a new RabbitBus")
        if self._state == "opened":
            return
        where = redact(self._url)
        delay = self._retry_delay_s
        for attempt in range(1, self._connect_attempts + 1):
            try:
                connection = await aio_pika.connect_robust(
                    self._url, client_properties={"connection_name": self._name}
                )
                break
            except _AUTH as exc:
                raise BrokerRefused(
                    f"RabbitMQ at {where} refused the login: check the user and password in"
                    f" STRATORCH_AMQP_URL ({exc})"
                ) from exc
            except aiormq.exceptions.ProtocolSyntaxError as exc:
                # The broker closes the connection at Connection.Open for an unknown vhost
                # or one the user may not use.
                raise BrokerRefused(
                    f"RabbitMQ at {where} refused to open vhost {_vhost(self._url)!r}: create"
                    " it (rabbitmqctl add_vhost) and grant the user access (rabbitmqctl"
                    f" set_permissions), or fix STRATORCH_AMQP_URL ({exc})"
                ) from exc
            except _TRANSIENT as exc:
                left = self._connect_attempts - attempt
                if not left:
                    raise BrokerUnavailable(
                        f"cannot connect to RabbitMQ at {where} after {attempt} tries: {exc}."
                        " Is the broker running and STRATORCH_AMQP_URL right?"
                    ) from exc
                log.warning(
                    "broker not reachable; retrying",
                    url=where,
                    error=str(exc),
                    tries_left=left,
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self._connection = connection
        try:
            self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await connection.close()
            raise
        self._state = "opened"
        log.info("broker connected", url=where, prefetch=self._prefetch)

    def _on_connection_lost(self, _: object, exc: BaseException | None) -> None:
        if self._state == "opened":
            log.warning("broker connection lost; reconnecting", error=str(exc))

    def _on_reconnected(self, *_: object) -> None:
        log.warning("broker connection restored; unsettled deliveries will be redelivered")

    async def aclose(self) -> None:
        """Close the connection; unacked deliveries go back to their queues. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        connection, self._connection = self._connection, None
        self._channel = None
        self._exchanges.clear()
        self._consumer_channels.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "opened":
            warnings.warn(
                f"{self!r} was never closed; use 'async with RabbitBus(...)' or aclose()",
                ResourceWarning,
                stacklevel=2,
            )

    def _require(self) -> tuple[AbstractRobustConnection, AbstractChannel]:
        if self._state != "opened" or self._connection is None or self._channel is None:
            raise BrokerUnavailable(
                f"{self!r} is not open: use 'async with RabbitBus(...)' or await connect()"
            )
        return self._connection, self._channel

    # -- topology --------------------------------------------------------------------------------

    async def declare(self) -> None:
        """Declare every exchange, queue and binding of :mod:`shared.topology` (idempotent).

        Exchanges and queues are durable; the work queues are quorum queues with a delivery
        limit that dead-letters a message that keeps failing to ``backtest.dead``.
        """
        _, channel = self._require()
        try:
            for ex in topology.EXCHANGES:
                self._exchanges[ex.name] = await channel.declare_exchange(
                    ex.name, ex.type, durable=True
                )
            for q in topology.QUEUES:
                queue = await self._declare_queue(channel, q)
                await queue.bind(self._exchanges[q.exchange], q.routing_key)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyConflict(
                f"RabbitMQ at {redact(self._url)} already has an exchange or queue declared with"
                f" other settings than stratorch's topology: {exc}. Delete it (rabbitmqctl"
                " delete_queue NAME, or the management UI) and restart, or use a fresh vhost"
            ) from exc
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"declaring the topology failed: {exc}") from exc

    async def _declare_queue(self, channel: AbstractChannel, q: topology.Queue) -> AbstractQueue:
        return await channel.declare_queue(q.name, durable=True, arguments=queue_arguments(q))

    async def _exchange(self, name: str) -> AbstractExchange:
        _, channel = self._require()
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    # -- publishing ------------------------------------------------------------------------------

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
        """Publish persistently (a message as its JSON) and wait for the broker's confirm;
        ``headers`` are added to the ``x-schema-version`` one.

        :param user_id: the message's ``user_id`` (the tenant it is sent for); RabbitMQ
            accepts another than this connection's user only from a user tagged
            ``impersonator``.
        :raises BrokerRefused: the broker nacked it, or it reached no queue where it must, or
            refused its ``user_id``.
        :raises BrokerUnavailable: the connection stayed down through the retries.
        """
        message = aio_pika.Message(
            body if isinstance(body, bytes) else encode(body),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            correlation_id=correlation_id,
            headers=cast(HeadersType, {**(headers or {}), "x-schema-version": SCHEMA_VERSION}),
            user_id=user_id,
        )
        mandatory = exchange in _ROUTED
        delay = self._retry_delay_s
        for attempt in range(1, _PUBLISH_ATTEMPTS + 1):
            target = await self._exchange(exchange)
            try:
                await target.publish(
                    message, key, mandatory=mandatory, timeout=self._publish_timeout_s
                )
                return
            except aiormq.exceptions.PublishError as exc:
                raise BrokerRefused(
                    f"a message to exchange {exchange!r} with routing key {key!r} reached no"
                    " queue: is the topology declared (RabbitBus.declare)?"
                ) from exc
            except aiormq.exceptions.DeliveryError as exc:
                raise BrokerRefused(
                    f"RabbitMQ refused a message to exchange {exchange!r} (key {key!r}): {exc}"
                ) from exc
            except _TRANSIENT as exc:
                if user_id is not None and isinstance(
                    exc, aiormq.exceptions.ChannelPreconditionFailed
                ):
                    raise BrokerRefused(
                        f"RabbitMQ refused a message with user_id {user_id!r}: a user may"
                        " publish for another only with the 'impersonator' tag; add it to the"
                        " user of STRATORCH_AMQP_URL (rabbitmqctl set_user_tags <user>"
                        f" <its tags> impersonator) ({exc})"
                    ) from exc
                if attempt == _PUBLISH_ATTEMPTS or self._state != "opened":
                    raise BrokerUnavailable(
                        f"publishing to exchange {exchange!r} failed {attempt} times: {exc!r}"
                    ) from exc
                log.warning(
                    "publish failed; retrying", exchange=exchange, error=repr(exc), attempt=attempt
                )
                await asyncio.sleep(delay)
                delay *= 2
                # A robust channel is re-opened in place; exchange objects stay valid.

    # -- consuming ---------------------------------------------------------------------------------

    async def consume(self, queue: str) -> AsyncGenerator[Delivery, None]:
        """Deliveries of ``queue``, with at most ``prefetch`` unsettled, until closed.

        Each consumer gets its own channel. When the iteration stops (the caller is cancelled
        or closes the generator) the consumer is cancelled at once — no new deliveries — and
        messages received but not yet handed out are requeued; deliveries already handed out
        can still be settled (serve's grace period), and the channel closes after the last
        one (or with the bus: a delivery never settled goes back to its queue then). A caller
        that leaves the loop early must close the generator (``contextlib.aclosing``), or the
        consumer lives on, taking messages, until the generator is garbage-collected.

        The consumer of a topology queue survives a lost connection (it is restored after the
        reconnect). A queue of :meth:`bind_temporary` does not: it is exclusive to the
        connection, so the broker deletes it; the iteration then raises
        :class:`BrokerUnavailable`, and the caller binds a new queue.

        :raises BrokerUnavailable: the connection was lost while consuming a temporary queue.
        """
        connection, _ = self._require()
        channel = await connection.channel(publisher_confirms=False)
        self._consumer_channels.add(channel)
        outstanding: set[int] = set()
        stopped = False

        async def close_channel() -> None:
            self._consumer_channels.discard(channel)
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()

        try:
            await channel.set_qos(prefetch_count=self._prefetch)
            declared = next((q for q in topology.QUEUES if q.name == queue), None)
            if declared is not None:
                source = await self._declare_queue(channel, declared)
            else:  # a temporary queue from bind_temporary, already declared
                source = await channel.get_queue(queue, ensure=False)
        except BaseException:
            await close_channel()
            raise

        def settler(message: AbstractIncomingMessage) -> Any:
            tag = id(message)
            outstanding.add(tag)

            async def settle(ack: bool, requeue: bool) -> None:
                try:
                    if ack:
                        await message.ack()
                    else:
                        await message.nack(requeue=requeue)
                except _SETTLE_LOST as exc:
                    log.warning(
                        "could not settle a delivery (its channel is gone); the broker"
                        " redelivers it",
                        queue=queue,
                        message_id=message.message_id,
                        error=repr(exc),
                    )
                finally:
                    outstanding.discard(tag)
                    if stopped and not outstanding:
                        await close_channel()

            return settle

        # A temporary queue dies with the connection (it is exclusive), and the robust
        # connection cannot restore it: its consumer would wait forever. So it ends instead.
        lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_lost(*_: object) -> None:
            if not lost.done():
                lost.set_result(None)

        if declared is None:
            connection.close_callbacks.add(on_lost)
        try:
            async with source.iterator() as messages:
                incoming = aiter(messages)
                while True:
                    waiting: asyncio.Future[Any] = asyncio.ensure_future(anext(incoming))
                    try:
                        await asyncio.wait({waiting, lost}, return_when=asyncio.FIRST_COMPLETED)
                    except BaseException:  # cancelled (stopping): the wait must not outlive us
                        waiting.cancel()
                        raise
                    if not waiting.done():
                        waiting.cancel()
                        raise BrokerUnavailable(
                            f"the connection to RabbitMQ was lost, and with it the temporary"
                            f" queue {queue!r}: bind a new one (bind_temporary)"
                        )
                    try:
                        message = waiting.result()
                    except StopAsyncIteration:
                        return
                    yield Delivery(
                        body=message.body,
                        message_id=message.message_id,
                        correlation_id=message.correlation_id,
                        headers=dict(message.headers or {}),
                        redelivered=bool(message.redelivered),
                        user_id=message.user_id,
                        settle=settler(message),
                    )
        finally:
            connection.close_callbacks.discard(on_lost)
            stopped = True
            if not outstanding:
                # Shielded: a consumer cancelled from outside (an HTTP client gone, which
                # anyio cancels again at every await) must still close its channel, or the
                # channel, its consumer and an auto-delete queue live on with the connection.
                await asyncio.shield(close_channel())

    async def bind_temporary(self, exchange: str, key: str, *, queue: str | None = None) -> str:
        """Declare a server-named, exclusive, auto-deleted queue bound to ``exchange`` with
        ``key`` and return its name, for :meth:`consume`; with ``queue``, add the binding to
        that temporary queue instead.

        For listeners (the gateway's progress stream, clients): the queue lives as long as
        its consumer, or this connection, whichever ends first. Bind before looking at the
        store, so no message can fall between the look and the listen.
        """
        _, channel = self._require()
        try:
            # On the underlying channel: the robust one would remember every temporary queue
            # (to re-declare after a reconnect) for as long as the connection lives.
            underlay = await channel.get_underlay_channel()
            if queue is None:
                declared = await underlay.queue_declare("", exclusive=True, auto_delete=True)
                queue = str(declared.queue)
            await underlay.queue_bind(queue, exchange, routing_key=key)
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"binding a temporary queue to {exchange!r}: {exc}") from exc
        return queue

    async def delete_temporary(self, name: str) -> None:
        """Delete a queue from :meth:`bind_temporary` that was never (or is no longer)
        consumed; deleting one that is gone already is fine."""
        if self._state != "opened" or self._channel is None:
            return
        with contextlib.suppress(*_SETTLE_LOST):
            underlay = await self._channel.get_underlay_channel()
            await underlay.queue_delete(name)

    async def ping(self, *, timeout_s: float = 5.0) -> None:
        """A round trip to the broker (open and close a channel), for health checks.

        :raises BrokerUnavailable: no answer within ``timeout_s``.
        """
        connection, _ = self._require()
        try:
            async with asyncio.timeout(timeout_s):
                channel = await connection.channel(publisher_confirms=False)
                await channel.close()
        except _SETTLE_LOST as exc:
            raise BrokerUnavailable(
                f"RabbitMQ at {redact(self._url)} does not answer: {exc!r}"
            ) from exc
