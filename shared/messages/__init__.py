"""The wire contracts: pydantic models, JSON on the wire, versioned by ``SCHEMA_VERSION``."""

from shared.messages.common import (
    MAX_SOURCE_BYTES,
    SCHEMA_VERSION,
    ComponentSpec,
    ErrorInfo,
    Message,
    describe_validation_error,
    rejection,
)
from shared.messages.control import CancelRequest, Deadline
from shared.messages.events import BacktestEvent
from shared.messages.plan import Plan, WalRecord
from shared.messages.proposals import ExitReason, Phase, Proposal, ProposalBatch, SymbolBars
from shared.messages.requests import (
    BACKTEST_ID,
    LOWER_IS_BETTER,
    BacktestRequest,
    Metric,
    Sweep,
    TieBreak,
    is_backtest_id,
    new_backtest_id,
    peek_id,
)
from shared.messages.results import (
    BacktestResult,
    Fold,
    Metrics,
    Ranked,
    Status,
    SweepResult,
    SymbolMetrics,
    Trade,
    WalSummary,
)
from shared.messages.work import ExecutionRules, UnitRun, WorkUnit

__all__ = [
    "BACKTEST_ID",
    "LOWER_IS_BETTER",
    "MAX_SOURCE_BYTES",
    "SCHEMA_VERSION",
    "BacktestEvent",
    "BacktestRequest",
    "BacktestResult",
    "CancelRequest",
    "ComponentSpec",
    "Deadline",
    "ErrorInfo",
    "ExecutionRules",
    "ExitReason",
    "Fold",
    "Message",
    "Metric",
    "Metrics",
    "Phase",
    "Plan",
    "Proposal",
    "ProposalBatch",
    "Ranked",
    "Status",
    "Sweep",
    "SweepResult",
    "SymbolBars",
    "SymbolMetrics",
    "TieBreak",
    "Trade",
    "UnitRun",
    "WalRecord",
    "WalSummary",
    "WorkUnit",
    "describe_validation_error",
    "is_backtest_id",
    "new_backtest_id",
    "peek_id",
    "rejection",
]
