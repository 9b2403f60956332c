"""A sweep's bookkeeping as its backtests end: what :func:`shared.outcome.finish` does next.

- A child ended: it is counted for its sweep (:meth:`Store.sweep_child_done`, idempotent,
  so a redelivered ending counts once), the sweep gets a progress event in combinations
  done, and the last child's ending builds the sweep's result (:mod:`.rank`).
- A sweep ended other than ``completed`` (cancelled, rejected, past its deadline): its
  children that had started and not ended end ``cancelled`` too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.messages import BacktestEvent, BacktestResult, ErrorInfo
from shared.sweep.expand import parent_of
from shared.sweep.rank import sweep_result

if TYPE_CHECKING:
    from shared.store import Store


@dataclass(frozen=True)
class Ending:
    """A backtest to end now, with its progress counts for its ``finished`` event."""

    result: BacktestResult
    units_done: int = 0
    unit_count: int = 0


@dataclass(frozen=True)
class Followups:
    """What ending a backtest sets off for a sweep: events to publish, backtests to end."""

    events: list[BacktestEvent] = field(default_factory=list)
    endings: list[Ending] = field(default_factory=list)


async def after_end(store: Store, outcome: BacktestResult) -> Followups:
    """What ``outcome`` (just stored) means for a sweep, if it is one or belongs to one."""
    parent = parent_of(outcome.backtest_id)
    if parent is not None:
        return await _child_ended(store, parent, outcome)
    if outcome.status != "completed":
        return await _sweep_ended(store, outcome)
    return Followups()


async def _child_ended(store: Store, parent: str, outcome: BacktestResult) -> Followups:
    plan = await store.get_sweep(parent)
    if plan is None or await store.ended(parent):
        return Followups()  # not a sweep's child after all, or its sweep is over
    done = await store.sweep_child_done(parent, outcome.backtest_id)
    total = len(plan.children)
    progress = BacktestEvent(
        backtest_id=parent,
        type="unit_done",
        units_done=done,
        unit_count=total,
        unit_id=outcome.backtest_id,
        status=outcome.status,
        message=outcome.errors[0].message if outcome.errors else "",
    )
    if done < total:
        return Followups(events=[progress])
    ids = [child.backtest_id for child in plan.children]
    found = await asyncio.gather(*(store.get_result(i) for i in ids))
    outcomes = {i: r for i, r in zip(ids, found, strict=True) if r is not None}
    result = sweep_result(plan, outcomes)
    return Followups(events=[progress], endings=[Ending(result, done, total)])


async def _sweep_ended(store: Store, outcome: BacktestResult) -> Followups:
    plan = await store.get_sweep(outcome.backtest_id)
    if plan is None:
        return Followups()
    reason = outcome.errors[0].message if outcome.errors else outcome.status
    endings = []
    for child in plan.children:
        if await store.get_accepted(child.backtest_id) is None:
            continue  # never started
        if await store.ended(child.backtest_id):
            continue
        error = ErrorInfo(
            kind="cancelled",
            message=f"backtest {child.backtest_id} ended with its sweep: {reason}",
        )
        result = BacktestResult(backtest_id=child.backtest_id, status="cancelled", errors=[error])
        endings.append(Ending(result))
    return Followups(endings=endings)
