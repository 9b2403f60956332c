"""``BacktestResult``: the answer (portfolio_sim or scheduler → ``backtest.results``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from shared.messages.common import SCHEMA_VERSION, ErrorInfo, Message, Side
from shared.messages.proposals import ExitReason

Status = Literal["completed", "failed", "rejected", "cancelled"]


class Trade(Message):
    """A filled round trip. Times are bar open times (ms, UTC); ``pnl`` is net of both fees."""

    symbol: str
    side: Side
    entry_time: int
    entry_price: float
    exit_time: int
    exit_price: float
    quantity: float
    fees: float
    pnl: float
    exit_reason: ExitReason


class Metrics(Message):
    """Portfolio metrics; the README defines each. ``None`` where a value is undefined."""

    initial_cash: float
    final_equity: float
    total_return: float
    cagr: float | None
    sharpe: float | None
    sortino: float | None
    max_drawdown: float
    calmar: float | None
    win_rate: float | None
    profit_factor: float | None
    expectancy: float | None
    exposure: float
    trade_count: int
    fees_paid: float
    rejected_entries: int


class SymbolMetrics(Message):
    """The trade-based subset of :class:`Metrics` for one symbol."""

    trade_count: int
    win_rate: float | None
    profit_factor: float | None
    expectancy: float | None
    pnl: float
    fees_paid: float
    exposure: float
    rejected_entries: int


class WalSummary(Message):
    """What the write-ahead log of the replay holds, in counts."""

    #: Records in the WAL: every entry (accepted or rejected) and every exit.
    events: int
    #: Entries the portfolio took; each became a trade (its exit was resolved with it).
    entries_accepted: int
    #: Entries the portfolio refused, by reason.
    entries_rejected: dict[str, int]

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        """Results stored before ``exits`` was dropped (it always equalled
        ``entries_accepted``) still read."""
        if isinstance(data, dict) and "exits" in data:
            return {key: value for key, value in data.items() if key != "exits"}
        return data


class BacktestResult(Message):
    """The outcome of one backtest. ``errors`` explains any status other than ``completed``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    backtest_id: str
    status: Status
    errors: list[ErrorInfo] = Field(default_factory=list)
    metrics: Metrics | None = None
    per_symbol: dict[str, SymbolMetrics] = Field(default_factory=dict)
    trades: list[Trade] = Field(default_factory=list)
    equity_curve: list[tuple[int, float]] = Field(default_factory=list)
    wal: WalSummary | None = None
    cache_hit: bool = False
    timings: dict[str, float] = Field(default_factory=dict)
