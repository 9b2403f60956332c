"""``BacktestEvent``: progress and status changes, for progress bars (``backtest.events``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.messages.common import SCHEMA_VERSION, Message
from shared.messages.results import Status

EventType = Literal["planned", "unit_done", "finished"]


class BacktestEvent(Message):
    """``units_done`` of ``unit_count`` are in; ``status`` is set once the backtest finished."""

    schema_version: Literal[1] = SCHEMA_VERSION
    backtest_id: str
    type: EventType
    units_done: int
    unit_count: int
    unit_id: str | None = None
    symbols: list[str] = Field(default_factory=list)
    status: Status | None = None
    message: str = ""
