"""``WorkUnit``: one piece of a backtest for one symbol worker (scheduler → symbol_worker)."""

from __future__ import annotations

from collections.abc import Sequence
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


class UnitRun(Message):
    """One backtest's unit in a grouped :class:`WorkUnit`: what differs between the children
    of a sweep that run over the same symbols, window and rules."""

    backtest_id: str
    unit_id: str
    unit_count: Annotated[int, Field(ge=1)]
    strategy: ComponentSpec
    lookback: Annotated[int, Field(ge=1)]
    deadline_ms: int | None = None


class WorkUnit(Message):
    """Run the strategy over ``symbols`` (its ``work_units`` group) and resolve exits.

    ``strategy`` never carries uploaded code, only its ``source_sha256``; the worker fetches the
    code from the source store. ``lookback`` bars before ``start_ms`` are loaded for warm-up.

    A unit with ``runs`` is a group (:meth:`group`): several backtests' units over the same
    symbols, window and rules (a sweep's combinations), run in one delivery so the candles
    are read once and the sandbox stays warm; each run is answered by its own batch.
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
    #: A group's runs, each one backtest's unit (its fields override this message's);
    #: ``None``: the unit is a single run.
    runs: list[UnitRun] | None = None

    @classmethod
    def group(cls, units: Sequence[WorkUnit], *, backtest_id: str, unit_id: str) -> WorkUnit:
        """One message for ``units``, which differ only in :class:`UnitRun`'s fields.

        Its own ``lookback`` is the largest (what is read), its ``deadline_ms`` the latest;
        ``backtest_id`` (the sweep's) routes it.
        """
        first = units[0]
        deadlines = [u.deadline_ms for u in units if u.deadline_ms is not None]
        return first.model_copy(
            update={
                "backtest_id": backtest_id,
                "unit_id": unit_id,
                "unit_count": len(units),
                "lookback": max(u.lookback for u in units),
                "deadline_ms": max(deadlines) if len(deadlines) == len(units) else None,
                "runs": [
                    UnitRun(**{f: getattr(u, f) for f in UnitRun.model_fields}) for u in units
                ],
            }
        )

    def each(self) -> list[WorkUnit]:
        """The single units this message stands for: itself, or one per run of a group."""
        if self.runs is None:
            return [self]
        return [
            self.model_copy(
                update={**{f: getattr(run, f) for f in UnitRun.model_fields}, "runs": None}
            )
            for run in self.runs
        ]
