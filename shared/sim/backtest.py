"""Every unit's batches → the backtest's result: what the portfolio simulator runs once the
last batch is in."""

from __future__ import annotations

import time

from shared.intervals import interval_ms
from shared.messages import (
    BacktestRequest,
    BacktestResult,
    ProposalBatch,
    Status,
    WalRecord,
    WalSummary,
)
from shared.sim.metrics import compute_metrics, equity_points
from shared.sim.portfolio import load_portfolio
from shared.sim.replay import Costs, MarkBars, WalLog, replay


def simulate(
    request: BacktestRequest, batches: list[ProposalBatch], *, log: WalLog | None = None
) -> tuple[BacktestResult, list[WalRecord]]:
    """Replay every unit's proposals through the request's portfolio: the result and its WAL.

    A batch with an error makes the result ``failed`` (``cancelled`` if a unit was stopped by
    a cancellation), carrying every unit's error, with no replay.

    :param log: given each WAL record as the replay makes it (see :func:`replay`).
    """
    started = time.perf_counter()
    errors = [b.error for b in sorted(batches, key=lambda b: b.unit_id) if b.error is not None]
    if errors:
        # A unit stopped by a cancellation may come in before the cancellation is stored.
        cancelled = any(e.kind == "cancelled" for e in errors)
        status: Status = "cancelled" if cancelled else "failed"
        return BacktestResult(backtest_id=request.id, status=status, errors=errors), []
    manager = load_portfolio(request.portfolio)
    proposals = [p for b in batches for p in b.proposals]
    bars = {s: MarkBars(*b.columns()) for batch in batches for s, b in batch.bars.items()}
    run = replay(
        proposals,
        bars,
        manager,
        Costs(request.initial_cash, request.fee_rate, request.min_notional),
        log=log,
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
        ),
        timings={
            "replay_s": time.perf_counter() - started,
            "units_s": sum(b.elapsed_s for b in batches),
        },
    )
    return result, run.wal
