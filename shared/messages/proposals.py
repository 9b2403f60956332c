"""``ProposalBatch``: one unit's trade proposals, or its error (symbol_worker → portfolio_sim)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from shared.messages.common import SCHEMA_VERSION, ErrorInfo, Message, Side
from shared.messages.work import WorkUnit

ExitReason = Literal["take_profit", "stop_loss", "signal", "max_holding", "end_of_data"]

#: Where inside a bar an event happens; the timeline sorts on it after the bar time.
#: 0 exits at the open (opposite signal, gap through a level), 1 entries at the open,
#: 2 exits at a level inside the bar (and every exit in the entry bar), 3 exits at the close.
Phase = Literal[0, 1, 2, 3]


class Proposal(Message):
    """A possible trade with its exit already resolved by the trusted worker.

    The portfolio manager decides at replay whether the entry is taken (and how big); a
    rejected entry drops its exit. Prices include slippage.
    """

    id: str  # "<symbol>:<signal_time>:<seq>" – deterministic, so the timeline order is too
    symbol: str
    side: Side = "long"
    signal_time: int
    entry_time: int
    entry_price: float
    exit_time: int
    exit_price: float
    exit_phase: Phase
    exit_reason: ExitReason
    tp_price: float | None = None
    sl_price: float | None = None
    confidence: float = 1.0


class SymbolBars(Message):
    """A symbol's simulated bars as columns: what the portfolio marks equity with."""

    time: list[int]
    close: list[float]


class ProposalBatch(Message):
    """Everything one unit produced. Exactly one of ``bars``/``proposals`` or ``error`` matters:
    a failed unit still sends a batch so the backtest completes (as ``failed``) instead of hanging.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    backtest_id: str
    unit_id: str
    unit_count: int
    symbols: list[str]
    proposals: list[Proposal] = Field(default_factory=list)
    bars: dict[str, SymbolBars] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    unfilled_limits: int = 0
    dropped_signals: int = 0
    elapsed_s: float = 0.0

    @classmethod
    def for_unit(cls, unit: WorkUnit, **fields: Any) -> ProposalBatch:
        """The batch that answers ``unit`` (its ids, count and symbols), with ``fields``."""
        return cls(
            backtest_id=unit.backtest_id,
            unit_id=unit.unit_id,
            unit_count=unit.unit_count,
            symbols=list(unit.symbols),
            **fields,
        )
