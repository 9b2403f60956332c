"""``BacktestEvent``: progress and status changes, for progress bars (``backtest.events``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.messages.common import SCHEMA_VERSION, Message
from shared.messages.proposals import ProposalBatch
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

    @classmethod
    def planned(cls, backtest_id: str, *, unit_count: int, symbols: list[str]) -> BacktestEvent:
        """The first event: the backtest's ``unit_count`` units are published."""
        return cls(
            backtest_id=backtest_id,
            type="planned",
            units_done=0,
            unit_count=unit_count,
            symbols=symbols,
        )

    @classmethod
    def unit_done(cls, batch: ProposalBatch, *, units_done: int) -> BacktestEvent:
        """``batch``'s unit is in (stored), the ``units_done``-th of its backtest."""
        return cls(
            backtest_id=batch.backtest_id,
            type="unit_done",
            units_done=units_done,
            unit_count=batch.unit_count,
            unit_id=batch.unit_id,
            symbols=batch.symbols,
            message=batch.error.message if batch.error else "",
        )

    def after(self, previous: BacktestEvent | None) -> BacktestEvent:
        """This event as a follower shows it after ``previous``: with ``units_done`` never
        going back. Several portfolio_sim handlers publish at once, so a ``unit_done`` counted
        2 can arrive after one counted 3: it still names its own unit, with the count 3."""
        if previous is None or previous.units_done <= self.units_done:
            return self
        return self.model_copy(update={"units_done": previous.units_done})

    @classmethod
    def finished(
        cls, backtest_id: str, status: Status, *, units_done: int = 0, unit_count: int = 0
    ) -> BacktestEvent:
        """The last event of a backtest: progress followers stop at it."""
        return cls(
            backtest_id=backtest_id,
            type="finished",
            units_done=units_done,
            unit_count=unit_count,
            status=status,
        )
