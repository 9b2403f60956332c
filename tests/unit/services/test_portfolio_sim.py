"""portfolio_sim on the bus: each batch is counted in an event, the last one is replayed into
the result; a cancel, or a deadline that passes, ends the backtest early."""

from __future__ import annotations

import json
import time
from pathlib import Path

from services.portfolio_sim import handler
from shared import topology
from shared.candles import ParquetCandleStore
from shared.messages import BacktestEvent, BacktestResult, CancelRequest, Deadline, WorkUnit
from shared.ports import Ports
from shared.store import FileStore
from stratorch.embedded import run_backtest
from stratorch.paths import SAMPLE_STORE

from .conftest import plan, request, run_units, served


async def test_the_last_batch_is_replayed_into_the_result(ports: Ports, tmp_path: Path) -> None:
    body = request()
    first, last = await run_units(ports, await plan(ports, body))
    async with served(ports, "portfolio_sim") as portfolio_sim:
        await portfolio_sim.send(topology.PROPOSALS, first, body["id"])
        one = await portfolio_sim.take(topology.EVENTS, BacktestEvent)
        await portfolio_sim.nothing_more(topology.RESULTS)
        await portfolio_sim.send(topology.PROPOSALS, last, body["id"])
        two = await portfolio_sim.take(topology.EVENTS, BacktestEvent)
        result = await portfolio_sim.take(topology.RESULTS, BacktestResult)
        finished = await portfolio_sim.take(topology.EVENTS, BacktestEvent)

    assert [(e.type, e.unit_id, e.units_done, e.unit_count) for e in (one, two)] == [
        ("unit_done", first.unit_id, 1, 2),
        ("unit_done", last.unit_id, 2, 2),
    ]
    assert (result.backtest_id, result.status, result.errors) == (body["id"], "completed", [])
    assert result.metrics is not None and result.metrics.trade_count == len(result.trades) > 0
    assert sorted(result.per_symbol) == ["BTCUSDT", "ETHUSDT"]
    assert (finished.type, finished.status, finished.units_done) == ("finished", "completed", 2)
    # The same result as the whole of `stratorch run`.
    alone = Ports(ParquetCandleStore(SAMPLE_STORE), ports.sandbox, FileStore(tmp_path / "alone"))
    whole = await run_backtest(json.dumps(body).encode(), alone)
    assert result.model_dump(exclude={"timings"}) == whole.model_dump(exclude={"timings"})


async def test_a_batch_of_a_completed_backtest_again_publishes_its_outcome_only_if_redelivered(
    ports: Ports,
) -> None:
    # Redelivered: it may be the batch of an owner that stored the result and died before
    # publishing it. Delivered anew (a unit run twice): its progress, not its result.
    body = request()
    first, last = await run_units(ports, await plan(ports, body))
    await handler.handle(first, ports)
    [*_, result, finished] = await handler.handle(last, ports)

    again = await handler.handle(first, ports, redelivered=True)

    assert [(o.exchange, o.message) for o in again] == [
        (topology.RESULTS, result.message),
        (topology.EVENTS, finished.message),
    ]
    [progress] = await handler.handle(last, ports)
    assert (progress.exchange, progress.message.type) == (topology.EVENTS, "unit_done")


async def test_a_failed_unit_fails_the_backtest_with_its_error(ports: Ports) -> None:
    body = request(symbols=["BTCUSDT", "NOPEUSDT"])
    batches = await run_units(ports, await plan(ports, body))
    async with served(ports, "portfolio_sim") as portfolio_sim:
        for batch in batches:
            await portfolio_sim.send(topology.PROPOSALS, batch, body["id"])
        result = await portfolio_sim.take(topology.RESULTS, BacktestResult)

    assert result.status == "failed" and result.metrics is None
    [error] = result.errors
    assert (error.kind, error.symbol) == ("no_data", "NOPEUSDT")


async def test_a_cancel_ends_the_backtest_and_later_batches_change_nothing(ports: Ports) -> None:
    body = request()
    batches = await run_units(ports, await plan(ports, body))
    cancel = CancelRequest(backtest_id=body["id"], reason="wrong symbols")
    async with served(ports, "portfolio_sim") as portfolio_sim:
        await portfolio_sim.send(topology.PROPOSALS, batches[0], body["id"])
        await portfolio_sim.take(topology.EVENTS, BacktestEvent)
        await portfolio_sim.send(topology.CANCEL, cancel, body["id"])
        result = await portfolio_sim.take(topology.RESULTS, BacktestResult)
        finished = await portfolio_sim.take(topology.EVENTS, BacktestEvent)
        await portfolio_sim.send(topology.PROPOSALS, batches[1], body["id"])
        late = await portfolio_sim.take(topology.EVENTS, BacktestEvent)
        await portfolio_sim.nothing_more(topology.RESULTS, topology.EVENTS)

    assert (result.backtest_id, result.status) == (body["id"], "cancelled")
    [error] = result.errors
    assert error.kind == "cancelled"
    assert error.message == f"backtest {body['id']} was cancelled: wrong symbols"
    assert (finished.type, finished.status) == ("finished", "cancelled")
    assert (finished.units_done, finished.unit_count) == (1, 2)
    assert (late.type, late.units_done) == ("unit_done", 2)  # counted, never replayed


async def test_past_the_deadline_the_unfinished_units_fail_and_their_work_stops(
    ports: Ports,
) -> None:
    body = request(deadline_s=30)
    units = await plan(ports, body)
    batches = await run_units(ports, units[:1])
    past = Deadline(backtest_id=body["id"], deadline_ms=int(time.time() * 1000) - 1, deadline_s=30)
    async with served(ports, "portfolio_sim") as portfolio_sim:
        await portfolio_sim.send(topology.PROPOSALS, batches[0], body["id"])
        await portfolio_sim.take(topology.EVENTS, BacktestEvent)
        await portfolio_sim.send(topology.DEADLINES, past, body["id"])  # out of its hold
        result = await portfolio_sim.take(topology.RESULTS, BacktestResult)
        stop = await portfolio_sim.take(topology.CANCEL, CancelRequest)

    assert result.status == "failed"
    [error] = result.errors
    assert (error.kind, error.unit_id, error.symbol) == ("timeout", units[1].unit_id, "ETHUSDT")
    assert "deadline_s 30" in error.message
    assert (stop.backtest_id, stop.reason) == (body["id"], "its deadline passed")


async def test_a_dead_grouped_unit_fails_each_of_its_runs_backtests(ports: Ports) -> None:
    # A sweep's grouped unit that was given up fails each combination it held, naming the
    # unit; the sweep ends with them (no combination completed).
    body = request(symbols=["BTCUSDT"], sweep={"grid": {"fast": [5, 8]}})
    async with served(ports, "scheduler") as scheduler:
        await scheduler.submit(body)
        group = await scheduler.take(topology.WORK, WorkUnit)
    assert group.runs is not None and len(group.runs) == 2
    async with served(ports, "portfolio_sim") as portfolio_sim:
        await portfolio_sim.bus.publish(
            topology.DEAD,
            "",
            group.model_dump_json(by_alias=True).encode(),
            message_id="dead",
            correlation_id=body["id"],
            headers={topology.QUEUE_HEADER: topology.WORK, topology.REASON_HEADER: "it crashed"},
        )
        results = {
            r.backtest_id: r
            for r in [await portfolio_sim.take(topology.RESULTS, BacktestResult) for _ in range(3)]
        }

    assert set(results) == {body["id"], *(r.backtest_id for r in group.runs)}
    assert {r.status for r in results.values()} == {"failed"}
    for run in group.runs:
        [error] = results[run.backtest_id].errors
        assert (error.kind, error.unit_id) == ("internal", run.unit_id)
        assert "dead-lettered from backtest.work" in error.message and "it crashed" in error.message
