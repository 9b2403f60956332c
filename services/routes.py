"""Which queues each consuming service reads, and how a delivery reaches its handler.

The one table both wirings use: the services' ``main.py`` (RabbitMQ) and ``stratorch run``
(the in-memory bus). Decoding lives here, not in the handlers, so handlers stay plain
functions over pydantic messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from services.portfolio_sim import handler as portfolio_sim
from services.scheduler import handler as scheduler
from services.symbol_worker import handler as symbol_worker
from shared import topology
from shared.bus import Delivery, Handler, Outgoing
from shared.messages import CancelRequest, Deadline, ProposalBatch, WorkUnit
from shared.ports import Ports

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Route:
    """A queue a service consumes and the handler of its deliveries.

    ``broadcast``: ``queue`` names an exchange the service hears on a temporary queue of
    its own, bound with ``#``, so that every replica gets every message (the services that
    run sandboxes stop a cancelled backtest's).
    """

    queue: str
    handler: Handler
    broadcast: bool = False


def consumers(
    service: str, ports: Ports, *, deadline_s: float = scheduler.DEFAULT_DEADLINE_S
) -> list[Route]:
    """What ``service`` consumes.

    :param deadline_s: the scheduler's deadline for requests that give none
        (``STRATORCH_DEADLINE_S``).
    """

    async def schedule(d: Delivery) -> Sequence[Outgoing]:
        return await scheduler.handle(
            d.body, ports, correlation_id=d.correlation_id, deadline_s=deadline_s
        )

    async def work(d: Delivery) -> Sequence[Outgoing]:
        return await symbol_worker.handle(WorkUnit.model_validate_json(d.body), ports)

    async def stop(d: Delivery) -> Sequence[Outgoing]:
        try:
            request = CancelRequest.model_validate_json(d.body)
        except ValidationError as exc:  # the durable queue's copy is dead-lettered
            log.warning("unreadable cancel request ignored", error=str(exc)[:500])
            return []
        await ports.sandbox.stop(request.backtest_id)
        return []

    async def simulate(d: Delivery) -> Sequence[Outgoing]:
        return await portfolio_sim.handle(ProposalBatch.model_validate_json(d.body), ports)

    async def cancel(d: Delivery) -> Sequence[Outgoing]:
        return await portfolio_sim.cancel(CancelRequest.model_validate_json(d.body), ports)

    async def expire(d: Delivery) -> Sequence[Outgoing]:
        return await portfolio_sim.expire(Deadline.model_validate_json(d.body), ports)

    table: dict[str, list[Route]] = {
        # The scheduler runs sandboxes too (describe): it stops a cancelled backtest's.
        "scheduler": [Route(topology.REQUESTS, schedule), Route(topology.CANCEL, stop, True)],
        "symbol_worker": [Route(topology.WORK, work), Route(topology.CANCEL, stop, True)],
        "portfolio_sim": [
            Route(topology.PROPOSALS, simulate),
            Route(topology.CANCEL, cancel),
            Route(topology.DEADLINES, expire),
        ],
    }
    return table[service]
