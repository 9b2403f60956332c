"""The gateway's HTTP API (FastAPI): submit a backtest, poll it, stream its progress, health.

======================================  =====================================================
``POST /backtests``                     validate and publish a ``BacktestRequest``: 202 with
                                        its id and where to follow it; 422 with the field
                                        errors (``{"detail": [{"loc": [...], "msg": ...}]}``);
                                        409 if its id is another request's; 200 with the
                                        same answer if this request was sent before; 413
                                        over :data:`MAX_BODY_BYTES`
``GET /backtests/{id}``                 status, progress and (once there) the result; 404
``DELETE /backtests/{id}``              cancel it: 202 with its status (a ``CancelRequest`` is
                                        published); 200 with the final status if it has ended
                                        already; 404
``GET /backtests/{id}/events``          server-sent events: ``planned``, ``unit_done``...,
                                        ``finished`` (then the stream ends); a ``: ping``
                                        comment every 15 s keeps proxies from closing it
``GET /backtests/{id}/report``          the HTML report of a finished backtest; 409 before
``GET /healthz``                        200 when RabbitMQ and Mongo answer, else 503
======================================  =====================================================

Every ``/backtests`` endpoint wants ``Authorization: Bearer <token>`` (401 without a valid
one) unless ``STRATORCH_AUTH=off``; the token's tenant is the only one whose backtests it
sees (another's id is 404, exactly like an unknown one) and whose quota it spends (429 with
``Retry-After`` past it). ``/healthz`` and the API documents stay open: they reveal nothing
of any tenant.

The body is a ``BacktestRequest`` sent as JSON, validated by FastAPI with the model the
scheduler validates a published request with (so HTTP and direct publishers get the same
answers); the OpenAPI document shows its schema. An invalid body and a request refused later
(:class:`~shared.errors.RequestRejected`) are answered alike: one entry per invalid field.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Literal

import structlog
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from pymongo.errors import PyMongoError
from sse_starlette import EventSourceResponse, ServerSentEvent

from services.gateway.handler import submit
from services.routes import Need
from services.runtime import Context, lifespan
from shared import mongo, report, topology
from shared.broker import BrokerError, BrokerUnavailable, RabbitBus
from shared.bus import Outgoing, publish
from shared.errors import IdTaken, OverQuota, RequestRejected
from shared.messages import (
    BACKTEST_ID,
    BacktestEvent,
    BacktestRequest,
    BacktestResult,
    CancelRequest,
    Status,
    rejection,
)
from shared.settings import Settings
from shared.store import Store, owned_by
from shared.tenancy import ANONYMOUS, ApiTokens

log = structlog.get_logger(__name__)

#: Seconds between keep-alive comments on an idle event stream.
HEARTBEAT_S = 15.0
#: The largest request body read: uploaded code is capped at 256 KiB, symbols at 1000, so a
#: valid request is far smaller; a bigger one is refused (413) before it is read into memory.
MAX_BODY_BYTES = 1024 * 1024
#: What a body FastAPI did not parse as JSON (its content type is not JSON) is refused with.
NOT_JSON = "send the request as JSON, with 'content-type: application/json'"
#: How long an event stream that lost its queue with the broker connection tries to bind a
#: new one before it ends (the client's EventSource then reconnects by itself).
RESUBSCRIBE_LIMIT_S = 60.0
#: How long a health check waits for each of RabbitMQ and Mongo.
HEALTH_TIMEOUT_S = 3.0
#: Results with more trades than this are serialized in a thread, so one big result cannot
#: stall the event loop (every other request, stream and broker heartbeat) while it is encoded.
#: (The equity curve is bounded; trades are what make a result big.)
_OFFLOAD_TRADES = 1000
#: What a 429 asks a client to wait: quotas free up as backtests finish, typically seconds
#: to minutes apart; a client polling faster than this would only be refused again.
RETRY_AFTER_S = 10

BacktestStatusName = Literal["queued", "running", "completed", "failed", "rejected", "cancelled"]


class Accepted(BaseModel):
    """The answer to a submitted backtest: its id and where to follow it."""

    id: str
    status_url: str
    events_url: str


class Progress(BaseModel):
    units_done: int
    unit_count: int


class BacktestStatus(BaseModel):
    """A backtest as the gateway sees it.

    ``queued``: accepted, not yet planned by the scheduler; ``running``: planned, its units
    are being worked on (``progress``); otherwise the result's status, with the ``result``.
    """

    id: str
    status: BacktestStatusName
    progress: Progress
    result: BacktestResult | None = None


class RejectedField(BaseModel):
    loc: list[str | int]
    msg: str


class Rejection(BaseModel):
    """422: what is wrong with the request, one entry per field (``loc`` is its path,
    ``["body"]`` for the request as a whole)."""

    detail: list[RejectedField]


class Health(BaseModel):
    broker: str
    mongo: str


_bearer = HTTPBearer(auto_error=False, description="An API token: `Bearer <token>`")


def tenant_of(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The tenant of the request's API token; 401 without a valid one."""
    if request.app.state.auth == "off":
        return ANONYMOUS
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401,
            "an API token is needed: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="stratorch"'},
        )
    tokens: ApiTokens = request.app.state.tokens
    tenant = tokens.tenant_of(credentials.credentials)
    if tenant is None:
        raise HTTPException(
            401,
            "the API token is not valid",
            headers={"WWW-Authenticate": 'Bearer realm="stratorch", error="invalid_token"'},
        )
    return tenant


Tenant = Annotated[str, Depends(tenant_of)]

Resources = Callable[[Settings], contextlib.AbstractAsyncContextManager[Context]]


def _connect(settings: Settings) -> contextlib.AbstractAsyncContextManager[Context]:
    """The broker, the state store, and the candles (a report draws their prices)."""
    needs: tuple[Need, ...] = ("bus", "store", "candles")
    return lifespan(settings, needs=needs, name="gateway", wait_for_mongo=False)


def create_app(settings: Settings | None = None, *, resources: Resources = _connect) -> FastAPI:
    """The gateway application.

    :param settings: default: from the environment.
    :param resources: enters what the app uses (bus and store) for its lifetime; tests pass
        their own. Nothing is served before it has connected.
    :raises RuntimeError: ``STRATORCH_AUTH=tokens`` (the default) and no token configured.
    """
    settings = settings or Settings()
    tokens = settings.tokens
    if settings.auth == "tokens" and not tokens:
        raise RuntimeError(
            "STRATORCH_API_TOKENS is empty, so no one could use the gateway: set it to"
            " 'tenant:sha256hex,...' (see README, Configuration), or set STRATORCH_AUTH=off"
            " to run without authentication on a machine of your own"
        )
    if settings.auth == "off":
        log.warning(
            "AUTHENTICATION IS OFF (STRATORCH_AUTH=off): anyone who reaches the gateway can"
            " submit backtests and read every backtest; use it only on a machine of your own"
        )

    @contextlib.asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with resources(settings) as ctx:
            app.state.ctx = ctx
            yield

    app = FastAPI(
        title="stratorch",
        summary="Backtests of crypto trading strategies on Binance candles.",
        version="1",
        lifespan=app_lifespan,
    )
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(BrokerError, _unavailable)
    app.add_exception_handler(mongo.MongoError, _unavailable)

    app.state.auth = settings.auth
    app.state.tokens = tokens

    def bus(request: Request) -> RabbitBus:
        ctx: Context = request.app.state.ctx
        return ctx.require_bus()

    def store(request: Request) -> Store:
        ctx: Context = request.app.state.ctx
        if ctx.store is None:
            raise RuntimeError("the gateway runs without a store")
        return ctx.store

    async def found(request: Request, backtest_id: str, tenant: str) -> BacktestStatus:
        """``tenant``'s backtest ``backtest_id`` as it stands; 404 if it has none by that id."""
        _check_id(backtest_id)
        status = await _status(store(request), backtest_id, tenant)
        if status is None:
            raise HTTPException(404, f"no backtest with id {backtest_id!r}")
        return status

    @app.post(
        "/backtests",
        status_code=202,
        response_model=Accepted,
        responses={
            200: {"model": Accepted, "description": "This request was sent before: its backtest"},
            401: {"description": "No valid API token"},
            409: {"model": Rejection, "description": "The id is another request's"},
            413: {"description": f"The body is over {MAX_BODY_BYTES // 1024} KiB"},
            422: {"model": Rejection, "description": "The request is invalid"},
            429: {"description": "The tenant's quota is full; retry after `Retry-After` s"},
        },
        summary="Submit a backtest",
        max_body_size=MAX_BODY_BYTES,
    )
    async def submit_backtest(sent: BacktestRequest, request: Request, tenant: Tenant) -> Response:
        the_store = store(request)
        try:
            backtest, outgoing, new = await submit(
                sent, the_store, tenant=tenant, quota=settings.quota
            )
        except IdTaken as exc:
            return _rejected(409, [RejectedField(loc=["id"], msg=exc.message)])
        except OverQuota as exc:
            log.info("over quota", tenant=tenant)
            raise HTTPException(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except RequestRejected as exc:
            return _rejected(422, _detail(exc))
        try:
            for out in outgoing:
                await publish(bus(request), out)
        except BrokerError:
            await the_store.release(backtest.id)  # never published: stop counting it
            raise
        log.info(
            "accepted",
            backtest_id=backtest.id,
            tenant=tenant,
            symbols=len(backtest.symbols),
            new=new,
        )
        base = str(request.url_for("get_backtest", backtest_id=backtest.id))
        body = Accepted(id=backtest.id, status_url=base, events_url=f"{base}/events")
        return JSONResponse(
            body.model_dump(),
            status_code=202 if new else 200,
            headers={"Location": body.status_url},
        )

    @app.get(
        "/backtests/{backtest_id}",
        response_model=BacktestStatus,
        responses={
            200: {"description": "Status, progress and result"},
            401: {"description": "No valid API token"},
            404: {"description": "No such backtest (of this tenant)"},
        },
        summary="A backtest's status, progress and result",
    )
    async def get_backtest(backtest_id: str, request: Request, tenant: Tenant) -> Response:
        status = await found(request, backtest_id, tenant)
        if status.result is not None and len(status.result.trades) > _OFFLOAD_TRADES:
            body = await asyncio.to_thread(status.model_dump_json)
        else:
            body = status.model_dump_json()
        return Response(body, media_type="application/json")

    @app.delete(
        "/backtests/{backtest_id}",
        response_model=BacktestStatus,
        status_code=202,
        responses={
            202: {
                "description": "Cancelling: its queued units are skipped, its running sandboxes"
                " stopped, and its result will be `cancelled`",
            },
            200: {
                "model": BacktestStatus,
                "description": "It had ended already: its final status, unchanged",
            },
            401: {"description": "No valid API token"},
            404: {"description": "No such backtest (of this tenant)"},
        },
        summary="Cancel a backtest",
    )
    async def cancel_backtest(backtest_id: str, request: Request, tenant: Tenant) -> Response:
        status = await found(request, backtest_id, tenant)
        if status.result is not None:
            return Response(status.model_dump_json(), media_type="application/json")
        cancel = CancelRequest(backtest_id=backtest_id, reason="DELETE /backtests/{id}")
        # As the tenant (as a request is sent): who hears it checks the backtest is theirs.
        user_id = None if tenant == ANONYMOUS else tenant
        out = Outgoing(topology.CANCEL, cancel, backtest_id, user_id=user_id)
        await publish(bus(request), out)
        log.info("cancelling", backtest_id=backtest_id)
        return Response(status.model_dump_json(), status_code=202, media_type="application/json")

    @app.get(
        "/backtests/{backtest_id}/events",
        response_class=EventSourceResponse,
        responses={
            200: {
                "description": "Server-sent events: each `data` is a BacktestEvent; the event"
                " name is its `type`; the stream ends after `finished`",
                "content": {"text/event-stream": {}},
            },
            401: {"description": "No valid API token"},
            404: {"description": "No such backtest (of this tenant)"},
        },
        summary="Follow a backtest's progress",
    )
    async def backtest_events(
        backtest_id: str, request: Request, tenant: Tenant
    ) -> EventSourceResponse:
        _check_id(backtest_id)
        the_bus, the_store = bus(request), store(request)
        if not owned_by(await the_store.get_accepted(backtest_id), tenant):  # before binding
            raise HTTPException(404, f"no backtest with id {backtest_id!r}")
        # Listen first, look second: an event published between the two is then in the queue,
        # not lost.
        queue = await _subscribe(the_bus, backtest_id)
        try:
            status = await _status(the_store, backtest_id, tenant)
        except BaseException:
            await the_bus.delete_temporary(queue)
            raise
        if status is None:
            await the_bus.delete_temporary(queue)
            raise HTTPException(404, f"no backtest with id {backtest_id!r}")
        stream = _events(the_bus, queue, status, lambda: _status(the_store, backtest_id, tenant))
        return EventSourceResponse(stream, ping=int(HEARTBEAT_S))

    @app.get(
        "/backtests/{backtest_id}/report",
        response_class=HTMLResponse,
        responses={
            401: {"description": "No valid API token"},
            404: {"description": "No such backtest (of this tenant)"},
            409: {"description": "It has not finished yet"},
        },
        summary="A finished backtest's HTML report (one self-contained page)",
    )
    async def backtest_report(backtest_id: str, request: Request, tenant: Tenant) -> HTMLResponse:
        status = await found(request, backtest_id, tenant)
        if status.result is None:
            raise HTTPException(
                409, f"backtest {backtest_id!r} is {status.status}: its report comes when it ends"
            )
        planned = await store(request).get_request(backtest_id)  # none for a cache hit
        ctx: Context = request.app.state.ctx
        page = await report.build(status.result, ctx.candles, planned)
        return HTMLResponse(page)

    @app.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": Health, "description": "Something is down"}},
        summary="Whether RabbitMQ and Mongo answer",
    )
    async def healthz(request: Request) -> JSONResponse:
        ctx: Context = request.app.state.ctx
        broker, database = await asyncio.gather(_check_broker(ctx), _check_mongo(ctx))
        ok = broker == "ok" and database == "ok"
        return JSONResponse(
            Health(broker=broker, mongo=database).model_dump(), status_code=200 if ok else 503
        )

    return app


# -- helpers ------------------------------------------------------------------------------------


def _check_id(backtest_id: str) -> None:
    """404 for an id no backtest can have (before it reaches Mongo or a routing key)."""
    if not BACKTEST_ID.match(backtest_id):
        raise HTTPException(404, f"no backtest with id {backtest_id!r}")


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    """RabbitMQ or Mongo failed while serving: 503, saying which (and retry later)."""
    log.error("dependency failed", path=request.url.path, error=str(exc))
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})


async def _invalid_body(request: Request, exc: Exception) -> JSONResponse:
    """422 for a body that is not a ``BacktestRequest``, as for any rejected request.

    FastAPI's locations start with ``body``, dropped (every field is the body's); its JSON
    decode error is at ``("body", <character>)``: the body as a whole, saying where and why.
    """
    assert isinstance(exc, RequestValidationError)
    if isinstance(exc.body, bytes):  # not parsed: its content type is not JSON
        return _rejected(422, _detail(RequestRejected(NOT_JSON)))
    errors = [
        {"loc": (), "msg": f"Invalid JSON: {err['ctx']['error']} at character {err['loc'][-1]}"}
        if err["type"] == "json_invalid"
        else {**err, "loc": err["loc"][1:]}
        for err in exc.errors()
    ]
    return _rejected(422, _detail(rejection(errors)))


def _detail(exc: RequestRejected) -> list[RejectedField]:
    """One entry per invalid field; ``["body"]`` when no field is to blame."""
    if not exc.fields:
        return [RejectedField(loc=["body"], msg=exc.message)]
    return [RejectedField(loc=list(f.loc) or ["body"], msg=f.message) for f in exc.fields]


def _rejected(status_code: int, detail: list[RejectedField]) -> JSONResponse:
    return JSONResponse(Rejection(detail=detail).model_dump(), status_code=status_code)


async def _status(store: Store, backtest_id: str, tenant: str) -> BacktestStatus | None:
    """What the store knows of ``tenant``'s backtest: ``None`` if it has no such backtest
    (another tenant's is not its own), ``queued`` once accepted (by any replica) until the
    scheduler planned it."""
    owner = await store.get_accepted(backtest_id)
    if not owned_by(owner, tenant):
        return None
    result = await store.get_result(backtest_id)
    plan = await store.get_plan(backtest_id)
    sweep = None if plan else await store.get_sweep(backtest_id)
    if sweep is not None:  # a sweep's progress is in its backtests (combinations) ended
        unit_count = len(sweep.children)
        units_done = functools.partial(store.sweep_children_done, backtest_id)
    else:
        unit_count = len(plan.units) if plan else 0
        units_done = functools.partial(store.units_done, backtest_id)
    if result is not None:
        if result.status == "completed" and plan is None and sweep is None:
            unit_count = await units_done()  # its plan may be gone with its outcome: all done
        done = unit_count if result.status == "completed" else await units_done()
        return BacktestStatus(
            id=backtest_id,
            status=result.status,
            progress=Progress(units_done=done, unit_count=unit_count),
            result=result,
        )
    if plan is not None or sweep is not None:
        return BacktestStatus(
            id=backtest_id,
            status="running",
            progress=Progress(units_done=await units_done(), unit_count=unit_count),
        )
    if owner is None:
        return None
    # Accepted (before it was published), not yet planned.
    return BacktestStatus(
        id=backtest_id, status="queued", progress=Progress(units_done=0, unit_count=0)
    )


async def _subscribe(bus: RabbitBus, backtest_id: str) -> str:
    """A temporary queue bound to the backtest's events and results. Results too: a request
    the scheduler rejects gets a result but no ``finished`` event."""
    queue = await bus.bind_temporary(topology.EVENTS, backtest_id)
    try:
        await bus.bind_temporary(topology.RESULTS, backtest_id, queue=queue)
    except BaseException:
        await bus.delete_temporary(queue)
        raise
    return queue


async def _resubscribe(bus: RabbitBus, backtest_id: str) -> str:
    """:func:`_subscribe` again once the broker connection is back (retried with backoff up
    to :data:`RESUBSCRIBE_LIMIT_S`; then the stream ends and the client reconnects)."""
    started, delay = time.monotonic(), 0.5
    while True:
        try:
            return await _subscribe(bus, backtest_id)
        except BrokerUnavailable:
            if time.monotonic() - started + delay > RESUBSCRIBE_LIMIT_S:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _events(
    bus: RabbitBus,
    queue: str,
    status: BacktestStatus,
    look: Callable[[], Awaitable[BacktestStatus | None]],
) -> AsyncIterator[ServerSentEvent]:
    """The backtest's events from ``queue`` until ``finished``; just that if it is over.

    ``units_done`` never goes back (:meth:`BacktestEvent.after`). The queue dies with the
    broker connection (a broker restart, a network blip): the stream
    then binds a new one and looks at the store again (``look``), so it goes on — with the
    events published in the gap missing, the ``finished`` one never.
    """
    last: BacktestEvent | None = None
    try:
        while status.result is None:
            done, count = status.progress.units_done, status.progress.unit_count
            try:
                async with contextlib.aclosing(bus.consume(queue)) as deliveries:
                    async for delivery in deliveries:
                        await delivery.ack()
                        event = await _decode(delivery.body, status.id, done, count)
                        if event is None:
                            continue
                        last = event = event.after(last)
                        done, count = event.units_done, event.unit_count
                        yield _sse(event)
                        if event.type == "finished":
                            return
                return  # the bus is closing: the gateway stops
            except BrokerUnavailable as exc:
                log.warning("event stream lost its queue; subscribing again", error=str(exc))
            queue = await _resubscribe(bus, status.id)
            status = await look() or status
        progress = status.progress
        yield _sse(
            BacktestEvent.finished(
                status.id,
                status.result.status,
                units_done=progress.units_done,
                unit_count=progress.unit_count,
            )
        )
    finally:
        # Shielded: when the client goes, the stream is cancelled, and cancelled again at
        # every await (anyio); the queue must go anyway, not linger with messages in it.
        await asyncio.shield(bus.delete_temporary(queue))


def _sse(event: BacktestEvent) -> ServerSentEvent:
    return ServerSentEvent(event.model_dump_json(), event=event.type)


async def _decode(
    body: bytes, backtest_id: str, units_done: int, unit_count: int
) -> BacktestEvent | None:
    """An event as it came, or a ``finished`` event made from a result (the queue gets both:
    the result comes first, and is all there is for a request the scheduler rejected)."""
    if len(body) < 64 * 1024:
        with contextlib.suppress(ValidationError):
            return BacktestEvent.model_validate_json(body)
    try:
        result = await asyncio.to_thread(_ResultStatus.model_validate_json, body)
    except ValidationError:
        log.warning("unreadable message on an event stream", backtest_id=backtest_id)
        return None
    return BacktestEvent.finished(
        backtest_id, result.status, units_done=units_done, unit_count=unit_count
    )


class _ResultStatus(BaseModel):
    """Just the status of a ``BacktestResult`` (reading the rest would be wasted work)."""

    status: Status


async def _check_broker(ctx: Context) -> str:
    try:
        await ctx.require_bus().ping(timeout_s=HEALTH_TIMEOUT_S)
    except (BrokerError, RuntimeError) as exc:
        return f"down: {exc}"
    return "ok"


async def _check_mongo(ctx: Context) -> str:
    if ctx.mongo is None:
        return "down: not connected"
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            await ctx.mongo.admin.command("ping")
    except (PyMongoError, TimeoutError) as exc:
        return f"down: {exc!r}"
    return "ok"
