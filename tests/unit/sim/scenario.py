"""Tiny hand-made markets for the semantics tests: bars as (open, high, low, close) rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from shared.candles import SymbolCandles
from shared.messages import BacktestRequest, BacktestResult, ExecutionRules, ProposalBatch, WorkUnit
from shared.sim import resolve_unit, simulate
from shared.strategy import signal_columns

H = 3_600_000
T0 = 1_609_459_200_000  # 2021-01-01T00:00Z

OHLC = tuple[float, float, float, float]


def t(i: int) -> int:
    """Open time of bar ``i``."""
    return T0 + i * H


def request(symbols: list[str], **overrides: Any) -> BacktestRequest:
    fields: dict[str, Any] = {
        "id": "test",
        "strategy": {"builtin": "sma_cross"},
        "symbols": symbols,
        "interval": "1h",
        "start": "2021-01-01T00:00:00Z",
        "end": "2022-01-01T00:00:00Z",
        "initial_cash": 10_000.0,
        "fee_rate": 0.001,
        "min_notional": 10.0,
    }
    fields.update(overrides)
    return BacktestRequest.model_validate(fields)


def batch(
    req: BacktestRequest,
    symbol: str,
    rows: list[OHLC],
    signals: dict[int, dict[str, Any]],
    *,
    offset: int = 0,
    unit: int = 0,
) -> ProposalBatch:
    """Resolve ``signals`` (bar index → record without ``t``) on ``rows`` as a worker would."""
    records = [{"t": t(offset + i), **rec} for i, rec in sorted(signals.items())]
    return resolve(req, symbol, rows, signal_columns(records), offset=offset, unit=unit)


def resolve(
    req: BacktestRequest,
    symbol: str,
    rows: list[OHLC],
    raw: Any,
    *,
    offset: int = 0,
    unit: int = 0,
) -> ProposalBatch:
    """Resolve ``raw``, what a sandbox returned for ``symbol`` (untrusted), on ``rows``."""
    arr = np.asarray(rows, dtype=np.float64)
    times = np.asarray([t(offset + i) for i in range(len(rows))], dtype=np.int64)
    frame = pd.DataFrame(
        {
            "open_time": times,
            "open": arr[:, 0],
            "high": arr[:, 1],
            "low": arr[:, 2],
            "close": arr[:, 3],
        }
    )
    work = WorkUnit(
        backtest_id=req.id,
        unit_id=f"u{unit:04d}",
        unit_count=len(req.symbols),
        symbols=[symbol],
        interval=req.interval,
        start_ms=int(times[0]),
        end_ms=int(times[-1]) + H,
        lookback=1,
        strategy=req.strategy,
        rules=ExecutionRules(
            slippage_bps=req.slippage_bps,
            tie_break=req.tie_break,
            max_holding_bars=req.max_holding_bars,
        ),
        timeout_s=req.unit_timeout_s,
    )
    return resolve_unit(work, {symbol: SymbolCandles(frame, 0)}, {symbol: raw})


def backtest(
    markets: dict[str, tuple[list[OHLC], dict[int, dict[str, Any]]]], **overrides: Any
) -> BacktestResult:
    req = request(sorted(markets), **overrides)
    batches = [
        batch(req, s, rows, sigs, unit=i)
        for i, (s, (rows, sigs)) in enumerate(sorted(markets.items()))
    ]
    result, _ = simulate(req, batches)
    return result


def buy(
    tp: float | None = None, sl: float | None = None, entry: float | None = None
) -> dict[str, Any]:
    return {"signal": "BUY", "tp_price": tp, "sl_price": sl, "entry_price": entry}


SELL: dict[str, Any] = {"signal": "SELL"}
FLAT: OHLC = (100.0, 100.0, 100.0, 100.0)
