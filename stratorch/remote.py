"""``stratorch.connect``: backtests on the real stack, through its gateway or its broker.

``stratorch.connect(url)`` gives a :class:`Client` whose ``backtest(...)`` takes the arguments
of :func:`stratorch.backtest` and returns the same :class:`~stratorch.api.Backtest`, run by the
services instead of this process; ``stratorch submit``, ``status`` and ``result`` are this
module on the command line. Two ways in:

- an ``http(s)://`` URL: the gateway's HTTP API, with ``Authorization: Bearer <token>``
  (``STRATORCH_API_TOKEN``). Anything it has stored can be asked for: status, result and
  report of any of the tenant's backtests, from any machine, at any time.
- an ``amqp(s)://`` URL: the broker API, as ``examples/publish_request.py`` uses it (the
  tenant is the URL's RabbitMQ user). The broker keeps nothing to look up: a result goes to
  whoever listened for its id when it was published. So this client listens for each backtest
  it submits (a queue bound before publishing) and can give the status and result of those,
  for as long as it stays connected; any other id needs the gateway.

The strategy code still runs in the stack's sandboxes on the stack's candles; ``audit=True``
runs the look-ahead audit here, on the local candles (``candles``, ``STRATORCH_CANDLES`` or the
bundled sample), before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, Literal, ParamSpec, Self, TypeVar
from urllib.parse import quote, unquote, urlsplit

import httpx
from pydantic import BaseModel

from shared import topology
from shared.broker import BrokerError, BrokerRefused, BrokerUnavailable, RabbitBus, redact
from shared.errors import FieldError, RequestRejected
from shared.messages import (
    BacktestEvent,
    BacktestRequest,
    BacktestResult,
    CancelRequest,
    ErrorInfo,
)
from shared.settings import Settings
from stratorch.api import (
    Backtest,
    BacktestRejected,
    Strategy,
    audit_first,
    finished,
    local_candles,
    request_json,
)
from stratorch.audit import AuditReport
from stratorch.embedded import EventCallback, prepare

__all__ = [
    "AsyncClient",
    "Client",
    "StackError",
    "StackRefused",
    "StackStatus",
    "StackUnreachable",
    "UnknownBacktest",
    "connect",
    "connect_async",
]

#: A backtest's status on the stack (the gateway's ``BacktestStatus.status``).
StatusName = Literal["queued", "running", "completed", "failed", "rejected", "cancelled"]
_T = TypeVar("_T")
_P = ParamSpec("_P")

#: How long one HTTP call may wait (the event stream excepted: it waits for the backtest).
HTTP_TIMEOUT_S = 30.0


class StackError(Exception):
    """The stack could not be used; the message says why and what to check."""


class StackUnreachable(StackError, ConnectionError):
    """The gateway or the broker cannot be reached (or answers that it is down)."""


class StackRefused(StackError, PermissionError):
    """The stack refused us: a missing or invalid API token, a refused broker login, or the
    tenant's quota is full (retry later)."""


class UnknownBacktest(StackError, LookupError):
    """No backtest with this id: never submitted, another tenant's, expired, or (over the
    broker) not submitted by this client."""


@dataclass(frozen=True)
class StackStatus:
    """Where a backtest on the stack stands: ``queued`` (accepted, not planned yet),
    ``running`` (``units_done`` of ``unit_count``), else its result's status, with the
    ``result``."""

    id: str
    status: StatusName
    units_done: int = 0
    unit_count: int = 0
    result: BacktestResult | None = None


class StackBacktest(Backtest):
    """A :class:`~stratorch.api.Backtest` the stack ran. Its report is the gateway's (``GET
    /backtests/{id}/report``, prices from the stack's candles) when it came through the
    gateway; through the broker it is drawn here, with prices from the local candles."""

    def __init__(
        self,
        result: BacktestResult,
        request: BacktestRequest | None,
        candles: Path | None,
        *,
        where: str,
        gateway: _Gateway | None = None,
    ) -> None:
        super().__init__(result, request, candles)
        self.where = where
        self._gateway = gateway

    def report(self, path: str | Path) -> Path:
        if self._gateway is None:
            return super().report(path)
        target = Path(path)
        target.write_text(self._gateway.report_page(self.id), encoding="utf-8")
        return target

    @property
    def candles_from(self) -> str:
        return f"the stack's, via {self.where}"


class _Gateway:
    """The gateway's HTTP API."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.where = self.url
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self._headers, timeout=HTTP_TIMEOUT_S
        )

    async def open(self) -> None:
        """Nothing to open: HTTP connects per call (so an unreachable gateway is found then)."""

    async def aclose(self) -> None:
        await self._http.aclose()

    async def submit(self, raw: bytes) -> str:
        response = await self._call(
            "POST", "/backtests", content=raw, headers={"content-type": "application/json"}
        )
        if response.status_code in (409, 413, 422):
            raise _rejected(raw, RequestRejected.of_fields(_fields(response)))
        accepted: dict[str, Any] = response.json()
        return str(accepted["id"])

    async def status(self, backtest_id: str) -> StackStatus:
        response = await self._call("GET", _path(backtest_id), backtest_id=backtest_id)
        return _status(response.content)

    async def wait(self, backtest_id: str, on_event: EventCallback | None) -> BacktestResult:
        """Follow the event stream until ``finished``, then read the result. A stream that
        ends without one (the gateway lost its broker queue for good) is followed again."""
        while True:
            async for event in self._events(backtest_id):
                if on_event is not None:
                    on_event(event)
                if event.type == "finished":
                    break
            status = await self.status(backtest_id)
            if status.result is not None:
                return status.result

    async def _events(self, backtest_id: str) -> AsyncIterator[BacktestEvent]:
        """The server-sent events of ``GET /backtests/{id}/events``, until the stream ends."""
        path = f"{_path(backtest_id)}/events"
        timeout = httpx.Timeout(HTTP_TIMEOUT_S, read=None)  # a unit may take long: no limit
        try:
            async with self._http.stream("GET", path, timeout=timeout) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._check(response, backtest_id)
                data: list[str] = []
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif not line and data:
                        yield BacktestEvent.model_validate_json("\n".join(data))
                        data = []
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    async def cancel(self, backtest_id: str) -> None:
        await self._call("DELETE", _path(backtest_id), backtest_id=backtest_id)

    def report_page(self, backtest_id: str) -> str:
        """The HTML report the gateway draws (synchronous: :meth:`Backtest.report` is)."""
        try:
            response = httpx.get(
                f"{self.url}{_path(backtest_id)}/report",
                headers=self._headers,
                timeout=HTTP_TIMEOUT_S * 4,
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._check(response, backtest_id)
        return response.text

    def backtest(self, result: BacktestResult, request: BacktestRequest | None) -> StackBacktest:
        return StackBacktest(result, request, None, where=self.where, gateway=self)

    async def _call(
        self, method: str, path: str, *, backtest_id: str | None = None, **kw: Any
    ) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._check(response, backtest_id)
        return response

    def _unreachable(self, exc: Exception) -> StackUnreachable:
        return StackUnreachable(
            f"cannot reach the gateway at {self.url} ({exc!r}): is it running, and is the URL"
            " (--gateway, STRATORCH_GATEWAY_URL) right?"
        )

    def _check(self, response: httpx.Response, backtest_id: str | None) -> None:
        """Raise what an error answer means; 409/413/422 (a rejected request) are the
        caller's to read."""
        code = response.status_code
        if code < 400 or code in (409, 413, 422):
            return
        detail = _detail(response)
        if code == 401:
            raise StackRefused(
                f"the gateway at {self.url} wants a valid API token ({detail}): set"
                " STRATORCH_API_TOKEN to yours"
            )
        if code == 404 and backtest_id is not None:
            raise UnknownBacktest(f"no backtest with id {backtest_id!r} at {self.url}")
        if code == 429:
            wait = response.headers.get("retry-after", "a few")
            raise StackRefused(f"{detail}; retry in {wait} s")
        if code == 503:
            raise StackUnreachable(f"the gateway at {self.url} is up, but {detail}; retry later")
        raise StackError(f"the gateway at {self.url} answered {code}: {detail}")


@dataclass
class _Followed:
    """A backtest this broker client submitted: its request, progress and result."""

    request: BacktestRequest | None
    queue: str
    result: asyncio.Future[BacktestResult]
    last: BacktestEvent | None = None
    listeners: list[EventCallback] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def tell(self, event: BacktestEvent) -> None:
        self.last = event
        for listener in self.listeners:
            listener(event)


class _Broker:
    """The broker API: publish requests as the URL's user, listen for their answers."""

    def __init__(self, url: str, local: Path) -> None:
        self.where = redact(url)
        self.user = unquote(urlsplit(url).username or "guest")
        self._local = local  # the candles a report's prices come from
        self._bus = RabbitBus(url, name="stratorch-client", connect_attempts=1)
        self._followed: dict[str, _Followed] = {}

    async def open(self) -> None:
        try:
            await self._bus.connect()
        except BrokerRefused as exc:
            raise StackRefused(str(exc)) from exc
        except BrokerUnavailable as exc:
            raise StackUnreachable(str(exc)) from exc

    async def aclose(self) -> None:
        for followed in self._followed.values():
            if followed.task is not None:
                followed.task.cancel()
        tasks = [f.task for f in self._followed.values() if f.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._bus.aclose()

    async def submit(self, raw: bytes) -> str:
        """Check the request here (the broker answers a bad one only on the results exchange),
        give it an id (``<user>.<hex>``: a tenant may listen only to its own), bind a queue
        to its result, refusal and events, then publish it."""
        received = prepare(raw)
        if received.problem is not None:
            raise _rejected(raw, received.problem)
        request: dict[str, Any] = json.loads(raw)
        backtest_id = str(request.setdefault("id", f"{self.user}.{uuid.uuid4().hex}"))
        body = json.dumps(request).encode()
        try:
            queue = await self._bus.bind_temporary(topology.RESULTS, backtest_id)
            await self._bus.bind_temporary(
                topology.RESULTS, topology.duplicate_key(backtest_id), queue=queue
            )
            await self._bus.bind_temporary(topology.EVENTS, backtest_id, queue=queue)
            future = asyncio.get_running_loop().create_future()
            followed = _Followed(received.request, queue, future)
            followed.task = asyncio.create_task(self._listen(backtest_id, followed))
            self._followed[backtest_id] = followed
            await self._bus.publish(
                topology.REQUESTS,
                "stratorch.client",
                body,
                message_id=uuid.uuid4().hex,
                correlation_id=backtest_id,
                user_id=self.user,
            )
        except BrokerRefused as exc:
            raise StackRefused(str(exc)) from exc
        except BrokerError as exc:
            raise StackUnreachable(str(exc)) from exc
        return backtest_id

    async def _listen(self, backtest_id: str, followed: _Followed) -> None:
        """Take the backtest's events and, at last, its result from its queue."""
        try:
            async with contextlib.aclosing(self._bus.consume(followed.queue)) as deliveries:
                async for delivery in deliveries:
                    await delivery.ack()
                    if b'"type"' in delivery.body[:200]:  # an event: a result has no type
                        followed.tell(BacktestEvent.model_validate_json(delivery.body))
                        continue
                    # The result comes before its `finished` event (and a cache hit's or a
                    # rejection's without one): it ends the listening, with its own `finished`.
                    result = BacktestResult.model_validate_json(delivery.body)
                    last = followed.last
                    done, count = (last.units_done, last.unit_count) if last else (0, 0)
                    followed.tell(
                        BacktestEvent.finished(
                            backtest_id, result.status, units_done=done, unit_count=count
                        )
                    )
                    followed.result.set_result(result)
                    return
        except BrokerError as exc:
            followed.result.set_exception(
                StackUnreachable(
                    f"the connection to the broker was lost while waiting for {backtest_id}"
                    f" ({exc}); its result is stored on the stack: ask the gateway for it"
                )
            )
        finally:
            await self._bus.delete_temporary(followed.queue)

    def _find(self, backtest_id: str) -> _Followed:
        followed = self._followed.get(backtest_id)
        if followed is None:
            raise UnknownBacktest(
                f"{backtest_id!r} was not submitted by this client: the broker keeps no"
                " backtests to look up, only the gateway can tell the status or result of"
                " another (connect to its http:// URL)"
            )
        return followed

    async def status(self, backtest_id: str) -> StackStatus:
        followed = self._find(backtest_id)
        last = followed.last
        done, count = (last.units_done, last.unit_count) if last else (0, 0)
        if followed.result.done() and followed.result.exception() is None:
            result = followed.result.result()
            return StackStatus(backtest_id, result.status, done, count, result)
        return StackStatus(backtest_id, "running" if last else "queued", done, count)

    async def wait(self, backtest_id: str, on_event: EventCallback | None) -> BacktestResult:
        followed = self._find(backtest_id)
        if on_event is None:
            return await asyncio.shield(followed.result)
        if followed.last is not None:
            on_event(followed.last)
        followed.listeners.append(on_event)
        try:
            return await asyncio.shield(followed.result)
        finally:
            followed.listeners.remove(on_event)

    async def cancel(self, backtest_id: str) -> None:
        cancel = CancelRequest(backtest_id=backtest_id, reason="stratorch client")
        try:
            await self._bus.publish(
                topology.CANCEL,
                backtest_id,
                cancel.model_dump_json().encode(),
                message_id=uuid.uuid4().hex,
                correlation_id=backtest_id,
                user_id=self.user,
            )
        except BrokerError as exc:
            raise StackUnreachable(str(exc)) from exc

    def backtest(self, result: BacktestResult, request: BacktestRequest | None) -> StackBacktest:
        followed = self._followed.get(result.backtest_id)
        request = request or (followed.request if followed else None)
        return StackBacktest(result, request, self._local, where=self.where)


class AsyncClient:
    """The stack, from ``async`` code: ``async with await stratorch.connect_async(url) as
    stack:``. :class:`Client` is the same for plain code and notebooks."""

    def __init__(self, transport: _Gateway | _Broker, settings: Settings) -> None:
        self._transport = transport
        self._settings = settings

    @property
    def url(self) -> str:
        """Where it sends backtests (without a password)."""
        return self._transport.where

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def backtest(
        self,
        /,
        strategy: Strategy,
        symbols: list[str],
        interval: str = "1h",
        start: str | date | None = None,
        end: str | date | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        candles: str | Path | None = None,
        state: str | Path | None = None,
        sandbox: Literal["process", "docker"] | None = None,
        on_event: EventCallback | None = None,
        audit: bool = False,
        **request_fields: Any,
    ) -> Backtest:
        """:func:`stratorch.backtest` on the stack: the same arguments, the same result and
        errors, the work done by the stack's workers on its candles. Returns when it ends.

        ``candles`` and ``sandbox`` are where ``audit=True`` runs the look-ahead audit: here,
        on the local candles, before the request is sent (the stack's candles should be the
        same market data). ``state`` cannot be given: the stack keeps its state in MongoDB.

        :raises StackUnreachable: the gateway or the broker cannot be reached.
        :raises StackRefused: no valid token, a refused login, or a full quota.
        """
        raw, audited = await self._request(
            strategy, symbols, interval, start, end, params, candles, state, sandbox, audit,
            request_fields,
        )  # fmt: skip
        backtest_id = await self._transport.submit(raw)
        done = await self.wait(backtest_id, on_event=on_event)
        done.audit = audited
        return finished(done)

    async def submit(
        self,
        /,
        strategy: Strategy,
        symbols: list[str],
        interval: str = "1h",
        start: str | date | None = None,
        end: str | date | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        candles: str | Path | None = None,
        state: str | Path | None = None,
        sandbox: Literal["process", "docker"] | None = None,
        audit: bool = False,
        **request_fields: Any,
    ) -> str:
        """Send the backtest :meth:`backtest` would run, and return its id at once (ask
        :meth:`status`, :meth:`result`, :meth:`cancel` with it).

        :raises BacktestRejected: the request is invalid (the gateway's or this client's
            check), naming each field.
        """
        raw, _ = await self._request(
            strategy, symbols, interval, start, end, params, candles, state, sandbox, audit,
            request_fields,
        )  # fmt: skip
        return await self._transport.submit(raw)

    async def submit_json(self, raw: bytes) -> str:
        """Send a request as JSON (a request file's bytes) and return its id."""
        return await self._transport.submit(raw)

    async def status(self, backtest_id: str) -> StackStatus:
        """Where it stands now (the gateway asks the stack; the broker client knows only the
        backtests it submitted).

        :raises UnknownBacktest: no such backtest.
        """
        return await self._transport.status(backtest_id)

    async def result(self, backtest_id: str, *, on_event: EventCallback | None = None) -> Backtest:
        """Its result as a :class:`Backtest` once it has ended (waiting for that, with each
        progress event to ``on_event``); raises as :func:`stratorch.backtest` does.

        :raises UnknownBacktest: no such backtest.
        :raises BacktestFailed: it failed or was cancelled.
        """
        return finished(await self.wait(backtest_id, on_event=on_event))

    async def wait(self, backtest_id: str, *, on_event: EventCallback | None = None) -> Backtest:
        """:meth:`result`, without raising for a failed, rejected or cancelled one."""
        result = await self._transport.wait(backtest_id, on_event)
        return self._transport.backtest(result, None)

    async def cancel(self, backtest_id: str) -> None:
        """Ask the stack to cancel it: its result is then ``cancelled`` (one that has ended
        keeps its result).

        :raises UnknownBacktest: no such backtest (gateway only: the broker does not say).
        """
        await self._transport.cancel(backtest_id)

    async def _request(
        self,
        strategy: Strategy,
        symbols: list[str],
        interval: str,
        start: str | date | None,
        end: str | date | None,
        params: Mapping[str, Any] | None,
        candles: str | Path | None,
        state: str | Path | None,
        sandbox: Literal["process", "docker"] | None,
        audit: bool,
        request_fields: dict[str, Any],
    ) -> tuple[bytes, AuditReport | None]:
        """The request as JSON, and the report of the audit it passed (``audit``)."""
        if state is not None:
            raise TypeError("state cannot be given on the stack: it keeps its state in MongoDB")
        raw = request_json(strategy, symbols, interval, start, end, params, **request_fields)
        if audit:
            received = prepare(raw)
            if received.problem is not None:
                raise _rejected(raw, received.problem)
            assert received.request is not None
            store = local_candles(candles, self._settings)
            return raw, await audit_first(received.request, store, sandbox, self._settings)
        return raw, None


def _blocking(
    method: Callable[Concatenate[AsyncClient, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[Client, _P], _T]:
    """``method`` of :class:`AsyncClient` as a plain method of :class:`Client`: the call runs
    on the client's event loop, and returns what it returns (docs and signature are its)."""

    def call(self: Client, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._call(method(self._client, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


class Client:
    """The stack, from plain code or a notebook: ``stack = stratorch.connect(url)``, then
    ``stack.backtest(...)`` as :func:`stratorch.backtest`. Close it (``stack.close()``, or
    ``with stratorch.connect(url) as stack:``) when done.

    It keeps an event loop on a thread of its own, so that its connection (and, over the
    broker, its listening queues) live from one call to the next, and so that it works in a
    Jupyter cell, whose thread already runs a loop. Each method is :class:`AsyncClient`'s.
    """

    def __init__(self, url: str | None = None, *, token: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="stratorch-client", daemon=True
        )
        self._thread.start()
        try:
            self._client = self._call(connect_async(url, token=token))
        except BaseException:
            self._stop()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:  # Ctrl-C in the caller's thread: stop the call too
            future.cancel()
            raise

    @property
    def url(self) -> str:
        return self._client.url

    backtest = _blocking(AsyncClient.backtest)
    submit = _blocking(AsyncClient.submit)
    submit_json = _blocking(AsyncClient.submit_json)
    status = _blocking(AsyncClient.status)
    result = _blocking(AsyncClient.result)
    wait = _blocking(AsyncClient.wait)
    cancel = _blocking(AsyncClient.cancel)

    def close(self) -> None:
        """Close the connection (over the broker: stop listening for results)."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._client.aclose())
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(url: str | None = None, *, token: str | None = None) -> Client:
    """A client of the stack at ``url``: the gateway (``http://host:8000``) or the broker
    (``amqp://user:password@host:5672/vhost``).

    :param url: default ``STRATORCH_GATEWAY_URL``, else ``STRATORCH_AMQP_URL``.
    :param token: the gateway's API token; default ``STRATORCH_API_TOKEN``.
    :raises ValueError: ``url`` is neither ``http(s)://`` nor ``amqp(s)://``.
    :raises StackUnreachable: the broker cannot be reached (the gateway is first reached by
        the first call).
    :raises StackRefused: the broker refused the login.
    """
    return Client(url, token=token)


async def connect_async(url: str | None = None, *, token: str | None = None) -> AsyncClient:
    """:func:`connect`, for ``async`` code: ``async with await connect_async(url) as stack``."""
    settings = Settings.from_env()
    target = url or settings.gateway_url or settings.amqp_url.get_secret_value()
    if token is None and settings.api_token is not None:
        token = settings.api_token.get_secret_value()
    scheme = urlsplit(target).scheme
    transport: _Gateway | _Broker
    if scheme in ("http", "https"):
        transport = _Gateway(target, token)
    elif scheme in ("amqp", "amqps"):
        transport = _Broker(target, local_candles(None, settings))
    else:
        raise ValueError(
            f"{redact(target)!r} is not a stack's URL: give the gateway's (http:// or https://)"
            " or the broker's (amqp:// or amqps://)"
        )
    await transport.open()
    return AsyncClient(transport, settings)


# -- helpers ------------------------------------------------------------------------------------


def _path(backtest_id: str) -> str:
    return f"/backtests/{quote(backtest_id, safe='')}"


class _Progress(BaseModel):
    units_done: int
    unit_count: int


class _Answer(BaseModel):
    """A ``GET /backtests/{id}`` answer (the gateway's ``BacktestStatus``)."""

    id: str
    status: StatusName
    progress: _Progress
    result: BacktestResult | None = None


def _status(body: bytes) -> StackStatus:
    answer = _Answer.model_validate_json(body)
    progress = answer.progress
    return StackStatus(
        answer.id, answer.status, progress.units_done, progress.unit_count, answer.result
    )


def _detail(response: httpx.Response) -> str:
    """The ``detail`` of an error answer (FastAPI's), else its text."""
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return response.text.strip() or response.reason_phrase
    return detail if isinstance(detail, str) else json.dumps(detail)


def _fields(response: httpx.Response) -> list[FieldError]:
    """A rejected request's fields (409, 422), or what a 413 says."""
    if response.status_code == 413:
        return [FieldError((), "the request is over the gateway's 1 MiB")]
    try:
        detail = response.json()["detail"]
        return [
            FieldError(tuple(d["loc"]) if d["loc"] != ["body"] else (), d["msg"]) for d in detail
        ]
    except (ValueError, KeyError, TypeError):
        return [FieldError((), _detail(response))]


def _rejected(raw: bytes, problem: RequestRejected) -> BacktestRejected:
    """:class:`BacktestRejected`, as for a request ``stratorch.backtest`` rejects."""
    try:
        backtest_id = str(json.loads(raw).get("id") or "")
    except (ValueError, AttributeError):
        backtest_id = ""
    result = BacktestResult(
        backtest_id=backtest_id, status="rejected", errors=[ErrorInfo.from_error(problem)]
    )
    return BacktestRejected(Backtest(result, None, None))
