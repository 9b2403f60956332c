"""Services on the in-memory bus, wired as ``stratorch run`` wires them, over the embedded
ports (the bundled sample candles, the process sandbox, a file store).

The one place these tests build a bus, ports and the services' consumers: when the service
table or the handlers' signatures change, this file is what changes. Tests send messages the
way a user or another service does and read what the served services publish.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shared import topology
from shared.bus import Delivery, InMemoryBus
from shared.candles import ParquetCandleStore
from shared.messages import BacktestEvent, Message, ProposalBatch, WorkUnit
from shared.ports import Ports
from shared.sandbox.process import ProcessSandbox
from shared.store import FileStore
from stratorch.embedded import start_services
from stratorch.paths import SAMPLE_STORE

M = TypeVar("M", bound=Message)

#: The exchanges services publish to: what is sent to them is heard (:meth:`Served.take`).
HEARD = (
    topology.WORK,
    topology.PROPOSALS,
    topology.EVENTS,
    topology.RESULTS,
    topology.TIMERS,
    topology.CANCEL,
)

#: A month of two symbols at 1h with a builtin strategy: trades, in well under a second.
REQUEST: dict[str, Any] = {
    "strategy": {"builtin": "sma_cross", "params": {"fast": 5, "slow": 20}},
    "symbols": ["BTCUSDT", "ETHUSDT"],
    "interval": "1h",
    "start": "2021-03-01",
    "end": "2021-04-01",
}


def request(**fields: Any) -> dict[str, Any]:
    """:data:`REQUEST` with a fresh id, changed by ``fields``."""
    return {"id": f"t-{uuid.uuid4().hex[:12]}", **REQUEST, **fields}


@pytest.fixture
async def ports(tmp_path: Path) -> AsyncIterator[Ports]:
    """The embedded ports; services served on several buses in one test share them."""
    async with ProcessSandbox() as sandbox:
        yield Ports(ParquetCandleStore(SAMPLE_STORE), sandbox, FileStore(tmp_path / "state"))


@dataclass
class Served:
    """Services consuming their queues on ``bus``; a copy of everything published to an
    exchange of :data:`HEARD` waits in ``heard`` for :meth:`take`."""

    bus: InMemoryBus
    tasks: list[asyncio.Task[None]]
    heard: dict[str, asyncio.Queue[Delivery]] = field(default_factory=dict)

    async def send(
        self, exchange: str, message: Message | bytes, backtest_id: str, user_id: str | None = None
    ) -> None:
        """Publish as a client or another service does (the backtest id as correlation id)."""
        body = message if isinstance(message, bytes) else message.model_dump_json().encode()
        await self.bus.publish(
            exchange,
            topology.routing_key(exchange, backtest_id),
            body,
            message_id=uuid.uuid4().hex,
            correlation_id=backtest_id,
            user_id=user_id,
        )

    async def submit(self, body: dict[str, Any] | bytes, backtest_id: str | None = None) -> None:
        """Send a request, as a user does (``body`` may be anything, even not JSON)."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent_id = backtest_id or (body["id"] if isinstance(body, dict) else "")
        await self.send(topology.REQUESTS, raw, sent_id)

    async def take(self, exchange: str, model: type[M], timeout_s: float = 60) -> M:
        """The next message published to ``exchange``; fails if a served service crashed or
        nothing comes within ``timeout_s``."""
        getting = asyncio.ensure_future(self.heard[exchange].get())
        await asyncio.wait(
            [getting, *self.tasks], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if not getting.done():
            getting.cancel()
            for task in self.tasks:
                if task.done():
                    task.result()  # raises what the service crashed with
            raise AssertionError(f"nothing was published to {exchange} in {timeout_s} s")
        return model.model_validate_json(getting.result().body)

    async def nothing_more(self, *exchanges: str, wait_s: float = 0.5) -> None:
        """Assert that, after ``wait_s``, nothing else was published to ``exchanges``."""
        await asyncio.sleep(wait_s)
        for exchange in exchanges:
            left = self.heard[exchange]
            assert left.empty(), f"{exchange} got {left.get_nowait().body[:300]!r}"


@asynccontextmanager
async def served(ports: Ports, *services: str, deadline_s: float = 3600.0) -> AsyncIterator[Served]:
    """``services`` (names of the service table) consuming a fresh in-memory bus, one
    delivery at a time each.

    :param deadline_s: the scheduler's deadline for requests that give none.
    """
    bus = InMemoryBus()
    for exchange in HEARD:
        _tap(bus, exchange)
    tasks = start_services(bus, ports, dict.fromkeys(services, 1), deadline_s=deadline_s)
    heard = {exchange: asyncio.Queue[Delivery]() for exchange in HEARD}
    listening = [asyncio.create_task(_listen(bus, f"test.{x}", heard[x])) for x in HEARD]
    try:
        yield Served(bus, tasks, heard)
    finally:
        for task in [*tasks, *listening]:
            task.cancel()
        await asyncio.gather(*tasks, *listening, return_exceptions=True)


def _tap(bus: InMemoryBus, exchange: str) -> None:
    """Bind ``test.<exchange>`` to hear every message of ``exchange``."""
    kind = {e.name: e.type for e in topology.EXCHANGES}[exchange]
    keys = {q.routing_key for q in topology.QUEUES if q.exchange == exchange}
    for key in ["#"] if kind == "topic" else sorted(keys):
        bus.bind(f"test.{exchange}", exchange, key)


async def _listen(bus: InMemoryBus, queue: str, heard: asyncio.Queue[Delivery]) -> None:
    async for delivery in bus.consume(queue):
        await delivery.ack()
        heard.put_nowait(delivery)


async def plan(ports: Ports, body: dict[str, Any]) -> list[WorkUnit]:
    """The units the scheduler publishes for ``body`` (its plan stored in ``ports``)."""
    async with served(ports, "scheduler") as scheduler:
        await scheduler.submit(body)
        planned = await scheduler.take(topology.EVENTS, BacktestEvent)
        assert planned.type == "planned", planned
        return [await scheduler.take(topology.WORK, WorkUnit) for _ in range(planned.unit_count)]


async def run_units(
    ports: Ports, units: list[WorkUnit], *, per_unit: int = 1
) -> list[ProposalBatch]:
    """The batches a symbol worker publishes for ``units`` (``per_unit`` each: a grouped
    unit's runs), in their order."""
    async with served(ports, "symbol_worker") as worker:
        batches = []
        for unit in units:
            await worker.send(topology.WORK, unit, unit.backtest_id)
            for _ in range(per_unit):
                batches.append(await worker.take(topology.PROPOSALS, ProposalBatch))
        return batches
