"""Portfolio simulator: collects a backtest's batches; the last one in triggers the replay.

Whoever handles a last batch runs the replay if it gets the lease (:meth:`Store.claim`),
renewing it while the replay runs and writing the WAL ahead (:mod:`.wal`). The owner keeps
the batch it claimed with unacknowledged until the result is stored and published, so if it
dies that batch comes back, redelivered. A redelivered last batch that finds the lease held
waits for the owner's result, or for the lease to lapse (the owner is dead: this may be its
batch) and then takes the replay over from the stored WAL. A first delivery that finds the
lease held is acked at once: the owner's own batch answers for the backtest.

It also ends backtests early: on a :class:`CancelRequest` (``cancelled``) and when a
backtest's :class:`Deadline` timer comes due (``failed``, kind ``timeout``). Every ending
goes through :func:`shared.outcome.finish`, so whichever comes first stands.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import structlog

from services.portfolio_sim.lease import HeldLease, LeaseLost
from services.portfolio_sim.wal import WalWriter
from shared import topology
from shared.bus import Outgoing
from shared.messages import (
    BacktestEvent,
    BacktestResult,
    CancelRequest,
    Deadline,
    ErrorInfo,
    ProposalBatch,
)
from shared.outcome import DeadLetter, finish
from shared.ports import Ports
from shared.sim import simulate
from shared.store import Store
from shared.tenancy import ANONYMOUS

log = structlog.get_logger(__name__)

#: Shortest wait between two looks at a lease someone else holds (their clock may lag ours).
_MIN_WAIT_S = 0.1


async def handle(
    batch: ProposalBatch, ports: Ports, *, redelivered: bool = False
) -> list[Outgoing]:
    """Store ``batch`` (idempotently); when it completes the set, replay and publish the result.

    :param redelivered: the broker delivered ``batch`` before (it may be a dead owner's).
    """
    store, backtest_id = ports.store, batch.backtest_id
    if redelivered and await store.ended(backtest_id):
        # It may be the batch of an owner that stored the outcome and died before
        # publishing it (a completed backtest's batches may be gone with its outcome, see
        # Store.finish, so it would not be counted as the last): the outcome goes out again.
        return await _ended_again(store, batch)
    done = await store.add_batch(batch)
    progress = BacktestEvent.unit_done(batch, units_done=done)
    out = [Outgoing(topology.EVENTS, progress, backtest_id)]
    if done < batch.unit_count:
        return out
    if not redelivered and await store.ended(backtest_id):
        return out  # ended early (cancelled, past its deadline): that ending was announced
    # One owner per attempt, not per process: two deliveries here may race for the lease.
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    while True:
        lease = await store.claim(backtest_id, owner)
        # Asked cheaply first (ended() need not read every result stored), but read outright
        # for a redelivered batch: it may be an owner's that died after storing the outcome,
        # before releasing the backtest (which ended() waits for).
        ended = redelivered or await store.ended(backtest_id) is not None
        stored = await store.get_result(backtest_id) if ended else None
        if stored is not None:  # ended meanwhile (its replay, a cancellation): publish it again
            _, again = await finish(store, stored, units_done=done, unit_count=batch.unit_count)
            return [*out, *again]
        if lease.owner == owner:
            try:
                return [*out, *await _replay(store, backtest_id, owner, done, batch.unit_count)]
            except LeaseLost as exc:
                log.warning("replay lease lost; claiming again", reason=str(exc))
                continue
        expires_in = lease.expires_at - time.time()
        if not redelivered:  # not the owner's batch: that one, unacked, answers for it
            log.info("replay held elsewhere", holder=lease.owner, expires_in_s=expires_in)
            return out
        log.info("replay held elsewhere; waiting", holder=lease.owner, expires_in_s=expires_in)
        await asyncio.sleep(max(_MIN_WAIT_S, min(expires_in, store.lease_s / 3)))


async def _ended_again(store: Store, batch: ProposalBatch) -> list[Outgoing]:
    """The stored outcome of ``batch``'s ended backtest, ended again (:func:`finish`: so
    whatever an owner that died right after storing it did not do is done) and published."""
    stored = await store.get_result(batch.backtest_id)
    if stored is None:  # pragma: no cover - an outcome is never deleted while in use
        return []
    completed = stored.status == "completed"
    done = batch.unit_count if completed else await store.units_done(batch.backtest_id)
    _, out = await finish(store, stored, units_done=done, unit_count=batch.unit_count)
    return out


async def _replay(
    store: Store, backtest_id: str, owner: str, units_done: int, unit_count: int
) -> list[Outgoing]:
    """Run the replay under ``owner``'s lease, WAL first; store and announce its result."""
    started = time.perf_counter()
    async with HeldLease(store, backtest_id, owner) as lease:
        plan = await store.get_plan(backtest_id)
        if plan is None:
            raise LookupError(f"backtest {backtest_id} has batches but no stored plan")
        batches = await store.batches(backtest_id)
        stored = await store.get_wal(backtest_id)
        read_s = time.perf_counter() - started
        log.info("replaying", owner=owner, wal_stored=len(stored), read_s=round(read_s, 3))
        wal = WalWriter(
            store, backtest_id, stored, check=lease.check, loop=asyncio.get_running_loop()
        )
        try:
            result, _ = await asyncio.to_thread(simulate, plan.request, batches, log=wal)
        except asyncio.CancelledError:
            wal.stop()
            raise
        await wal.close()
        await lease.confirm()  # still ours: nobody took over while it ran
    log.info(
        "replayed",
        wal_verified=wal.verified,
        wal_appended=wal.appended,
        replay_s=round(time.perf_counter() - started - read_s, 3),
    )
    outcome, finished = await finish(store, result, units_done=units_done, unit_count=unit_count)
    if outcome is result and result.status == "completed":
        await store.put_cached(plan.cache_key, result)
    return finished


async def end_dead_letter(letter: DeadLetter, ports: Ports) -> list[Outgoing]:
    """A message of the backtest was given up: end the backtest ``failed`` now, naming the
    unit and why (it could never complete, and must not leave its user waiting)."""
    if await ports.store.get_result(letter.backtest_id) is not None:
        return []  # it has ended already
    plan = await ports.store.get_plan(letter.backtest_id)
    units = plan.units if plan else {}
    result = letter.failure(units.get(letter.unit_id or "", []))
    _, out = await finish(
        ports.store,
        result,
        units_done=await ports.store.units_done(letter.backtest_id) if plan else 0,
        unit_count=len(units),
    )
    return out


async def cancel(request: CancelRequest, ports: Ports) -> list[Outgoing]:
    """End the backtest ``cancelled`` unless it has ended already (then nothing changes).

    The symbol workers hear the same message and stop its sandboxes; its queued units are
    skipped once they see the stored outcome.
    """
    why = f": {request.reason}" if request.reason else ""
    message = f"backtest {request.backtest_id} was cancelled{why}"
    error = ErrorInfo(kind="cancelled", message=message)
    result = BacktestResult(backtest_id=request.backtest_id, status="cancelled", errors=[error])
    plan = await ports.store.get_plan(request.backtest_id)
    count = len(plan.units) if plan else 0
    done = await ports.store.units_done(request.backtest_id) if count else 0
    return await _end_early(result, ports, units_done=done, unit_count=count)


async def expire(timer: Deadline, ports: Ports) -> list[Outgoing]:
    """A deadline timer came out of its hold queue: wait again for what is left, or, past
    the deadline, end the backtest ``failed`` naming every unit that had not finished (and
    any unit's own error, as a failed backtest does), and tell the symbol workers to stop
    its sandboxes (a ``CancelRequest`` they hear).

    A unit that a worker stopped at the deadline a moment before this ran has its own
    ``timeout`` error saying so: either way every late unit is named.
    """
    left_ms = timer.deadline_ms - int(time.time() * 1000)
    if left_ms > 0:
        key = topology.timer_key(left_ms)
        return [Outgoing(topology.TIMERS, timer, timer.backtest_id, key=key)]
    if await ports.store.ended(timer.backtest_id):
        return []  # the usual case: it finished in time
    plan = await ports.store.get_plan(timer.backtest_id)
    units = plan.units if plan else {}
    batches = {b.unit_id: b for b in await ports.store.batches(timer.backtest_id)}
    late = f"when the backtest's deadline passed (deadline_s {timer.deadline_s:g})"
    errors: list[ErrorInfo] = []
    for unit_id, symbols in sorted(units.items()):
        batch = batches.get(unit_id)
        if batch is None:
            errors.append(
                ErrorInfo(
                    kind="timeout",
                    symbol=symbols[0] if len(symbols) == 1 else None,
                    unit_id=unit_id,
                    message=f"unit {unit_id} ({', '.join(symbols)}) had not finished {late};"
                    " raise the request's deadline_s, or make the strategy faster",
                )
            )
        elif batch.error is not None:
            errors.append(batch.error)
    errors = errors or [
        ErrorInfo(
            kind="timeout",
            message=f"the portfolio replay of backtest {timer.backtest_id} had not finished"
            f" {late}; raise the request's deadline_s",
        )
    ]
    result = BacktestResult(backtest_id=timer.backtest_id, status="failed", errors=errors)
    stop = CancelRequest(backtest_id=timer.backtest_id, reason="its deadline passed")
    done = len(batches.keys() & units.keys())
    out = await _end_early(result, ports, units_done=done, unit_count=len(units))
    # Sent as the owner, whom the listeners check the sender against.
    owner = await ports.store.get_accepted(timer.backtest_id)
    user_id = owner.tenant if owner is not None and owner.tenant != ANONYMOUS else None
    if not out:
        return []
    return [*out, Outgoing(topology.CANCEL, stop, timer.backtest_id, user_id=user_id)]


async def _end_early(
    result: BacktestResult, ports: Ports, *, units_done: int, unit_count: int
) -> list[Outgoing]:
    """Store ``result`` as the outcome and publish it, unless the backtest had another
    outcome already (whoever stored that published it). A redelivered message publishes
    its stored outcome again: at-least-once, like every result."""
    outcome, out = await finish(ports.store, result, units_done=units_done, unit_count=unit_count)
    return out if outcome.status == result.status else []
