"""The scheduler on the bus: a request in; its plan (an event, a unit per symbol group and a
deadline timer) or its rejection out."""

from __future__ import annotations

import time

import pytest

from services.scheduler import sweep
from shared import topology
from shared.messages import BacktestEvent, BacktestResult, Deadline, WorkUnit
from shared.ports import Ports

from .conftest import request, served

MARCH_2021_MS = (1_614_556_800_000, 1_617_235_200_000)


async def test_a_request_is_planned_into_units_with_a_deadline_timer(ports: Ports) -> None:
    body = request(deadline_s=600)
    async with served(ports, "scheduler") as scheduler:
        sent_at_ms = int(time.time() * 1000)
        await scheduler.submit(body)
        planned = await scheduler.take(topology.EVENTS, BacktestEvent)
        units = [await scheduler.take(topology.WORK, WorkUnit) for _ in range(2)]
        timer = await scheduler.take(topology.TIMERS, Deadline)
        await scheduler.nothing_more(topology.WORK, topology.RESULTS, topology.EVENTS)

    assert (planned.backtest_id, planned.type) == (body["id"], "planned")
    assert (planned.units_done, planned.unit_count) == (0, 2)
    assert planned.symbols == ["BTCUSDT", "ETHUSDT"]
    assert sorted(u.symbols[0] for u in units) == ["BTCUSDT", "ETHUSDT"]
    assert len({u.unit_id for u in units}) == 2
    for unit in units:
        assert unit.backtest_id == body["id"] and unit.unit_count == 2
        assert (unit.interval, unit.start_ms, unit.end_ms) == ("1h", *MARCH_2021_MS)
        assert unit.lookback == 21  # the slow average's 20 bars and the one before
        assert unit.deadline_ms == timer.deadline_ms
    assert timer.backtest_id == body["id"] and timer.deadline_s == 600
    assert sent_at_ms + 600_000 <= timer.deadline_ms <= time.time() * 1000 + 600_000


async def test_a_malformed_request_is_rejected_saying_why(ports: Ports) -> None:
    async with served(ports, "scheduler") as scheduler:
        await scheduler.submit(request(symbols=[], id="no-symbols"))
        rejected = await scheduler.take(topology.RESULTS, BacktestResult)
        finished = await scheduler.take(topology.EVENTS, BacktestEvent)
        await scheduler.submit(b"{not json", backtest_id="not-json")
        unreadable = await scheduler.take(topology.RESULTS, BacktestResult)
        await scheduler.nothing_more(topology.WORK, topology.TIMERS)

    assert (rejected.backtest_id, rejected.status) == ("no-symbols", "rejected")
    [error] = rejected.errors
    assert error.kind == "rejected" and "symbols" in error.message
    assert (finished.type, finished.status) == ("finished", "rejected")
    assert (unreadable.backtest_id, unreadable.status) == ("not-json", "rejected")
    assert "Invalid JSON" in unreadable.errors[0].message


async def test_an_unknown_strategy_is_rejected_naming_the_builtins(ports: Ports) -> None:
    async with served(ports, "scheduler") as scheduler:
        await scheduler.submit(request(strategy={"builtin": "nope"}))
        result = await scheduler.take(topology.RESULTS, BacktestResult)
        await scheduler.nothing_more(topology.WORK)

    assert result.status == "rejected"
    assert "unknown strategy 'nope'" in result.errors[0].message
    assert "builtin strategies are: momentum, peak_ema_reversal, sma_cross" in (
        result.errors[0].message
    )


async def test_a_sweeps_units_are_grouped_per_symbols(
    ports: Ports, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 4 combinations × 2 symbols (a unit each): per symbol, a group of 3 runs and one of 1.
    monkeypatch.setattr(sweep, "RUNS_PER_UNIT", 3)
    body = request(sweep={"grid": {"fast": [5, 8], "slow": [20, 30]}})
    async with served(ports, "scheduler") as scheduler:
        await scheduler.submit(body)
        groups = [await scheduler.take(topology.WORK, WorkUnit) for _ in range(4)]
        await scheduler.nothing_more(topology.WORK)

    runs = {(g.symbols[0], len(g.runs or [])) for g in groups}
    assert runs == {("BTCUSDT", 3), ("BTCUSDT", 1), ("ETHUSDT", 3), ("ETHUSDT", 1)}
    for group in groups:
        assert group.backtest_id == body["id"] and group.session == body["id"]
        assert group.runs and group.lookback == max(r.lookback for r in group.runs)
    children = sorted(
        (r.backtest_id, r.strategy.params["slow"]) for g in groups for r in g.runs or []
    )
    assert children == sorted(
        (f"{body['id']}:c{i:04d}", slow) for i, slow in enumerate([20, 30] * 2) for _ in range(2)
    )
