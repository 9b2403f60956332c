"""Which queue each consuming service reads, and how a delivery reaches its handler.

The one table both wirings use: the services' ``main.py`` (RabbitMQ) and ``stratorch run``
(the in-memory bus). Decoding lives here, not in the handlers, so handlers stay plain
functions over pydantic messages.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.portfolio_sim import handler as portfolio_sim
from services.scheduler import handler as scheduler
from services.symbol_worker import handler as symbol_worker
from shared import topology
from shared.bus import Delivery, Handler, Outgoing
from shared.messages import ProposalBatch, WorkUnit
from shared.ports import Ports
from shared.tenancy import ANONYMOUS, Quota


def consumer(
    service: str,
    ports: Ports,
    *,
    anonymous: bool = True,
    quota: Quota = Quota(),  # noqa: B008 - frozen: no limit
) -> tuple[str, Handler]:
    """The queue ``service`` consumes and its delivery handler.

    :param anonymous: a request without a ``user_id`` is the tenant ``anonymous``
        (``STRATORCH_AUTH=off``, ``stratorch run``); otherwise it is refused.
    :param quota: what each tenant may have in flight (the scheduler enforces it).
    """

    async def schedule(d: Delivery) -> Sequence[Outgoing]:
        tenant = d.user_id or (ANONYMOUS if anonymous else None)
        return await scheduler.handle(
            d.body, ports, correlation_id=d.correlation_id, tenant=tenant, quota=quota
        )

    async def work(d: Delivery) -> Sequence[Outgoing]:
        return await symbol_worker.handle(WorkUnit.model_validate_json(d.body), ports)

    async def simulate(d: Delivery) -> Sequence[Outgoing]:
        return await portfolio_sim.handle(ProposalBatch.model_validate_json(d.body), ports)

    table: dict[str, tuple[str, Handler]] = {
        "scheduler": (topology.REQUESTS, schedule),
        "symbol_worker": (topology.WORK, work),
        "portfolio_sim": (topology.PROPOSALS, simulate),
    }
    return table[service]
