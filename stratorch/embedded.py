"""``stratorch run``'s engine: the four services' handlers in one process, no servers.

The same handlers and messages as the real stack, wired to the embedded ports: the
in-memory bus, the Parquet candle store, the subprocess sandbox and a file store. A handler
that fails unexpectedly (a bug, not a user error) ends the run with a ``failed`` result that
says so, rather than hanging.
"""

from __future__ import annotations

import asyncio
import json
import os
import traceback
from collections.abc import Callable, Mapping

from services.routes import routes
from services.scheduler.handler import DEFAULT_DEADLINE_S
from shared import topology
from shared.bus import InMemoryBus, serve
from shared.messages import (
    BacktestEvent,
    BacktestResult,
    ErrorInfo,
    is_backtest_id,
    new_backtest_id,
)
from shared.ports import Ports

EventCallback = Callable[[BacktestEvent], None]


def prepare(raw: bytes) -> tuple[bytes, str, int | None]:
    """Give the request an id if it has none (so its result can be matched) and read its
    ``parallel_symbols``.

    Returns the request to publish, the id its result will carry and the parallelism. A
    request that is not a JSON object, or whose ``id`` is not a valid id (``""``, ``"a/b"``,
    ``123``), goes on unchanged under a fresh id and comes back ``rejected``, naming what is
    wrong: an invalid id is never used, so it can never become a path.
    """
    try:
        body = json.loads(raw)
    except ValueError:
        return raw, new_backtest_id(), None
    if not isinstance(body, dict):
        return raw, new_backtest_id(), None
    parallel = body.get("parallel_symbols")
    parallel = parallel if type(parallel) is int and parallel > 0 else None
    if "id" not in body:
        body["id"] = new_backtest_id()
        raw = json.dumps(body).encode()
    if not is_backtest_id(body["id"]):
        return raw, new_backtest_id(), parallel
    return raw, body["id"], parallel


def start_services(
    bus: InMemoryBus,
    ports: Ports,
    concurrency: Mapping[str, int],
    *,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> list[asyncio.Task[None]]:
    """Serve every queue of each service named in ``concurrency`` (with that many
    deliveries at once) on ``bus``; a task per queue, named for its service."""
    tasks = []
    for name, n in concurrency.items():
        for route in routes(name, ports, deadline_s=deadline_s):
            queue = route.queue
            if route.broadcast:  # this one replica's own queue
                queue = f"embedded.{name}.{route.queue}"
                bus.bind(queue, route.queue, "#")
            served = serve(bus, queue, route.handle, concurrency=n, abandon=route.abandon)
            tasks.append(asyncio.create_task(served, name=name))
    return tasks


async def run_backtest(
    raw: bytes,
    ports: Ports,
    *,
    on_event: EventCallback | None = None,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> BacktestResult:
    """Publish ``raw`` as a user would, run every service until its result arrives.

    :param deadline_s: the deadline of a request that gives none (``STRATORCH_DEADLINE_S``).
    """
    raw, backtest_id, parallel = prepare(raw)
    bus = InMemoryBus()
    events_queue = f"embedded.events.{backtest_id}"
    bus.bind(events_queue, topology.EVENTS, backtest_id)
    concurrency = {
        "scheduler": 1,
        "symbol_worker": parallel or os.cpu_count() or 1,
        "portfolio_sim": 1,
    }
    services = start_services(bus, ports, concurrency, deadline_s=deadline_s)

    async def result() -> BacktestResult:
        async for delivery in bus.consume(topology.RESULTS_QUEUE):
            await delivery.ack()
            found = BacktestResult.model_validate_json(delivery.body)
            if found.backtest_id == backtest_id:
                return found
        raise AssertionError("unreachable")

    async def progress() -> None:
        async for delivery in bus.consume(events_queue):
            await delivery.ack()
            if on_event is not None:
                on_event(BacktestEvent.model_validate_json(delivery.body))

    waiting = asyncio.create_task(result())
    watching = asyncio.create_task(progress())
    await bus.publish(
        topology.REQUESTS, "embedded", raw, message_id=new_backtest_id(), correlation_id=backtest_id
    )
    try:
        await asyncio.wait([waiting, *services], return_when=asyncio.FIRST_COMPLETED)
        if waiting.done():
            await asyncio.sleep(0)  # let the last progress events through
            return waiting.result()
        crashed = next(t for t in services if t.done())
        exc = None if crashed.cancelled() else crashed.exception()
        detail = "".join(traceback.format_exception(exc)) if exc else "stopped"
        return BacktestResult(
            backtest_id=backtest_id,
            status="failed",
            errors=[
                ErrorInfo(
                    kind="crashed",
                    message=f"internal error in {crashed.get_name()}: {exc!r}; please report it",
                    log_tail=detail[-4000:],
                )
            ],
        )
    finally:
        for task in [waiting, watching, *services]:
            task.cancel()
        await asyncio.gather(waiting, watching, *services, return_exceptions=True)
