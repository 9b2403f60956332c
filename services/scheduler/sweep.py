"""The scheduler's part of a sweep: expand the request, plan each child as any request.

The sweep's plan is stored before any child is planned, so every child's ending is counted
for it (:mod:`shared.sweep.track`), even one that ends while it is planned (a cache hit).
Children take their ids for the sweep's tenant but do not count against its quota again
(the sweep did, once), and share the sweep's sandbox session: warm sandboxes serve them
all, and cancelling the sweep stops them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from shared import topology
from shared.bus import Outgoing
from shared.errors import FieldError, IdTaken, RequestRejected
from shared.messages import BacktestEvent, BacktestRequest
from shared.ports import Ports
from shared.store import accept_id
from shared.sweep.expand import expand

Planner = Callable[..., Awaitable[list[Outgoing]]]


async def plan_sweep(
    request: BacktestRequest, ports: Ports, plan: Planner, *, tenant: str, deadline_s: float
) -> list[Outgoing]:
    """Plan every child of the sweep ``request`` with ``plan`` (the scheduler's planner).

    :raises RequestRejected: the sweep is invalid, or its first combination is rejected
        (an unknown param name, say: every combination has the same names), or a child's
        id is another request's.
    """
    sweep, children = expand(request)
    await ports.store.put_sweep(sweep)
    planned = BacktestEvent.planned(
        request.id, unit_count=len(children), symbols=list(request.symbols)
    )
    out = [Outgoing(topology.EVENTS, planned, request.id)]
    for child, spec in zip(children, sweep.children, strict=True):
        if await ports.store.ended(request.id):
            break  # cancelled while it was being planned: its children end with it
        try:
            await accept_id(ports.store, child.id, child.fingerprint(), tenant=tenant)
        except IdTaken as exc:
            raise RequestRejected(
                f"sweep: backtest id {child.id}, which the sweep's combination"
                f" {spec.index + 1} runs as, is another request's: give the sweep another id"
            ) from exc
        out += await plan(child, ports, tenant=tenant, deadline_s=deadline_s, session=request.id)
        if spec is sweep.children[0]:
            first = await ports.store.get_result(child.id)
            if first is not None and first.status == "rejected":
                what = json.dumps(spec.params)
                raise RequestRejected.of_fields(
                    [
                        FieldError(
                            ("sweep",),
                            f"combination {what} was rejected: {first.errors[0].message}",
                        )
                    ]
                )
    return out
