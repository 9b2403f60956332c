"""``BacktestResult``: the answer (portfolio_sim or scheduler → ``backtest.results``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, JsonValue, model_validator

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


class Ranked(Message):
    """One combination of a sweep, where the metric puts it (1 is best), with its outcome."""

    rank: int
    #: The backtest this combination ran as (the sweep's id, ``:`` and a suffix).
    backtest_id: str
    params: dict[str, JsonValue]
    status: Status
    #: The value ranked by (``None``: undefined for this run, or it did not complete).
    value: float | None
    metrics: Metrics | None = None
    errors: list[ErrorInfo] = Field(default_factory=list)


class Fold(Message):
    """One walk-forward step: the combinations ranked on the train window, the best one's
    out-of-sample run on the test window after it. Times are ms since the epoch, UTC."""

    train_start: int
    train_end: int
    test_start: int
    test_end: int
    #: The train window's ranking.
    ranking: list[Ranked]
    #: The best combination's params; ``None`` when no combination completed on the train.
    params: dict[str, JsonValue] | None
    #: The chosen combination's run on the test window (``None`` without a choice).
    test: Ranked | None


class SweepResult(Message):
    """What a sweep found; the ``BacktestResult`` carrying it is the best combination's."""

    metric: str
    combinations: int
    #: Every combination, best first; over the whole range (empty for a walk-forward).
    ranking: list[Ranked] = Field(default_factory=list)
    walk_forward: list[Fold] | None = None
    #: The folds' test equity curves stitched end to end (each scaled to start where the one
    #: before ended): the strategy as walk-forward would have traded it.
    oos_equity: list[tuple[int, float]] = Field(default_factory=list)


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
    #: A sweep's ranking (and walk-forward folds); ``None`` for a single backtest.
    sweep: SweepResult | None = None
