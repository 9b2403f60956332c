"""Metrics of a replay. Each definition is written out in the README; keep them in step."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from shared.messages import Metrics, SymbolMetrics, Trade
from shared.sim.replay import Replay

DAY_MS = 86_400_000
YEAR_DAYS = 365  # crypto trades every day: the same year for CAGR as for √365 annualising
MAX_EQUITY_POINTS = 10_000


def compute_metrics(
    run: Replay, *, initial_cash: float, interval_ms: int
) -> tuple[Metrics, dict[str, SymbolMetrics]]:
    """Portfolio metrics and the per-symbol trade metrics of one replay."""
    equity = run.equity
    final = float(equity[-1]) if len(equity) else initial_cash
    daily = _daily_returns(run.grid, equity, initial_cash)
    cagr = _cagr(run.grid, final, initial_cash, interval_ms)
    max_dd = _max_drawdown(equity, initial_cash)
    trade_stats = _trade_stats(run.trades)
    rejected = {s: sum(r.values()) for s, r in run.rejected.items()}
    metrics = Metrics(
        initial_cash=initial_cash,
        final_equity=final,
        total_return=final / initial_cash - 1,
        cagr=cagr,
        sharpe=_sharpe(daily),
        sortino=_sortino(daily),
        max_drawdown=max_dd,
        calmar=cagr / max_dd if cagr is not None and max_dd > 0 else None,
        exposure=float(run.exposed.mean()) if len(run.exposed) else 0.0,
        trade_count=len(run.trades),
        fees_paid=math.fsum(t.fees for t in run.trades),
        rejected_entries=sum(rejected.values()),
        **trade_stats,
    )
    per_symbol = {}
    for symbol in sorted(run.symbol_exposure):
        trades = [t for t in run.trades if t.symbol == symbol]
        per_symbol[symbol] = SymbolMetrics(
            trade_count=len(trades),
            pnl=math.fsum(t.pnl for t in trades),
            fees_paid=math.fsum(t.fees for t in trades),
            exposure=run.symbol_exposure[symbol],
            rejected_entries=rejected.get(symbol, 0),
            **_trade_stats(trades),
        )
    return metrics, per_symbol


def equity_points(run: Replay) -> list[tuple[int, float]]:
    """At most 10,000 (time, equity) points: every bar when that fits, else evenly spaced."""
    n = len(run.grid)
    if n <= MAX_EQUITY_POINTS:
        idx = np.arange(n)
    else:
        idx = np.unique(np.linspace(0, n - 1, MAX_EQUITY_POINTS).round().astype(np.int64))
    return list(zip(run.grid[idx].tolist(), run.equity[idx].tolist(), strict=True))


def _trade_stats(trades: Sequence[Trade]) -> dict[str, float | None]:
    if not trades:
        return {"win_rate": None, "profit_factor": None, "expectancy": None}
    pnl = [t.pnl for t in trades]
    gross_win = math.fsum(p for p in pnl if p > 0)
    gross_loss = -math.fsum(p for p in pnl if p < 0)
    return {
        "win_rate": sum(p > 0 for p in pnl) / len(pnl),
        "profit_factor": gross_win / gross_loss if gross_loss > 0 else None,
        "expectancy": math.fsum(pnl) / len(pnl),
    }


def _daily_returns(
    grid: npt.NDArray[np.int64], equity: npt.NDArray[np.float64], initial_cash: float
) -> npt.NDArray[np.float64]:
    """Returns of the last equity of each UTC day, the first day against the initial cash."""
    if not len(grid):
        return np.empty(0)
    day = grid // DAY_MS
    last_of_day = np.flatnonzero(np.append(day[1:] != day[:-1], True))
    closes = np.concatenate([[initial_cash], equity[last_of_day]])
    return np.asarray(closes[1:] / closes[:-1] - 1, dtype=np.float64)


def _sharpe(r: npt.NDArray[np.float64]) -> float | None:
    if len(r) < 2:
        return None
    sd = float(np.std(r, ddof=1))
    return float(np.mean(r)) / sd * math.sqrt(YEAR_DAYS) if sd > 0 else None


def _sortino(r: npt.NDArray[np.float64]) -> float | None:
    if len(r) < 2:
        return None
    downside = math.sqrt(float(np.mean(np.minimum(r, 0.0) ** 2)))
    return float(np.mean(r)) / downside * math.sqrt(YEAR_DAYS) if downside > 0 else None


def _cagr(
    grid: npt.NDArray[np.int64], final: float, initial_cash: float, interval_ms: int
) -> float | None:
    """Compound annual growth over the simulated span: first bar's open to last bar's close."""
    if not len(grid) or final <= 0:
        return None
    years = (int(grid[-1]) + interval_ms - int(grid[0])) / (YEAR_DAYS * DAY_MS)
    return float((final / initial_cash) ** (1 / years) - 1)


def _max_drawdown(equity: npt.NDArray[np.float64], initial_cash: float) -> float:
    """Largest fall from a running peak, as a fraction of that peak (0.25 = 25 %)."""
    curve = np.concatenate([[initial_cash], equity])
    peak = np.maximum.accumulate(curve)
    return float(np.max((peak - curve) / peak))
