"""How a backtest ends: its outcome is stored once, then published with its ``finished`` event.

Several things may end a backtest — its replay finishing, a rejection, a cache hit, and (by
design) anything else that stops it early — and they can race. :meth:`Store.finish` lets the
first outcome win; every path publishes what was stored, so a consumer of
``backtest.results`` never sees two different outcomes for one id. Publishing is
at-least-once: a redelivered message publishes the same stored outcome again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared import topology
from shared.bus import Outgoing
from shared.errors import ErrorKind
from shared.messages import BacktestEvent, BacktestResult, ErrorInfo
from shared.store import Store
from shared.sweep.track import after_end


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
    out = announce(outcome, units_done=units_done, unit_count=unit_count)
    # A sweep's child counts for its sweep (the last builds the sweep's result), and a sweep
    # that ends early ends its children: every ending passes here, so nothing is missed.
    follow = await after_end(store, outcome)
    out += [Outgoing(topology.EVENTS, event, event.backtest_id) for event in follow.events]
    for end in follow.endings:
        out += (
            await finish(store, end.result, units_done=end.units_done, unit_count=end.unit_count)
        )[1]
    return outcome, out


def announce(result: BacktestResult, *, units_done: int = 0, unit_count: int = 0) -> list[Outgoing]:
    """What ending with ``result`` publishes: it on ``backtest.results``, then ``finished``.

    Use :func:`finish`, which stores it first; publishing an outcome without storing it is
    only for when the store itself is out of reach (see :class:`DeadLetter`).
    """
    done = BacktestEvent.finished(
        result.backtest_id, result.status, units_done=units_done, unit_count=unit_count
    )
    return [
        Outgoing(topology.RESULTS, result, result.backtest_id),
        Outgoing(topology.EVENTS, done, result.backtest_id),
    ]


@dataclass(frozen=True)
class DeadLetter:
    """A message of a backtest that was given up (it is in ``backtest.dead``): the backtest
    can never complete, so it ends ``failed``, naming the unit and why.

    :param queue: the queue it was given up from.
    :param reason: why: what could not be decoded, the handler's last exception, the outage.
    :param kind: the error kind the backtest fails with.
    :param unit_id: the unit of a work unit or proposal batch, when it can be read.
    """

    backtest_id: str
    queue: str
    reason: str
    kind: ErrorKind = "internal"
    unit_id: str | None = None

    def failure(self, symbols: Sequence[str] = ()) -> BacktestResult:
        """The failed result; ``symbols``: the unit's, from the plan, when known."""
        what = f"unit {self.unit_id}" if self.unit_id else "a message of this backtest"
        if symbols:
            what += f" ({', '.join(symbols)})"
        error = ErrorInfo(
            kind=self.kind,
            symbol=symbols[0] if len(symbols) == 1 else None,
            unit_id=self.unit_id,
            message=(
                f"{what} was given up and dead-lettered from {self.queue} (operators: see the"
                f" backtest.dead queue): {self.reason}"
            ),
        )
        return BacktestResult(backtest_id=self.backtest_id, status="failed", errors=[error])
