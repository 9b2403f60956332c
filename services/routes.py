"""Which queues each consuming service reads, and how a delivery reaches its handler.

The one table both wirings use: the services' ``main.py`` (RabbitMQ) and ``stratorch run``
(the in-memory bus). Decoding lives here, not in the handlers, so handlers stay plain
functions over pydantic messages. A body that cannot be decoded raises
:class:`~shared.bus.Poison`: it is dead-lettered at once (retrying cannot help), and the
dead letter ends its backtest. Malformed *requests* are the exception: they are answered with
a ``rejected`` result (the scheduler's handler reads them raw).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from services.portfolio_sim import handler as portfolio_sim
from services.scheduler import handler as scheduler
from services.symbol_worker import handler as symbol_worker
from shared import topology
from shared.bus import Abandon, Delivery, GiveUp, Handler, Outgoing, Poison
from shared.messages import ProposalBatch, WorkUnit, describe_validation_error
from shared.outcome import DeadLetter, announce
from shared.ports import Ports
from shared.tenancy import ANONYMOUS, Quota

#: Where a unit id sits in a work unit or proposal batch: near the start, as pydantic writes
#: fields in declaration order. For log context and dead letters (whose body may not parse).
_UNIT_ID = re.compile(rb'"unit_id"\s*:\s*"([A-Za-z0-9_.:-]{1,64})"')
_ID = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.:-]{1,64})"')


def unit_id_of(body: bytes) -> str | None:
    """The unit id a work unit or batch names, read without parsing it."""
    found = _UNIT_ID.search(body[:1024])
    return found.group(1).decode() if found else None


@dataclass(frozen=True)
class Route:
    """A queue a service consumes and its delivery handler.

    :param abandon: what to publish for a delivery that is given up, instead of
        dead-lettering it (see :func:`shared.bus.serve`).
    """

    queue: str
    handle: Handler
    abandon: Abandon | None = None


def routes(
    service: str,
    ports: Ports,
    *,
    anonymous: bool = True,
    quota: Quota = Quota(),  # noqa: B008 - frozen: no limit
) -> list[Route]:
    """The queues ``service`` consumes, its own first.

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
        return await symbol_worker.handle(_decode(WorkUnit, d), ports)

    async def simulate(d: Delivery) -> Sequence[Outgoing]:
        return await portfolio_sim.handle(_decode(ProposalBatch, d), ports)

    async def end(d: Delivery) -> Sequence[Outgoing]:
        letter = dead_letter(d)
        return [] if letter is None else await portfolio_sim.end_dead_letter(letter, ports)

    async def end_unstored(d: Delivery, exc: GiveUp) -> Sequence[Outgoing]:
        """The store is out of reach (or ending fails): still tell the user, unstored."""
        letter = dead_letter(d)
        if letter is None:
            return []
        result = letter.failure()
        error = result.errors[0]
        note = f" (This result could not be stored: {exc.reason})"
        failed = result.model_copy(
            update={"errors": [error.model_copy(update={"message": error.message + note})]}
        )
        return announce(failed)

    table: dict[str, list[Route]] = {
        "scheduler": [Route(topology.REQUESTS, schedule)],
        "symbol_worker": [Route(topology.WORK, work)],
        "portfolio_sim": [
            Route(topology.PROPOSALS, simulate),
            Route(topology.DEAD_WATCH, end, abandon=end_unstored),
        ],
    }
    return table[service]


M = TypeVar("M", bound=BaseModel)


def _decode(model: type[M], delivery: Delivery) -> M:
    try:
        return model.model_validate_json(delivery.body)
    except ValidationError as exc:
        raise Poison(f"not a valid {model.__name__}: {describe_validation_error(exc)}") from exc


def dead_letter(delivery: Delivery) -> DeadLetter | None:
    """What a delivery of ``backtest.dead`` says: whose, from where, why; ``None`` when it
    names no backtest (nothing to end)."""
    headers = delivery.headers
    queue = str(headers.get(topology.QUEUE_HEADER) or headers.get("x-first-death-queue") or "")
    backtest_id = delivery.correlation_id
    if not backtest_id and queue == topology.REQUESTS:
        found = _ID.search(delivery.body[:4096])
        backtest_id = found.group(1).decode() if found else None
    if not backtest_id:
        return None
    reason = headers.get(topology.REASON_HEADER)
    if reason is None:  # RabbitMQ dead-lettered it itself
        why = headers.get("x-first-death-reason", "delivery_limit")
        reason = (
            f"RabbitMQ dead-lettered it ({why}) after {topology.DELIVERY_LIMIT + 1} deliveries:"
            " the service handling it kept stopping before it finished (crashed, killed, out"
            " of memory?)"
        )
    kind = headers.get(topology.KIND_HEADER)
    return DeadLetter(
        backtest_id=backtest_id,
        queue=queue or "an unknown queue",
        reason=str(reason),
        kind="unavailable" if kind == "unavailable" else "internal",
        unit_id=unit_id_of(delivery.body) if queue != topology.REQUESTS else None,
    )
