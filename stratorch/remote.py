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
bundled sample), before anything is sent. The two ways in are :mod:`stratorch.transports`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, Self, TypeVar
from urllib.parse import urlsplit

from shared.errors import RequestRejected
from shared.messages import BacktestRequest, BacktestResult, ErrorInfo
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

if TYPE_CHECKING:
    from stratorch.transports import Broker, Gateway

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
        gateway: Gateway | None = None,
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


class AsyncClient:
    """The stack, from ``async`` code: ``async with await stratorch.connect_async(url) as
    stack:``. :class:`Client` is the same for plain code and notebooks."""

    def __init__(self, transport: Gateway | Broker, settings: Settings) -> None:
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
            request_json(
                strategy, params, symbols=symbols, interval=interval, start=start, end=end,
                **request_fields,
            ),
            candles, state, sandbox, audit,
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
            request_json(
                strategy, params, symbols=symbols, interval=interval, start=start, end=end,
                **request_fields,
            ),
            candles, state, sandbox, audit,
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
        raw: bytes,
        candles: str | Path | None,
        state: str | Path | None,
        sandbox: Literal["process", "docker"] | None,
        audit: bool,
    ) -> tuple[bytes, AuditReport | None]:
        """The request ``raw``, and the report of the audit it passed (``audit``)."""
        if state is not None:
            raise TypeError("state cannot be given on the stack: it keeps its state in MongoDB")
        if not audit:
            return raw, None
        received = prepare(raw)
        if received.problem is not None:
            raise rejected(raw, received.problem)
        assert received.request is not None
        store = local_candles(candles, self._settings)
        return raw, await audit_first(received.request, store, sandbox, self._settings)


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
    # Imported here: httpx and aio-pika cost every `stratorch run` 0.1 s otherwise.
    from stratorch.transports import Broker, Gateway

    transport: Gateway | Broker
    if scheme in ("http", "https"):
        transport = Gateway(target, token)
    elif scheme in ("amqp", "amqps"):
        transport = Broker(target, local_candles(None, settings))
    else:
        from shared.broker import redact  # a password in a URL is never shown

        raise ValueError(
            f"{redact(target)!r} is not a stack's URL: give the gateway's (http:// or https://)"
            " or the broker's (amqp:// or amqps://)"
        )
    await transport.open()
    return AsyncClient(transport, settings)


# -- helpers ------------------------------------------------------------------------------------


def rejected(raw: bytes, problem: RequestRejected) -> BacktestRejected:
    """:class:`BacktestRejected`, as for a request ``stratorch.backtest`` rejects."""
    try:
        backtest_id = str(json.loads(raw).get("id") or "")
    except (ValueError, AttributeError):
        backtest_id = ""
    result = BacktestResult(
        backtest_id=backtest_id, status="rejected", errors=[ErrorInfo.from_error(problem)]
    )
    return BacktestRejected(Backtest(result, None, None))
