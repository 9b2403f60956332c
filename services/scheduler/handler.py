"""Scheduler: a request in, its work units out (or a ``rejected`` result, never silence).

Before anything is stored under a request's id, the request takes the id for its tenant and
counts against the tenant's quota (:func:`shared.store.admit_request`): the first request with
an id owns it. The same request again (a redelivery, a retry, one the gateway accepted) goes
on as the same backtest; one that is over is answered with its stored outcome. A *different*
request of the same tenant with a taken id is answered ``rejected`` on routing key
:func:`shared.topology.duplicate_key` — never on the id's own key, whose listeners follow the
backtest that owns it — and nothing of it is stored: it cannot end, or mix its units into,
that backtest. A request for another tenant's id changes nothing and is answered nowhere (its
results are that tenant's), only logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from services.scheduler.sweep import plan_sweep
from shared import topology
from shared.bus import Outgoing
from shared.cache import cache_key, describe_key
from shared.candles import Span
from shared.errors import IdTaken, OverQuota, RequestRejected, StratorchError
from shared.messages import (
    BacktestEvent,
    BacktestRequest,
    BacktestResult,
    ComponentSpec,
    Deadline,
    ErrorInfo,
    ExecutionRules,
    Plan,
    WorkUnit,
    is_backtest_id,
    new_backtest_id,
    peek_id,
    rejection,
)
from shared.outcome import announce, finish
from shared.ports import Ports
from shared.sandbox.port import SandboxLimits, StrategyInfo
from shared.sim import load_portfolio
from shared.store import accept_id, admit_request, fetch_code, store_uploaded_source
from shared.strategy import ComponentError
from shared.tenancy import ANONYMOUS, Quota

log = structlog.get_logger(__name__)

_NO_TENANT = (
    "the request has no user_id property: publish it with user_id = your RabbitMQ user name"
    " (RabbitMQ checks it; it is who the backtest belongs to)"
)

#: ``STRATORCH_DEADLINE_S``'s default: a backtest not finished an hour after it was planned
#: ends ``failed``; so nothing runs forever.
DEFAULT_DEADLINE_S = 3600.0


@dataclass(frozen=True)
class Received:
    """A raw request, read once: the id it goes by, and the request or why it is none."""

    #: The request's id; for one that gives none, the message's correlation id when that is
    #: a valid id (so its sender can match the result), else a fresh one. A malformed request
    #: goes by the id it asked for, when that can be read and is valid.
    backtest_id: str
    raw: bytes
    request: BacktestRequest | None = None
    #: Why ``raw`` is not a valid request: each invalid field (:func:`rejection`).
    problem: RequestRejected | None = None

    def fingerprint(self) -> str:
        """What the request takes its id with: :meth:`BacktestRequest.fingerprint`, or the
        raw body's sha256 for a malformed one."""
        if self.request is None:
            return hashlib.sha256(self.raw).hexdigest()
        return self.request.fingerprint()


def receive(raw: bytes, correlation_id: str | None = None) -> Received:
    """Read a raw request as the scheduler does: what the scheduler, the dead-letter watch
    and ``stratorch run`` all go by."""
    sent_id = correlation_id if is_backtest_id(correlation_id) else None
    try:
        request = BacktestRequest.model_validate_json(raw)
    except ValidationError as exc:
        backtest_id = peek_id(raw) or sent_id or new_backtest_id()
        return Received(backtest_id, raw, problem=rejection(exc.errors()))
    if "id" not in request.model_fields_set and sent_id is not None:
        request = request.model_copy(update={"id": sent_id})
    return Received(request.id, raw, request)


async def handle(
    raw: bytes,
    ports: Ports,
    *,
    correlation_id: str | None = None,
    deadline_s: float = DEFAULT_DEADLINE_S,
    tenant: str | None = ANONYMOUS,
    quota: Quota = Quota(),  # noqa: B008 - frozen: no limit
) -> list[Outgoing]:
    """Validate a raw request, store its code, ask the strategy how to split it, emit units
    and start the backtest's deadline timer.

    :param correlation_id: the message's; the backtest id of a request that gives none.
    :param deadline_s: the deadline of a request that gives no ``deadline_s``.
    :param tenant: who sent it (the message's validated ``user_id``); ``None``: unknown,
        which is refused.
    :param quota: what ``tenant`` may have in flight; past it the request is ``rejected``.
    """
    received = receive(raw, correlation_id)
    request = received.request
    if request is None:
        assert received.problem is not None
        error = ErrorInfo.from_error(received.problem)
        return await _refuse(received.backtest_id, received.fingerprint(), tenant, error, ports)
    if tenant is None:
        error = ErrorInfo(kind="rejected", message=_NO_TENANT)
        return await _refuse(request.id, request.fingerprint(), None, error, ports)
    try:
        new = await admit_request(ports.store, request, tenant=tenant, quota=quota)
    except IdTaken as taken:
        return _taken(taken, tenant)
    except OverQuota as exc:
        return await _refuse(
            request.id, request.fingerprint(), tenant, ErrorInfo.from_error(exc), ports
        )
    if not new and (stored := await ports.store.get_result(request.id)) is not None:
        _, out = await finish(ports.store, stored)  # the same request again: what stands
        return out
    if await ports.store.ended(request.id):
        return []  # cancelled before it was planned (its result is out)
    deadline_s = request.deadline_s or deadline_s
    if request.sweep is not None:
        try:
            return await plan_sweep(request, ports, _plan, tenant=tenant, deadline_s=deadline_s)
        except RequestRejected as exc:
            return await _end(request.id, "rejected", ErrorInfo.from_error(exc), ports)
    return await _plan(request, ports, tenant=tenant, deadline_s=deadline_s)


async def _plan(
    request: BacktestRequest,
    ports: Ports,
    *,
    tenant: str,
    deadline_s: float,
    session: str | None = None,
) -> list[Outgoing]:
    """Plan an admitted request: its units out, its deadline timer started.

    :param session: the sandbox session of its units (a sweep's children share the
        sweep's); ``None``: its own id.
    """
    deadline_ms = int(time.time() * 1000 + deadline_s * 1000)
    try:
        strategy = await store_uploaded_source(request.strategy, ports.store, tenant)
        _check_portfolio(request.portfolio)
        info = await _describe(request, strategy, ports, session=session or request.id)
    except StratorchError as exc:
        status = "rejected" if exc.kind == "rejected" else "failed"
        return await _end(request.id, status, ErrorInfo.from_error(exc), ports)

    started = time.perf_counter()
    key = cache_key(request, strategy, info.lookback, await _fingerprints(request, info, ports))
    cached = await ports.store.get_cached(key)
    log.info(
        "cache looked up",
        hit=cached is not None,
        elapsed_s=round(time.perf_counter() - started, 4),  # the fingerprints, mostly
    )
    if cached is not None:
        hit = cached.model_copy(update={"backtest_id": request.id, "cache_hit": True})
        _, out = await finish(ports.store, hit)
        return out

    units = [
        WorkUnit(
            backtest_id=request.id,
            unit_id=f"u{i:04d}",
            unit_count=len(info.units),
            symbols=symbols,
            interval=request.interval,
            start_ms=request.start_ms,
            end_ms=request.end_ms,
            lookback=info.lookback,
            strategy=strategy,
            rules=ExecutionRules(
                slippage_bps=request.slippage_bps,
                tie_break=request.tie_break,
                max_holding_bars=request.max_holding_bars,
            ),
            timeout_s=request.unit_timeout_s,
            deadline_ms=deadline_ms,
            session=session,
        )
        for i, symbols in enumerate(info.units)
    ]
    if await ports.store.ended(request.id):
        return []  # cancelled while it was being planned
    await ports.store.put_plan(
        Plan(
            request=request.model_copy(update={"strategy": strategy}),
            lookback=info.lookback,
            cache_key=key,
            units={u.unit_id: u.symbols for u in units},
            deadline_ms=deadline_ms,
        )
    )
    planned = BacktestEvent.planned(
        request.id, unit_count=len(units), symbols=list(request.symbols)
    )
    timer = Deadline(backtest_id=request.id, deadline_ms=deadline_ms, deadline_s=deadline_s)
    hold = topology.timer_key(deadline_ms - int(time.time() * 1000))  # planning took some
    return [
        Outgoing(topology.EVENTS, planned, request.id),
        Outgoing(topology.TIMERS, timer, request.id, key=hold),
        *(Outgoing(topology.WORK, u, request.id) for u in units),
    ]


async def _describe(
    request: BacktestRequest, strategy: ComponentSpec, ports: Ports, *, session: str
) -> StrategyInfo:
    """The strategy's lookback and work units: stored when this code, with these params, was
    described for these symbols before (then no sandbox starts), else asked of a sandbox and
    stored.

    :param strategy: the request's, with uploaded code named by its sha256.
    :param session: the sandbox session to ask in: the backtest's, or its sweep's.
    """
    key = describe_key(strategy, request.symbols)
    info = await ports.store.get_described(key)
    if info is None:
        started = time.perf_counter()
        info = await ports.sandbox.describe(
            await fetch_code(request.strategy, ports.store),  # code sent inline: not fetched
            list(request.symbols),
            limits=SandboxLimits(timeout_s=request.unit_timeout_s),
            session=session,
        )
        await ports.store.put_described(key, info)
        log.info("described by a sandbox", elapsed_s=round(time.perf_counter() - started, 4))
    return info


async def _fingerprints(
    request: BacktestRequest, info: StrategyInfo, ports: Ports
) -> dict[str, str]:
    """Each symbol's data fingerprint, fetched concurrently."""
    window = Span(request.interval, request.start_ms, request.end_ms, info.lookback)
    prints = await asyncio.gather(*(ports.candles.fingerprint(s, window) for s in request.symbols))
    return dict(zip(request.symbols, prints, strict=True))


def _check_portfolio(spec: ComponentSpec) -> None:
    """Portfolio managers are trusted code: load one now so bad params are a rejection."""
    try:
        load_portfolio(spec)
    except (ComponentError, ValueError, TypeError) as exc:
        raise RequestRejected(f"portfolio: {exc}") from exc


async def _end(backtest_id: str, status: str, error: ErrorInfo, ports: Ports) -> list[Outgoing]:
    """A backtest that ends before planning: its result is stored (so status queries find it)
    and published, with the ``finished`` event progress followers wait for."""
    result = BacktestResult(backtest_id=backtest_id, status=status, errors=[error])  # type: ignore[arg-type]
    _, out = await finish(ports.store, result)
    return out


async def _refuse(
    backtest_id: str, fingerprint: str, tenant: str | None, error: ErrorInfo, ports: Ports
) -> list[Outgoing]:
    """A request refused before it was admitted: ``rejected``, its result stored under the
    id it takes, unless that id is another request's (:func:`_taken`).

    Without a tenant the rejection is published but not stored, so it takes no id.
    """
    if tenant is None:
        if await ports.store.get_accepted(backtest_id) is not None:
            return _taken(IdTaken(backtest_id, of_another_tenant=True), None)
        return announce(BacktestResult(backtest_id=backtest_id, status="rejected", errors=[error]))
    try:
        await accept_id(ports.store, backtest_id, fingerprint, tenant=tenant)
    except IdTaken as taken:
        return _taken(taken, tenant)
    return await _end(backtest_id, "rejected", error, ports)


def _taken(taken: IdTaken, tenant: str | None) -> list[Outgoing]:
    """The answer to a request whose id another request owns: ``rejected`` on routing key
    :func:`~shared.topology.duplicate_key`, never stored. Nothing if the id is another
    tenant's (whose results, under any key, are not the sender's to read): that is logged."""
    if taken.of_another_tenant:
        log.warning(
            "request ignored: its backtest id belongs to another tenant",
            backtest_id=taken.backtest_id,
            tenant=tenant,
        )
        return []
    result = BacktestResult(
        backtest_id=taken.backtest_id, status="rejected", errors=[ErrorInfo.from_error(taken)]
    )
    key = topology.duplicate_key(taken.backtest_id)
    return [Outgoing(topology.RESULTS, result, taken.backtest_id, key=key)]
