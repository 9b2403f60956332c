"""Portfolio simulator: collects a backtest's batches; the last one in triggers the replay."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np

from shared import topology
from shared.bus import Outgoing
from shared.intervals import interval_ms
from shared.messages import (
    BacktestEvent,
    BacktestRequest,
    BacktestResult,
    ProposalBatch,
    WalSummary,
)
from shared.outcome import DeadLetter, finish
from shared.ports import Ports
from shared.sim import (
    BUILTIN_PORTFOLIOS,
    Costs,
    MarkBars,
    compute_metrics,
    equity_points,
    replay,
)
from shared.strategy import load_component


async def handle(batch: ProposalBatch, ports: Ports) -> list[Outgoing]:
    """Store ``batch`` (idempotently); when it completes the set, replay and publish the result."""
    done = await ports.store.add_batch(batch)
    progress = BacktestEvent(
        backtest_id=batch.backtest_id,
        type="unit_done",
        units_done=done,
        unit_count=batch.unit_count,
        unit_id=batch.unit_id,
        symbols=batch.symbols,
        message=batch.error.message if batch.error else "",
    )
    out = [Outgoing(topology.EVENTS, progress, batch.backtest_id)]
    if done < batch.unit_count or not await ports.store.claim(batch.backtest_id):
        return out
    plan = await ports.store.get_plan(batch.backtest_id)
    if plan is None:
        raise LookupError(f"backtest {batch.backtest_id} has batches but no stored plan")
    request = BacktestRequest.model_validate_json(json.dumps(plan["request"]))
    batches = await ports.store.batches(batch.backtest_id)
    result, wal = await asyncio.to_thread(simulate, request, batches)
    if wal:
        await ports.store.put_wal(request.id, wal)
    outcome, finished = await finish(
        ports.store, result, units_done=done, unit_count=batch.unit_count
    )
    if outcome is result and result.status == "completed" and plan.get("cache_key"):
        await ports.store.put_cached(plan["cache_key"], result)
    return [*out, *finished]


async def end_dead_letter(letter: DeadLetter, ports: Ports) -> list[Outgoing]:
    """A message of the backtest was given up: end the backtest ``failed`` now, naming the
    unit and why (it could never complete, and must not leave its user waiting)."""
    if await ports.store.get_result(letter.backtest_id) is not None:
        return []  # it has ended already
    plan = await ports.store.get_plan(letter.backtest_id)
    units: dict[str, list[str]] = plan.get("units", {}) if plan else {}
    result = letter.failure(units.get(letter.unit_id or "", []))
    _, out = await finish(
        ports.store,
        result,
        units_done=await ports.store.units_done(letter.backtest_id) if plan else 0,
        unit_count=len(units),
    )
    return out


def simulate(
    request: BacktestRequest, batches: list[ProposalBatch]
) -> tuple[BacktestResult, list[dict[str, Any]]]:
    """Replay every unit's proposals through the request's portfolio: the result and its WAL."""
    started = time.perf_counter()
    errors = [b.error for b in sorted(batches, key=lambda b: b.unit_id) if b.error is not None]
    if errors:
        return BacktestResult(backtest_id=request.id, status="failed", errors=errors), []
    spec = request.portfolio
    manager = load_component(
        spec.loader_spec(), registry=BUILTIN_PORTFOLIOS, kind="portfolio", params=spec.params
    )
    proposals = [p for b in batches for p in b.proposals]
    bars = {
        s: MarkBars(np.asarray(b.time, dtype=np.int64), np.asarray(b.close, dtype=np.float64))
        for batch in batches
        for s, b in batch.bars.items()
    }
    run = replay(
        proposals,
        bars,
        manager,
        Costs(request.initial_cash, request.fee_rate, request.min_notional),
    )
    metrics, per_symbol = compute_metrics(
        run, initial_cash=request.initial_cash, interval_ms=interval_ms(request.interval)
    )
    rejected: dict[str, int] = {}
    for reasons in run.rejected.values():
        for reason, count in reasons.items():
            rejected[reason] = rejected.get(reason, 0) + count
    result = BacktestResult(
        backtest_id=request.id,
        status="completed",
        metrics=metrics,
        per_symbol=per_symbol,
        trades=run.trades,
        equity_curve=equity_points(run),
        wal=WalSummary(
            events=len(run.wal),
            entries_accepted=len(run.trades),
            entries_rejected=dict(sorted(rejected.items())),
            exits=len(run.trades),
        ),
        timings={
            "replay_s": time.perf_counter() - started,
            "units_s": sum(b.elapsed_s for b in batches),
        },
    )
    return result, run.wal
