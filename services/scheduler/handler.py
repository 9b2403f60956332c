"""Scheduler: a request in, its work units out (or a ``rejected`` result, never silence)."""

from __future__ import annotations

import asyncio
import json
import re

import structlog
from pydantic import ValidationError

from shared import topology
from shared.bus import Outgoing
from shared.cache import cache_key
from shared.errors import RequestRejected, StratorchError
from shared.messages import (
    BacktestEvent,
    BacktestRequest,
    BacktestResult,
    ComponentSpec,
    ErrorInfo,
    ExecutionRules,
    WorkUnit,
    describe_validation_error,
    new_backtest_id,
)
from shared.outcome import finish, finished_event
from shared.ports import Ports
from shared.sandbox.port import SandboxLimits, StrategyCode, StrategyInfo
from shared.sim import BUILTIN_PORTFOLIOS
from shared.store import store_uploaded_source
from shared.strategy import ComponentError, load_component
from shared.tenancy import ANONYMOUS, Admission, Quota

log = structlog.get_logger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_NO_TENANT = (
    "the request has no user_id property: publish it with user_id = your RabbitMQ user name"
    " (RabbitMQ checks it; it is who the backtest belongs to)"
)


async def handle(
    raw: bytes,
    ports: Ports,
    *,
    correlation_id: str | None = None,
    tenant: str | None = ANONYMOUS,
    quota: Quota = Quota(),  # noqa: B008 - frozen: no limit
) -> list[Outgoing]:
    """Validate a raw request, store its code, ask the strategy how to split it, emit units.

    :param tenant: who sent it (the message's validated ``user_id``); ``None``: unknown,
        which is refused. A request for another tenant's backtest id changes nothing and
        is answered nowhere (its id's results are that tenant's), only logged.
    :param quota: what ``tenant`` may have in flight; past it the request is ``rejected``.
    """
    try:
        request = BacktestRequest.model_validate_json(raw)
    except ValidationError as exc:
        backtest_id = _id_of(raw) or correlation_id or new_backtest_id()
        error = ErrorInfo(kind="rejected", message=describe_validation_error(exc))
        return await _refuse(backtest_id, tenant, error, ports)
    if tenant is None:
        error = ErrorInfo(kind="rejected", message=_NO_TENANT)
        return await _refuse(request.id, None, error, ports)
    admission = await ports.store.admit(tenant, request.id, len(request.symbols), quota)
    if admission is Admission.TAKEN:
        return _taken(request.id, tenant)
    if admission is Admission.OVER_QUOTA:
        error = ErrorInfo(kind="rejected", message=quota.refusal(tenant, len(request.symbols)))
        return await _refuse(request.id, tenant, error, ports)
    try:
        strategy = await store_uploaded_source(request.strategy, ports.store, tenant)
        _check_portfolio(request.portfolio)
        source = (
            await ports.store.get_source(strategy.source_sha256) if strategy.source_sha256 else None
        )
        info = await ports.sandbox.describe(
            StrategyCode(_code_spec(strategy), source),
            list(request.symbols),
            limits=SandboxLimits(timeout_s=request.unit_timeout_s),
            session=request.id,
        )
    except StratorchError as exc:
        status = "rejected" if exc.kind == "rejected" else "failed"
        return await _finished(request.id, status, exc.to_info(), ports)

    key = cache_key(request, strategy, info.lookback, await _fingerprints(request, info, ports))
    cached = await ports.store.get_cached(key)
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
        )
        for i, symbols in enumerate(info.units)
    ]
    await ports.store.put_plan(
        request.id,
        {
            "request": json.loads(
                request.model_copy(update={"strategy": strategy}).model_dump_json(by_alias=True)
            ),
            "tenant": tenant,
            "lookback": info.lookback,
            "cache_key": key,
            "units": {u.unit_id: u.symbols for u in units},
        },
    )
    planned = BacktestEvent(
        backtest_id=request.id,
        type="planned",
        units_done=0,
        unit_count=len(units),
        symbols=list(request.symbols),
    )
    return [
        Outgoing(topology.EVENTS, planned, request.id),
        *(Outgoing(topology.WORK, u, request.id) for u in units),
    ]


async def _fingerprints(
    request: BacktestRequest, info: StrategyInfo, ports: Ports
) -> dict[str, str]:
    """Each symbol's data fingerprint, fetched concurrently."""
    prints = await asyncio.gather(
        *(
            ports.candles.fingerprint(
                s,
                request.interval,
                start_ms=request.start_ms,
                end_ms=request.end_ms,
                lookback=info.lookback,
            )
            for s in request.symbols
        )
    )
    return dict(zip(request.symbols, prints, strict=True))


def _code_spec(spec: ComponentSpec) -> dict[str, object]:
    return spec.model_dump(by_alias=True, exclude_none=True)


def _check_portfolio(spec: ComponentSpec) -> None:
    """Portfolio managers are trusted code: load one now so bad params are a rejection."""
    try:
        load_component(
            spec.loader_spec(), registry=BUILTIN_PORTFOLIOS, kind="portfolio", params=spec.params
        )
    except (ComponentError, ValueError, TypeError) as exc:
        raise RequestRejected(f"portfolio: {exc}") from exc


async def _finished(
    backtest_id: str, status: str, error: ErrorInfo, ports: Ports
) -> list[Outgoing]:
    """A backtest that ends before planning: its result is stored (so status queries find it)
    and published, with the ``finished`` event progress followers wait for."""
    result = BacktestResult(backtest_id=backtest_id, status=status, errors=[error])  # type: ignore[arg-type]
    _, out = await finish(ports.store, result)
    return out


async def _refuse(
    backtest_id: str, tenant: str | None, error: ErrorInfo, ports: Ports
) -> list[Outgoing]:
    """A request refused before it was admitted: rejected, unless its id is another's.

    Without a tenant the rejection is published but not stored, so it claims no id.
    """
    if tenant is None:
        if await ports.store.owner(backtest_id) is not None:
            return _taken(backtest_id, None)
        result = BacktestResult(backtest_id=backtest_id, status="rejected", errors=[error])
        done = finished_event(backtest_id, "rejected", units_done=0, unit_count=0)
        return [
            Outgoing(topology.RESULTS, result, backtest_id),
            Outgoing(topology.EVENTS, done, backtest_id),
        ]
    if await ports.store.admit(tenant, backtest_id, 0, Quota()) is Admission.TAKEN:
        return _taken(backtest_id, tenant)
    return await _finished(backtest_id, "rejected", error, ports)


def _taken(backtest_id: str, tenant: str | None) -> list[Outgoing]:
    """Nothing to publish: the id's results and events belong to the tenant that owns it."""
    log.warning(
        "request ignored: its backtest id belongs to another tenant",
        backtest_id=backtest_id,
        tenant=tenant,
    )
    return []


def _id_of(raw: bytes) -> str | None:
    """The id a malformed request asked for, if it can be read, so its sender can match it."""
    try:
        value = json.loads(raw).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and _ID.match(value) else None
