"""Which queues each consuming service reads, and how a delivery reaches its handler.

The one table both wirings use: the services' ``main.py`` (RabbitMQ) and ``stratorch run``
(the in-memory bus). Decoding lives here, not in the handlers, so handlers stay plain
functions over pydantic messages. A body that cannot be decoded raises
:class:`~shared.bus.Poison`: it is dead-lettered at once (retrying cannot help), and the
dead letter ends its backtest. Malformed *requests* are the exception: they are answered with
a ``rejected`` result (the scheduler's handler reads them raw).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog
from pydantic import BaseModel, ValidationError

from services.portfolio_sim import handler as portfolio_sim
from services.scheduler import handler as scheduler
from services.symbol_worker import handler as symbol_worker
from shared import topology
from shared.bus import Abandon, Delivery, GiveUp, Handler, Outgoing, Poison
from shared.messages import (
    BacktestRequest,
    CancelRequest,
    Deadline,
    ProposalBatch,
    WorkUnit,
    describe_validation_error,
    is_backtest_id,
)
from shared.outcome import DeadLetter, announce
from shared.ports import Ports
from shared.store import owned_by
from shared.tenancy import ANONYMOUS, Quota

log = structlog.get_logger(__name__)

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
    :param broadcast: ``queue`` names an exchange the service hears on a temporary queue of
        its own, bound with ``#``, so that every replica gets every message (the services
        that run sandboxes stop a cancelled backtest's).
    """

    queue: str
    handle: Handler
    abandon: Abandon | None = None
    broadcast: bool = False


def routes(
    service: str,
    ports: Ports,
    *,
    deadline_s: float = scheduler.DEFAULT_DEADLINE_S,
    anonymous: bool = True,
    quota: Quota = Quota(),  # noqa: B008 - frozen: no limit
) -> list[Route]:
    """The queues ``service`` consumes, its own first.

    :param deadline_s: the scheduler's deadline for requests that give none
        (``STRATORCH_DEADLINE_S``).
    :param anonymous: a request without a ``user_id`` is the tenant ``anonymous``
        (``STRATORCH_AUTH=off``, ``stratorch run``); otherwise it is refused.
    :param quota: what each tenant may have in flight (the scheduler enforces it).
    """

    def tenant_of(d: Delivery) -> str | None:
        """Who sent ``d``: its validated ``user_id``; without one, ``anonymous`` or nobody."""
        return d.user_id or (ANONYMOUS if anonymous else None)

    async def theirs(d: Delivery, request: CancelRequest) -> bool:
        """Whether the sender of a cancel owns the backtest (a tenant cancels only its own)."""
        owner = await ports.store.get_accepted(request.backtest_id)
        if owned_by(owner, tenant_of(d)):
            return True
        log.warning(
            "cancel of a backtest that is not the sender's ignored",
            backtest_id=request.backtest_id,
            sender=d.user_id,
        )
        return False

    async def schedule(d: Delivery) -> Sequence[Outgoing]:
        tenant = tenant_of(d)
        return await scheduler.handle(
            d.body,
            ports,
            correlation_id=d.correlation_id,
            deadline_s=deadline_s,
            tenant=tenant,
            quota=quota,
        )

    async def work(d: Delivery) -> Sequence[Outgoing]:
        return await symbol_worker.handle(_decode(WorkUnit, d), ports)

    async def stop(d: Delivery) -> Sequence[Outgoing]:
        try:
            request = CancelRequest.model_validate_json(d.body)
        except ValidationError as exc:  # the durable queue's copy is dead-lettered
            log.warning("unreadable cancel request ignored", error=str(exc)[:500])
            return []
        if await theirs(d, request):
            await ports.sandbox.stop(request.backtest_id)
        return []

    async def simulate(d: Delivery) -> Sequence[Outgoing]:
        batch = _decode(ProposalBatch, d)
        return await portfolio_sim.handle(batch, ports, redelivered=d.redelivered)

    async def end(d: Delivery) -> Sequence[Outgoing]:
        letter = dead_letter(d)
        if letter is None or not await owns_its_id(letter, d):
            return []
        return await portfolio_sim.end_dead_letter(letter, ports)

    async def owns_its_id(letter: DeadLetter, d: Delivery) -> bool:
        """A dead *request* ends the backtest of its id only if it is the request that owns
        the id (or nobody does): a duplicate that kept failing must not end another's."""
        if letter.queue != topology.REQUESTS:
            return True
        owner = await ports.store.get_accepted(letter.backtest_id)
        if owner is None or owner.fingerprint == _request_fingerprint(d):
            return True
        log.warning("a dead request for another request's id ended nothing", id=letter.backtest_id)
        return False

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

    async def cancel(d: Delivery) -> Sequence[Outgoing]:
        request = _decode(CancelRequest, d)
        return await portfolio_sim.cancel(request, ports) if await theirs(d, request) else []

    async def expire(d: Delivery) -> Sequence[Outgoing]:
        return await portfolio_sim.expire(_decode(Deadline, d), ports)

    table: dict[str, list[Route]] = {
        # The scheduler runs sandboxes too (describe): it stops a cancelled backtest's.
        "scheduler": [
            Route(topology.REQUESTS, schedule),
            Route(topology.CANCEL, stop, broadcast=True),
        ],
        "symbol_worker": [
            Route(topology.WORK, work),
            Route(topology.CANCEL, stop, broadcast=True),
        ],
        "portfolio_sim": [
            Route(topology.PROPOSALS, simulate),
            Route(topology.DEAD_WATCH, end, abandon=end_unstored),
            Route(topology.CANCEL, cancel),
            Route(topology.DEADLINES, expire),
        ],
    }
    return table[service]


M = TypeVar("M", bound=BaseModel)


def _decode(model: type[M], delivery: Delivery) -> M:
    try:
        return model.model_validate_json(delivery.body)
    except ValidationError as exc:
        raise Poison(f"not a valid {model.__name__}: {describe_validation_error(exc)}") from exc


def _request_fingerprint(delivery: Delivery) -> str:
    """The fingerprint the scheduler takes a request's id with: the request's own (its id,
    when it gives none, the message's correlation id), else the raw body's sha256."""
    try:
        request = BacktestRequest.model_validate_json(delivery.body)
    except ValidationError:
        return hashlib.sha256(delivery.body).hexdigest()
    if "id" not in request.model_fields_set and is_backtest_id(delivery.correlation_id):
        request = request.model_copy(update={"id": delivery.correlation_id})
    return request.fingerprint()


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
