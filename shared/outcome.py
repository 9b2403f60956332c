"""How a backtest ends: its outcome is stored once, then published with its ``finished`` event.

Several things may end a backtest — its replay finishing, a rejection, a cache hit, and (by
design) anything else that stops it early — and they can race. :meth:`Store.finish` lets the
first outcome win; every path publishes what was stored, so a consumer of
``backtest.results`` never sees two different outcomes for one id. Publishing is
at-least-once: a redelivered message publishes the same stored outcome again.
"""

from __future__ import annotations

from shared import topology
from shared.bus import Outgoing
from shared.messages import BacktestEvent, BacktestResult, Status
from shared.store import Store


def finished_event(
    backtest_id: str, status: Status, *, units_done: int, unit_count: int
) -> BacktestEvent:
    """The last event of a backtest: progress followers stop at it."""
    return BacktestEvent(
        backtest_id=backtest_id,
        type="finished",
        units_done=units_done,
        unit_count=unit_count,
        status=status,
    )


async def finish(
    store: Store, result: BacktestResult, *, units_done: int = 0, unit_count: int = 0
) -> tuple[BacktestResult, list[Outgoing]]:
    """End the backtest with ``result`` unless it has ended already.

    Returns the outcome that stands (``result``, or the one stored first) and what to
    publish: that outcome on ``backtest.results`` and its ``finished`` event. The backtest
    stops counting against its tenant's quota here (after its outcome is stored, so a crash
    in between is healed by the quota itself: see :meth:`Store.admit`).
    """
    outcome = await store.finish(result)
    await store.release(outcome.backtest_id)
    done = finished_event(
        outcome.backtest_id, outcome.status, units_done=units_done, unit_count=unit_count
    )
    return outcome, [
        Outgoing(topology.RESULTS, outcome, outcome.backtest_id),
        Outgoing(topology.EVENTS, done, outcome.backtest_id),
    ]
