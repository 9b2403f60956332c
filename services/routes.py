"""The consuming services (:data:`SERVICES`): what each connects, how much it handles at once,
which queues it reads, and how a delivery reaches its handler.

The one table both wirings use: the services' ``main.py`` (RabbitMQ) and ``stratorch run``
(the in-memory bus). Decoding lives here, not in the handlers, so handlers stay plain
functions over pydantic messages; each message is decoded once. A body that cannot be
decoded raises :class:`~shared.bus.Poison`: it is dead-lettered at once (retrying cannot
help), and the dead letter ends its backtest. Malformed *requests* are the exception: they
are answered with a ``rejected`` result (the scheduler's handler reads them raw).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import structlog
from pydantic import ValidationError

from services.portfolio_sim import handler as portfolio_sim
from services.scheduler import handler as scheduler
from services.symbol_worker import handler as symbol_worker
from shared import topology
from shared.bus import Abandon, Delivery, GiveUp, Handler, Outgoing, Poison
from shared.messages import (
    CancelRequest,
    Deadline,
    Message,
    ProposalBatch,
    WorkUnit,
    describe_validation_error,
    peek_id,
)
from shared.outcome import DeadLetter, announce
from shared.ports import Ports
from shared.store import owned_by
from shared.tenancy import ANONYMOUS, Quota

log = structlog.get_logger(__name__)

#: What a service connects to: the broker, the state store (Mongo primary), the candles,
#: the sandbox.
Need = Literal["bus", "store", "candles", "sandbox"]
ServiceName = Literal["scheduler", "symbol_worker", "portfolio_sim"]


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


class Deliveries:
    """Every delivery handler of the consuming services: each decodes its message once (and
    binds its unit id to the log context), then calls the service's handler.

    :param deadline_s: the scheduler's deadline for requests that give none
        (``STRATORCH_DEADLINE_S``).
    :param anonymous: a request without a ``user_id`` is the tenant ``anonymous``
        (``STRATORCH_AUTH=off``, ``stratorch run``); otherwise it is refused.
    :param quota: what each tenant may have in flight (the scheduler enforces it).
    """

    def __init__(
        self,
        ports: Ports,
        *,
        deadline_s: float = scheduler.DEFAULT_DEADLINE_S,
        anonymous: bool = True,
        quota: Quota = Quota(),  # noqa: B008 - frozen: no limit
    ) -> None:
        self.ports = ports
        self.deadline_s = deadline_s
        self.anonymous = anonymous
        self.quota = quota

    def tenant_of(self, d: Delivery) -> str | None:
        """Who sent ``d``: its validated ``user_id``; without one, ``anonymous`` or nobody."""
        return d.user_id or (ANONYMOUS if self.anonymous else None)

    async def schedule(self, d: Delivery) -> Sequence[Outgoing]:
        return await scheduler.handle(
            d.body,
            self.ports,
            correlation_id=d.correlation_id,
            deadline_s=self.deadline_s,
            tenant=self.tenant_of(d),
            quota=self.quota,
        )

    async def work(self, d: Delivery) -> Sequence[Outgoing]:
        unit = _decode(WorkUnit, d)
        structlog.contextvars.bind_contextvars(unit_id=unit.unit_id)
        return await symbol_worker.handle(unit, self.ports)

    async def stop(self, d: Delivery) -> Sequence[Outgoing]:
        """Stop a cancelled backtest's sandboxes (every replica hears it)."""
        try:
            request = CancelRequest.model_validate_json(d.body)
        except ValidationError as exc:  # the durable queue's copy is dead-lettered
            log.warning("unreadable cancel request ignored", error=str(exc)[:500])
            return []
        if await self._theirs(d, request):
            await self.ports.sandbox.stop(request.backtest_id)
        return []

    async def collect(self, d: Delivery) -> Sequence[Outgoing]:
        batch = _decode(ProposalBatch, d)
        structlog.contextvars.bind_contextvars(unit_id=batch.unit_id)
        return await portfolio_sim.handle(batch, self.ports, redelivered=d.redelivered)

    async def cancel(self, d: Delivery) -> Sequence[Outgoing]:
        request = _decode(CancelRequest, d)
        if not await self._theirs(d, request):
            return []
        return await portfolio_sim.cancel(request, self.ports)

    async def expire(self, d: Delivery) -> Sequence[Outgoing]:
        return await portfolio_sim.expire(_decode(Deadline, d), self.ports)

    async def end(self, d: Delivery) -> Sequence[Outgoing]:
        """A dead letter ends its backtest ``failed``; a grouped unit's, each run's."""
        letter = dead_letter(d)
        if letter is None or not await self._owns_its_id(letter, d):
            return []
        out: list[Outgoing] = []
        for each in _per_run(letter, d.body):
            out += await portfolio_sim.end_dead_letter(each, self.ports)
        return out

    async def end_unstored(self, d: Delivery, exc: GiveUp) -> Sequence[Outgoing]:
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

    async def _theirs(self, d: Delivery, request: CancelRequest) -> bool:
        """Whether the sender of a cancel owns the backtest (a tenant cancels only its own)."""
        owner = await self.ports.store.get_accepted(request.backtest_id)
        if owned_by(owner, self.tenant_of(d)):
            return True
        log.warning(
            "cancel of a backtest that is not the sender's ignored",
            backtest_id=request.backtest_id,
            sender=d.user_id,
        )
        return False

    async def _owns_its_id(self, letter: DeadLetter, d: Delivery) -> bool:
        """A dead *request* ends the backtest of its id only if it is the request that owns
        the id (or nobody does): a duplicate that kept failing must not end another's."""
        if letter.queue != topology.REQUESTS:
            return True
        owner = await self.ports.store.get_accepted(letter.backtest_id)
        fingerprint = scheduler.receive(d.body, d.correlation_id).fingerprint()
        if owner is None or owner.fingerprint == fingerprint:
            return True
        log.warning("a dead request for another request's id ended nothing", id=letter.backtest_id)
        return False


@dataclass(frozen=True)
class Service:
    """A consuming service: what it connects to, how much it handles at once, what it reads.

    :param needs: the ports and servers :func:`services.runtime.lifespan` connects for it.
    :param concurrency: deliveries handled at once when ``STRATORCH_CONCURRENCY`` is unset.
    :param routes: its queues and their handlers, its own queue first.
    """

    needs: frozenset[Need]
    concurrency: int
    routes: Callable[[Deliveries], list[Route]]


#: Deliveries handled at once by a service that mostly waits on Mongo and the broker.
DEFAULT_CONCURRENCY = 4

#: The consuming services: what the services' ``main.py`` (RabbitMQ) and ``stratorch run``
#: (the in-memory bus) both serve.
SERVICES: dict[ServiceName, Service] = {
    # The scheduler asks the sandbox for a strategy's lookback and work units, and the candles
    # for their fingerprints (the cache key). It runs sandboxes, so it stops a cancelled
    # backtest's.
    "scheduler": Service(
        needs=frozenset({"bus", "store", "candles", "sandbox"}),
        concurrency=DEFAULT_CONCURRENCY,
        routes=lambda d: [
            Route(topology.REQUESTS, d.schedule),
            Route(topology.CANCEL, d.stop, broadcast=True),
        ],
    ),
    # A unit is CPU-bound (its strategy runs in a sandbox process): one per core.
    "symbol_worker": Service(
        needs=frozenset({"bus", "store", "candles", "sandbox"}),
        concurrency=os.cpu_count() or 1,
        routes=lambda d: [
            Route(topology.WORK, d.work),
            Route(topology.CANCEL, d.stop, broadcast=True),
        ],
    ),
    "portfolio_sim": Service(
        needs=frozenset({"bus", "store"}),
        concurrency=DEFAULT_CONCURRENCY,
        routes=lambda d: [
            Route(topology.PROPOSALS, d.collect),
            Route(topology.DEAD_WATCH, d.end, abandon=d.end_unstored),
            Route(topology.CANCEL, d.cancel),
            Route(topology.DEADLINES, d.expire),
        ],
    ),
}


def routes(
    service: ServiceName,
    ports: Ports,
    *,
    deadline_s: float = scheduler.DEFAULT_DEADLINE_S,
    anonymous: bool = True,
    quota: Quota = Quota(),  # noqa: B008 - frozen: no limit
) -> list[Route]:
    """The queues ``service`` consumes, its own first (see :class:`Deliveries`)."""
    deliveries = Deliveries(ports, deadline_s=deadline_s, anonymous=anonymous, quota=quota)
    return SERVICES[service].routes(deliveries)


M = TypeVar("M", bound=Message)


def _decode(model: type[M], delivery: Delivery) -> M:
    try:
        return delivery.decode(model)
    except ValidationError as exc:
        raise Poison(f"not a valid {model.__name__}: {describe_validation_error(exc)}") from exc


def _per_run(letter: DeadLetter, body: bytes) -> list[DeadLetter]:
    """The letter of a grouped unit (a sweep's) as one per run, each a backtest's unit: the
    sweep ends when they have; any other letter as it is."""
    if letter.queue != topology.WORK:
        return [letter]
    try:
        runs = WorkUnit.model_validate_json(body).runs or []
    except ValidationError:
        return [letter]
    return [
        dataclasses.replace(letter, backtest_id=r.backtest_id, unit_id=r.unit_id) for r in runs
    ] or [letter]


def dead_letter(delivery: Delivery) -> DeadLetter | None:
    """What a delivery of ``backtest.dead`` says: whose, from where, why; ``None`` when it
    names no backtest (nothing to end)."""
    headers = delivery.headers
    queue = str(headers.get(topology.QUEUE_HEADER) or headers.get("x-first-death-queue") or "")
    backtest_id = delivery.correlation_id
    if not backtest_id and queue == topology.REQUESTS:
        backtest_id = peek_id(delivery.body)
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
        unit_id=peek_id(delivery.body, "unit_id") if queue != topology.REQUESTS else None,
    )
