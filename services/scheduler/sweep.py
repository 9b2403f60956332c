"""The scheduler's part of a sweep: expand the request, plan each child as any request.

The sweep's plan is stored before any child is planned, so every child's ending is counted
for it (:mod:`shared.sweep.track`), even one that ends while it is planned (a cache hit).
Children take their ids for the sweep's tenant but do not count against its quota again
(the sweep did, once), and share the sweep's sandbox session: warm sandboxes serve them
all, and cancelling the sweep stops them.

Planning a child costs a sandbox call (its lookback and units) and a fingerprint of each
symbol's candles. The children differ in params, not data: each symbol and window is
fingerprinted once per sweep (:class:`_Fingerprints`), and children are planned a few at a
time, the first alone (its rejection rejects the sweep).

The children's units are published grouped (:func:`_grouped`): one message per symbols,
window and rules covers up to :data:`RUNS_PER_UNIT` children's units, so a symbol worker
reads the candles once and runs the combinations in one warm sandbox session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable, Iterable

import pandas as pd

from shared import topology
from shared.bus import Outgoing
from shared.candles import Span
from shared.errors import FieldError, IdTaken, RequestRejected
from shared.messages import BacktestEvent, BacktestRequest, UnitRun, WorkUnit
from shared.ports import CandleSource, Ports
from shared.store import accept_id, store_uploaded_source
from shared.sweep.expand import expand

Planner = Callable[..., Awaitable[list[Outgoing]]]

#: Children planned at once (sandbox calls and candle fingerprints in flight).
PLANNING_AT_ONCE = 4

#: Children's units in one grouped unit at most: one delivery's work stays a few seconds'
#: worth, and a sweep's groups still spread over the workers.
RUNS_PER_UNIT = 64

#: What a grouped unit's runs differ in (everything else is the group's).
_RUN_FIELDS = {*UnitRun.model_fields, "runs"}


async def plan_sweep(
    request: BacktestRequest, ports: Ports, plan: Planner, *, tenant: str, deadline_s: float
) -> list[Outgoing]:
    """Plan every child of the sweep ``request`` with ``plan``: the scheduler's planner of
    any request, passed in (the scheduler's handler imports this module).

    :raises RequestRejected: the sweep is invalid, or its first combination is rejected
        (an unknown param name, say: every combination has the same names), or a child's
        id is another request's.
    """
    # Uploaded code is stored once, here; the children name it by its sha256.
    strategy = await store_uploaded_source(request.strategy, ports.store, tenant)
    sweep, children = expand(request.model_copy(update={"strategy": strategy}))
    await ports.store.put_sweep(sweep)
    planned = BacktestEvent.planned(
        request.id, unit_count=len(children), symbols=list(request.symbols)
    )
    ports = dataclasses.replace(ports, candles=_Fingerprints(ports.candles))
    at_once = asyncio.Semaphore(PLANNING_AT_ONCE)

    async def plan_child(child: BacktestRequest, index: int) -> list[Outgoing]:
        async with at_once:
            if await ports.store.ended(request.id):
                return []  # cancelled while it was being planned: its children end with it
            try:
                await accept_id(ports.store, child.id, child.fingerprint(), tenant=tenant)
            except IdTaken as exc:
                raise RequestRejected(
                    f"sweep: backtest id {child.id}, which the sweep's combination"
                    f" {index + 1} runs as, is another request's: give the sweep another id"
                ) from exc
            return await plan(
                child, ports, tenant=tenant, deadline_s=deadline_s, session=request.id
            )

    first = await plan_child(children[0], 0)
    outcome = await ports.store.get_result(children[0].id)
    if outcome is not None and outcome.status == "rejected":
        what = json.dumps(sweep.children[0].params)
        message = f"combination {what} was rejected: {outcome.errors[0].message}"
        raise RequestRejected.of_fields([FieldError(("sweep",), message)])
    rest = await asyncio.gather(
        *(
            plan_child(child, spec.index)
            for child, spec in zip(children[1:], sweep.children[1:], strict=True)
        )
    )
    return [
        Outgoing(topology.EVENTS, planned, request.id),
        *_grouped(request.id, [*first, *(o for out in rest for o in out)]),
    ]


def _grouped(sweep_id: str, out: Iterable[Outgoing]) -> list[Outgoing]:
    """``out`` with the children's units grouped: those that differ only in their run (see
    :class:`~shared.messages.UnitRun`) go out as grouped units of the sweep, at most
    :data:`RUNS_PER_UNIT` each, after everything else."""
    rest: list[Outgoing] = []
    alike: dict[str, list[WorkUnit]] = {}
    for o in out:
        if o.exchange == topology.WORK and isinstance(o.message, WorkUnit):
            shared_part = o.message.model_dump_json(exclude=_RUN_FIELDS)
            alike.setdefault(shared_part, []).append(o.message)
        else:
            rest.append(o)
    units = [
        units[i : i + RUNS_PER_UNIT]
        for units in alike.values()
        for i in range(0, len(units), RUNS_PER_UNIT)
    ]
    grouped = [
        WorkUnit.group(group, backtest_id=sweep_id, unit_id=f"g{n:04d}")
        for n, group in enumerate(units)
    ]
    return [*rest, *(Outgoing(topology.WORK, g, sweep_id) for g in grouped)]


class _Fingerprints:
    """A candle source that fingerprints each symbol and window once (concurrent askers
    share the one query): the children of a sweep ask for the same ones over and over."""

    def __init__(self, candles: CandleSource) -> None:
        self._candles = candles
        self._asked: dict[tuple[str, Span], asyncio.Future[str]] = {}

    async def load(self, symbol: str, window: Span) -> pd.DataFrame:
        return await self._candles.load(symbol, window)

    async def fingerprint(self, symbol: str, window: Span) -> str:
        key = (symbol, window)
        if key not in self._asked:
            self._asked[key] = asyncio.ensure_future(self._candles.fingerprint(symbol, window))
        return await self._asked[key]
