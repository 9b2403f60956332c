"""Cancellation and deadlines on the in-memory bus: the handlers as ``stratorch run`` wires
them, with the process sandbox, the bundled candles and a file store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from shared import topology
from shared.bus import InMemoryBus
from shared.candles import ParquetCandleStore
from shared.messages import BacktestEvent, BacktestResult, CancelRequest
from shared.ports import Ports
from shared.sandbox import ProcessSandbox
from shared.store import FileStore
from stratorch.embedded import start_services
from stratorch.paths import SAMPLE_STORE
from tests.unit.sandbox.support import runners

#: Sleeps in ``decide`` (after marking, in ``flags``, that its symbol's unit has started).
SLOW = """
import pathlib, time
from shared.strategy import BaseStrategy

class Slow(BaseStrategy):
    params = {"seconds": 60.0, "flags": ""}

    def get_required_lookback(self):
        return 1

    def decide(self, df, interval, **kw):
        pathlib.Path(self.params["flags"], kw["symbol"]).touch()
        time.sleep(self.params["seconds"])
        return None
"""
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
ALL = {"scheduler": 1, "symbol_worker": 1, "portfolio_sim": 1}


def slow_request(flags: Path, **fields: Any) -> dict[str, Any]:
    flags.mkdir(exist_ok=True)
    return {
        "id": f"t-{uuid.uuid4().hex[:12]}",
        "strategy": {"source": SLOW, "class": "Slow", "params": {"flags": str(flags)}},
        "symbols": SYMBOLS,
        "interval": "1h",
        "start": "2021-05-01",
        "end": "2021-05-08",
        "unit_timeout_s": 120,
        **fields,
    }


class Stack:
    """The services on an in-memory bus; ``results`` and ``events`` hear everything."""

    def __init__(self, bus: InMemoryBus, store: FileStore) -> None:
        self.bus = bus
        self.store = store
        self._results = bus.consume("test.results")
        self._events = bus.consume("test.events")

    async def publish(
        self, exchange: str, body: bytes, backtest_id: str, user_id: str | None = None
    ) -> None:
        await self.bus.publish(
            exchange,
            backtest_id,
            body,
            message_id=uuid.uuid4().hex,
            correlation_id=backtest_id,
            user_id=user_id,
        )

    async def submit(self, request: dict[str, Any]) -> None:
        await self.publish(topology.REQUESTS, json.dumps(request).encode(), request["id"])

    async def cancel(self, backtest_id: str, reason: str = "", user_id: str | None = None) -> None:
        body = CancelRequest(backtest_id=backtest_id, reason=reason).model_dump_json()
        await self.publish(topology.CANCEL, body.encode(), backtest_id, user_id)

    async def result(self, timeout_s: float = 60) -> BacktestResult:
        delivery = await asyncio.wait_for(anext(self._results), timeout_s)
        await delivery.ack()
        return BacktestResult.model_validate_json(delivery.body)

    async def event(self, timeout_s: float = 60) -> BacktestEvent:
        delivery = await asyncio.wait_for(anext(self._events), timeout_s)
        await delivery.ack()
        return BacktestEvent.model_validate_json(delivery.body)

    async def unit_events(self, count: int) -> list[BacktestEvent]:
        found: list[BacktestEvent] = []
        while len(found) < count:
            event = await self.event()
            if event.type == "unit_done":
                found.append(event)
        return found


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path, services: Mapping[str, int] = ALL, *, deadline_s: float = 3600
) -> AsyncIterator[Stack]:
    async with ProcessSandbox() as sandbox:
        store = FileStore(tmp_path / "state")
        ports = Ports(ParquetCandleStore(SAMPLE_STORE), sandbox, store)
        bus = InMemoryBus()
        bus.bind("test.results", topology.RESULTS, "#")
        bus.bind("test.events", topology.EVENTS, "#")
        tasks = start_services(bus, ports, services, deadline_s=deadline_s)
        try:
            yield Stack(bus, store)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def started(flags: Path, count: int = 1, timeout_s: float = 60) -> list[str]:
    """Wait until ``count`` units have begun running the strategy; their symbols."""
    deadline = time.monotonic() + timeout_s
    while len(found := sorted(p.name for p in flags.iterdir())) < count:
        assert time.monotonic() < deadline, "no unit started"
        await asyncio.sleep(0.05)
    return found


async def no_runner_left(timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while runners():
        assert time.monotonic() < deadline, f"sandbox runners left: {runners()}"
        await asyncio.sleep(0.05)


async def test_a_cancel_stops_the_running_unit_and_skips_the_queued_ones(tmp_path: Path) -> None:
    flags = tmp_path / "flags"
    request = slow_request(flags)
    async with stack(tmp_path) as s:
        await s.submit(request)
        [running] = await started(flags)
        cancelled_at = time.perf_counter()
        await s.cancel(request["id"], "changed my mind")
        result = await s.result()
        took = time.perf_counter() - cancelled_at
        await no_runner_left()  # the running sandbox was stopped, not left to finish

        assert result.backtest_id == request["id"]
        assert result.status == "cancelled"
        [error] = result.errors
        assert error.kind == "cancelled" and "changed my mind" in error.message
        assert await s.store.get_result(request["id"]) == result
        # Every unit ended at once, cancelled: the running one stopped, the queued skipped.
        units = await s.unit_events(len(SYMBOLS))
        assert sorted(e.symbols[0] for e in units) == SYMBOLS
        assert all("cancel" in e.message or "ended" in e.message for e in units), units
        assert sorted(p.name for p in flags.iterdir()) == [running], "a queued unit ran"
        # Nothing more is published for it (the late batches do not replay or re-publish).
        await asyncio.sleep(0.5)
        assert await s.store.get_result(request["id"]) == result
    print(f"\ncancel → cancelled result: {took * 1000:.0f} ms")


async def test_a_cancel_by_someone_who_does_not_own_the_backtest_is_ignored(
    tmp_path: Path,
) -> None:
    flags = tmp_path / "flags"
    request = slow_request(flags)
    request["strategy"]["params"]["seconds"] = 0.005
    async with stack(tmp_path) as s:
        await s.submit(request)  # no user_id: the tenant "anonymous" owns it
        await started(flags)
        await s.cancel(request["id"], "not yours", user_id="mallory")
        result = await s.result()
        assert result.status == "completed", result.errors
        assert sorted(p.name for p in flags.iterdir()) == SYMBOLS  # every unit ran


async def test_a_cancel_after_the_end_changes_nothing(tmp_path: Path) -> None:
    request = {
        "id": f"t-{uuid.uuid4().hex[:12]}",
        "strategy": "sma_cross",
        "symbols": ["BTCUSDT"],
        "interval": "1h",
        "start": "2021-05-01",
        "end": "2021-06-01",
    }
    async with stack(tmp_path) as s:
        await s.submit(request)
        done = await s.result()
        assert done.status == "completed"
        await s.cancel(request["id"])
        with contextlib.suppress(TimeoutError):
            extra = await s.result(timeout_s=1.0)
            raise AssertionError(f"a second result was published: {extra.status}")
        assert await s.store.get_result(request["id"]) == done


async def test_past_its_deadline_a_backtest_fails_naming_the_unfinished_units(
    tmp_path: Path,
) -> None:
    flags = tmp_path / "flags"
    request = slow_request(flags, deadline_s=3)
    async with stack(tmp_path) as s:
        submitted = time.perf_counter()
        await s.submit(request)
        result = await s.result()
        took = time.perf_counter() - submitted
        await no_runner_left()

        assert result.status == "failed"
        assert [e.kind for e in result.errors] == ["timeout"] * len(SYMBOLS)
        assert [e.unit_id for e in result.errors] == ["u0000", "u0001", "u0002"]
        assert [e.symbol for e in result.errors] == SYMBOLS
        assert all("deadline" in e.message for e in result.errors)
        assert 3 <= took < 15, took
    print(f"\ndeadline 3 s → failed result after {took:.2f} s")


async def test_the_deadline_ends_a_backtest_no_worker_ever_took(tmp_path: Path) -> None:
    request = slow_request(tmp_path / "flags")
    del request["unit_timeout_s"]
    no_workers = {"scheduler": 1, "portfolio_sim": 1}
    async with stack(tmp_path, no_workers, deadline_s=1.5) as s:  # the setting's default
        submitted = time.perf_counter()
        await s.submit(request)
        result = await s.result()
        took = time.perf_counter() - submitted

    assert result.status == "failed"
    assert [e.unit_id for e in result.errors] == ["u0000", "u0001", "u0002"]
    assert all(e.kind == "timeout" for e in result.errors)
    assert 1.5 <= took < 10, took


async def test_a_backtest_cancelled_before_it_is_planned_never_runs(tmp_path: Path) -> None:
    flags = tmp_path / "flags"
    request = slow_request(flags)
    async with stack(tmp_path) as s:
        await s.cancel(request["id"], "too early")
        result = await s.result()
        await s.submit(request)
        events = [await s.event()]  # the cancellation's `finished`
        with contextlib.suppress(TimeoutError):
            events.append(await s.event(timeout_s=2.0))

    assert result.status == "cancelled"
    assert [e.type for e in events] == ["finished"], events
    assert list(flags.iterdir()) == []
