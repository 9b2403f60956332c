"""``WorkUnit``: one piece of a backtest for one symbol worker (scheduler → symbol_worker)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from shared.intervals import Interval
from shared.messages.common import SCHEMA_VERSION, ComponentSpec, Message, Symbol
from shared.messages.requests import TieBreak


class ExecutionRules(Message):
    """What the trusted worker needs to turn signals into proposals with resolved exits."""

    slippage_bps: float = 0.0
    tie_break: TieBreak = "stop_loss_first"
    max_holding_bars: int | None = None


class WorkUnit(Message):
    """Run the strategy over ``symbols`` (its ``work_units`` group) and resolve exits.

    ``strategy`` never carries uploaded code, only its ``source_sha256``; the worker fetches the
    code from the source store. ``lookback`` bars before ``start_ms`` are loaded for warm-up.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    backtest_id: str
    unit_id: str
    unit_count: Annotated[int, Field(ge=1)]
    symbols: Annotated[list[Symbol], Field(min_length=1)]
    interval: Interval
    start_ms: int
    end_ms: int
    lookback: Annotated[int, Field(ge=1)]
    strategy: ComponentSpec
    rules: ExecutionRules
    timeout_s: float
    #: The backtest's deadline, ms since the epoch: the unit is not started past it, and its
    #: sandbox call is stopped at it.
    deadline_ms: int | None = None
    #: The sandbox session to run in (a sweep's, shared by its children); ``None``: the
    #: backtest's own id.
    session: str | None = None
