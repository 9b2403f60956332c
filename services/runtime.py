"""The wiring every service shares: connect what it needs, consume, stop cleanly on SIGTERM.

A service's ``main.py`` is one call, :func:`run_consumer` (or, for the gateway, the app's
lifespan enters :func:`lifespan`). Nothing here decides anything about backtests: that is the
handlers' (``services/*/handler.py``) and ``shared/``'s.

Lifecycle (as arq's worker): connect with logged retries and declare the topology; only then
consume. On SIGTERM or SIGINT stop taking deliveries, let those in flight finish within
``STRATORCH_SHUTDOWN_GRACE_S`` (their publish-then-ack is shielded), cancel the rest — their
messages go back to the queue, never lost — close everything, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Collection, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import structlog
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from services.routes import SERVICES, Need, Route, ServiceName, routes
from shared import mongo
from shared.broker import BrokerError, BrokerUnavailable, RabbitBus
from shared.bus import Delivery, Handler, Outgoing, serve
from shared.errors import ServerUnavailable
from shared.logging import configure
from shared.ports import CandleSource, Ports
from shared.sandbox.factory import new_sandbox
from shared.sandbox.port import Sandbox
from shared.settings import Settings, SettingsError
from shared.store import Store

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Context:
    """What :func:`lifespan` connected; a part the service did not ask for is ``None``."""

    settings: Settings
    bus: RabbitBus | None = None
    #: The primary's client (the store's), for health checks.
    mongo: AsyncMongoClient[dict[str, Any]] | None = None
    store: Store | None = None
    candles: CandleSource | None = None
    sandbox: Sandbox | None = None

    def ports(self) -> Ports:
        """The handlers' ports; a port the service did not connect fails loudly if used."""
        if self.store is None:
            raise RuntimeError("the handlers need a store: enter lifespan() with 'store'")
        return Ports(
            candles=self.candles or cast(CandleSource, _Unavailable("candles")),
            sandbox=self.sandbox or cast(Sandbox, _Unavailable("sandbox")),
            store=self.store,
        )

    def require_bus(self) -> RabbitBus:
        if self.bus is None:
            raise RuntimeError("no broker: enter lifespan() with 'bus'")
        return self.bus


class _Unavailable:
    """Stands in for a port a service did not connect; using it is a wiring bug."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> object:
        raise RuntimeError(
            f"this service did not connect the {self._name} port (see services.routes.SERVICES)"
        )


@contextlib.asynccontextmanager
async def lifespan(
    settings: Settings,
    *,
    needs: Collection[Need] = ("bus", "store", "candles", "sandbox"),
    name: str = "stratorch",
    prefetch: int = 1,
    wait_for_mongo: bool = True,
) -> AsyncIterator[Context]:
    """Connect what a service needs, yield it, close it all on the way out (in reverse).

    Nothing is yielded before every connection answers and the broker topology and Mongo
    indexes are declared, so nothing is served half-started (starlette's lifespan rule).

    :param needs: which of ``bus``, ``store`` (Mongo primary), ``candles`` (Mongo, the
        candles URL) and ``sandbox`` to connect.
    :param name: the service's name, shown as the broker connection's name.
    :param prefetch: the broker prefetch of each consumer (match the serve concurrency).
    :param wait_for_mongo: wait for the store's and the candles' Mongo (logged retries, then
        fail) and create the store's indexes. Off for the gateway: it starts while Mongo is
        down, answers ``/healthz`` 503 saying so and other requests 503, and works once Mongo
        is back (the client reconnects by itself; the consuming services create the indexes).
    """
    async with contextlib.AsyncExitStack() as stack:
        bus = client = store = candles = sandbox = None
        if "bus" in needs:
            bus = RabbitBus(settings.amqp_url.get_secret_value(), prefetch=prefetch, name=name)
            await stack.enter_async_context(bus)
            await bus.declare()
        if "store" in needs:
            url = settings.mongo_url.get_secret_value()
            client = await mongo.connect(url) if wait_for_mongo else mongo.new_client(url)
            stack.push_async_callback(client.close)
            db = client[settings.mongo_db]
            if wait_for_mongo:
                days = settings.retention_days
                if not await mongo.ensure_indexes(db, retention_days=days):
                    sweeping = asyncio.create_task(_expire_every(db, days), name="expire")
                    stack.callback(sweeping.cancel)
            store = await stack.enter_async_context(
                mongo.MongoStore(db, lease_s=settings.claim_lease_s)
            )
        if "candles" in needs:
            source = mongo.MongoCandleSource(
                settings.candles_mongo_url.get_secret_value(),
                settings.mongo_db,
                cache=mongo.ChunkCache(int(settings.candle_cache_mb * 2**20)),
            )
            candles = await stack.enter_async_context(source)
            if wait_for_mongo:
                await _wait_for(source)
        if "sandbox" in needs:
            # A runner started ahead: a new backtest's first call does not wait for one.
            sandbox = await stack.enter_async_context(new_sandbox(settings, spare=True))
        log.info("connected", needs=sorted(needs), sandbox=settings.sandbox if sandbox else None)
        yield Context(settings, bus, client, store, candles, sandbox)


async def _expire_every(db: AsyncDatabase[dict[str, Any]], retention_days: float) -> None:
    """Delete expired documents every :data:`~shared.mongo.SWEEP_EVERY_S`, as a TTL monitor
    would (for a server without TTL indexes); a failed run is logged and tried again."""
    while True:
        try:
            deleted = await mongo.expire(db, retention_days)
            log.info("expired documents deleted", deleted=deleted, retention_days=retention_days)
        except mongo.MongoError as exc:
            log.warning("deleting expired documents failed", error=str(exc))
        await asyncio.sleep(mongo.SWEEP_EVERY_S)


async def _wait_for(source: mongo.MongoCandleSource) -> None:
    """Ping the candle database until it answers, with logged retries (as mongo.connect)."""
    for tries_left in range(mongo.DEFAULT_CONNECT_RETRIES, -1, -1):
        try:
            await source.ping()
            return
        except mongo.MongoUnavailable as exc:
            if not tries_left:
                raise
            log.warning("candle database unavailable", error=str(exc), tries_left=tries_left)
            await asyncio.sleep(mongo.DEFAULT_RETRY_DELAY_S)


# -- consuming services -------------------------------------------------------------------------

#: A server being down: :func:`shared.bus.serve` retries a delivery through these (up to
#: ``STRATORCH_OUTAGE_LIMIT_S``) instead of giving it back, which would use up its deliveries.
TRANSIENT: tuple[type[Exception], ...] = (ServerUnavailable,)
#: Pauses before binding a lost broadcast queue (cancel listeners) again: doubling, capped.
_REBIND_FIRST_S = 0.5
_REBIND_MAX_S = 10.0


def with_log_context(service: str, handler: Handler) -> Handler:
    """``handler``, with ``backtest_id`` (the correlation id) bound on every log line written
    while it runs (and ``unit_id``, which the route binds once it has decoded the message),
    and one ``handled`` line per delivery."""

    async def handle(delivery: Delivery) -> Sequence[Outgoing]:
        context = {"backtest_id": delivery.correlation_id, "message_id": delivery.message_id}
        with structlog.contextvars.bound_contextvars(**context):
            started = time.perf_counter()
            outputs = await handler(delivery)
            log.info(
                "handled",
                elapsed_s=round(time.perf_counter() - started, 4),
                outputs=[type(o.message).__name__ for o in outputs],
                redelivered=delivery.redelivered,
            )
            return outputs

    return handle


async def consume_until_stopped(
    service: ServiceName, settings: Settings, *, handle_signals: bool = True
) -> None:
    """Run ``service``'s consumer until SIGTERM/SIGINT (or until this task is cancelled).

    :param handle_signals: install SIGTERM/SIGINT handlers; off when embedded (tests run it
        as a task and cancel it).
    """
    record = SERVICES[service]
    concurrency = settings.concurrency or record.concurrency
    structlog.contextvars.bind_contextvars(service=service, pid=os.getpid())
    async with lifespan(settings, needs=record.needs, name=service, prefetch=concurrency) as ctx:
        bus = ctx.require_bus()
        served = routes(
            service,
            ctx.ports(),
            deadline_s=settings.deadline_s,
            anonymous=settings.auth == "off",
            quota=settings.quota,
        )
        queues = [route.queue for route in served]
        serving = asyncio.create_task(
            _serve_all(
                _serve(bus, service, route, settings, concurrency=concurrency) for route in served
            ),
            name=f"{service}.serve",
        )
        stopping = asyncio.Event()

        def stop(signum: int) -> None:
            if stopping.is_set():
                log.warning("already stopping", signal=signal.Signals(signum).name)
                return
            log.info(
                "stopping: no new deliveries; in-flight ones may finish",
                signal=signal.Signals(signum).name,
                grace_s=settings.shutdown_grace_s,
            )
            stopping.set()
            serving.cancel()

        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for signum in signals:
            loop.add_signal_handler(signum, stop, signum)
        log.info("consuming", queues=queues, concurrency=concurrency)
        try:
            await serving
        except asyncio.CancelledError:
            if not stopping.is_set():
                raise
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
            if not serving.done():
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
        if not stopping.is_set():
            raise BrokerError(f"a consumer of {queues!r} stopped: the broker closed it")
    log.info("stopped")


async def _serve(
    bus: RabbitBus, service: str, route: Route, settings: Settings, *, concurrency: int
) -> None:
    """Serve ``route`` until its consumer stops. A broadcast route's temporary queue dies
    with the broker connection: it is bound again once the broker is back, and served on."""
    handler = with_log_context(service, route.handle)
    delay = _REBIND_FIRST_S
    while True:
        try:
            queue = await bus.bind_temporary(route.queue, "#") if route.broadcast else route.queue
            await serve(
                bus,
                queue,
                handler,
                concurrency=concurrency,
                on_error="requeue",
                grace_s=settings.shutdown_grace_s,
                transient=TRANSIENT,
                outage_limit_s=settings.outage_limit_s,
                abandon=route.abandon,
            )
            return
        except BrokerUnavailable as exc:
            if not route.broadcast:
                raise
            log.warning("broadcast queue lost; binding again", exchange=route.queue, error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, _REBIND_MAX_S)


async def _serve_all(servers: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run every queue's :func:`~shared.bus.serve` until one stops (its consumer was closed),
    or until cancelled; then stop the others, each with its grace period."""
    tasks = [asyncio.create_task(server) for server in servers]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_consumer(service: ServiceName, *, settings: Settings | None = None) -> int:
    """A consuming service's whole ``main``: settings, logs, serve until SIGTERM. Exit code:
    0 stopped, 1 a server failed, 2 a setting is invalid."""
    try:
        settings = settings or Settings.from_env()
    except SettingsError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level)
    try:
        asyncio.run(consume_until_stopped(service, settings))
    except (BrokerError, mongo.MongoError, ServerUnavailable, RuntimeError, ConnectionError) as exc:
        log.error("cannot run", service=service, error=str(exc))
        print(f"{service}: {exc}", file=sys.stderr)
        return 1
    return 0
