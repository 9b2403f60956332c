"""``stratorch run``'s engine: the four services' handlers in one process, no servers.

The same handlers and messages as the real stack, wired to the embedded ports: the
in-memory bus, the Parquet candle store, the subprocess sandbox and a file store. A handler
that fails unexpectedly (a bug, not a user error) ends the run with a ``failed`` result that
says so, rather than hanging.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import traceback
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from services.routes import SERVICES, ServiceName, routes
from services.scheduler.handler import DEFAULT_DEADLINE_S, Received, receive
from shared import topology
from shared.bus import InMemoryBus, serve
from shared.messages import (
    BacktestEvent,
    BacktestResult,
    ErrorInfo,
    new_backtest_id,
)
from shared.ports import Ports

EventCallback = Callable[[BacktestEvent], None]
T = TypeVar("T")


def prepare(raw: bytes) -> Received:
    """Read the request as the scheduler will: the id its result will carry and its
    ``parallel_symbols``. A request that gives no id gets a fresh one (it is published with it
    as the correlation id). One that is malformed, or whose ``id`` is not a valid id (``""``,
    ``"a/b"``, ``123``), comes back ``rejected``, naming what is wrong: an invalid id is never
    used, so it can never become a path.
    """
    return receive(raw, new_backtest_id())


def start_services(
    bus: InMemoryBus,
    ports: Ports,
    concurrency: Mapping[ServiceName, int],
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
    received = prepare(raw)
    backtest_id = received.backtest_id
    bus = InMemoryBus()
    events_queue = f"embedded.events.{backtest_id}"
    bus.bind(events_queue, topology.EVENTS, backtest_id)
    # One backtest: one delivery at a time is enough, except for its units.
    concurrency = dict.fromkeys(SERVICES, 1)
    parallel = received.request.parallel_symbols if received.request else None
    concurrency["symbol_worker"] = parallel or SERVICES["symbol_worker"].concurrency
    services = start_services(bus, ports, concurrency, deadline_s=deadline_s)

    async def result() -> BacktestResult:
        async for delivery in bus.consume(topology.RESULTS_QUEUE):
            await delivery.ack()
            found = delivery.decode(BacktestResult)
            if found.backtest_id == backtest_id:
                return found
        raise AssertionError("unreachable")

    async def progress() -> None:
        last = None
        async for delivery in bus.consume(events_queue):
            await delivery.ack()
            last = delivery.decode(BacktestEvent).after(last)
            if on_event is not None:
                on_event(last)

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


def run_to_end(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coroutine)``, without the result passing through ``asyncio.run``: on the
    way out Python 3.11 formats the finished task, result included, with ``repr`` (0.3-0.6 s
    for a million bars' ``BacktestResult``)."""
    result: list[T] = []

    async def keep() -> None:
        result.append(await coroutine)

    asyncio.run(keep())
    return result[0]


#: glibc ``mallopt`` parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocators() -> None:
    """Make this process give back the memory a run frees: call once, before any thread starts
    (``stratorch run`` owns its process; a library caller's process is left alone).

    A run allocates column-sized blocks (8 MB per column at 1M bars) in several threads, then
    frees them. Arrow's default allocator (mimalloc) keeps what a candle read frees for
    Arrow's next allocations, which hardly come; glibc gives each thread an arena of its own
    and raises its mmap threshold as big blocks are freed, so later ones land on a heap that
    cannot shrink. The system allocator for Arrow, one arena and a fixed 1 MiB threshold cut
    the peak of a 1M-bar run by ~150 MB, and run no slower.
    """
    import pyarrow

    pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is not None:  # glibc (musl has no mallopt)
        mallopt(_M_ARENA_MAX, 1)
        mallopt(_M_MMAP_THRESHOLD, 1 << 20)
