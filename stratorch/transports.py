"""How :mod:`stratorch.remote`'s client reaches the stack: :class:`Gateway` (its HTTP API,
with httpx) and :class:`Broker` (the broker API, with :class:`~shared.broker.RabbitBus`).

Both give the same five calls (submit, status, wait, cancel, and a result as a
:class:`~stratorch.remote.StackBacktest`) and raise :mod:`stratorch.remote`'s errors. Their
own module so that ``import stratorch`` (and every ``stratorch run``) does not import httpx
and aio-pika: :func:`stratorch.remote.connect_async` imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx
from pydantic import BaseModel

from shared import topology
from shared.broker import BrokerError, BrokerRefused, BrokerUnavailable, RabbitBus, redact
from shared.errors import FieldError, RequestRejected
from shared.messages import BacktestEvent, BacktestRequest, BacktestResult, CancelRequest
from stratorch.embedded import EventCallback, prepare
from stratorch.remote import (
    StackBacktest,
    StackError,
    StackRefused,
    StackStatus,
    StackUnreachable,
    StatusName,
    UnknownBacktest,
    rejected,
)

__all__ = ["Broker", "Followed", "Gateway"]

#: How long one HTTP call may wait (the event stream excepted: it waits for the backtest).
HTTP_TIMEOUT_S = 30.0
#: The pause before following a backtest's event stream again when it ended without its end.
RESUBSCRIBE_S = 1.0


class Gateway:
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
            raise rejected(raw, RequestRejected.of_fields(_fields(response)))
        accepted: dict[str, Any] = response.json()
        return str(accepted["id"])

    async def status(self, backtest_id: str) -> StackStatus:
        response = await self._call("GET", _path(backtest_id), backtest_id=backtest_id)
        return _status(response.content)

    async def wait(self, backtest_id: str, on_event: EventCallback | None) -> BacktestResult:
        """Follow the event stream until ``finished``, then read the result. A stream that
        ends without one (the gateway lost its broker queue for good) is followed again."""
        while True:
            async with contextlib.aclosing(self._events(backtest_id)) as events:
                async for event in events:
                    if on_event is not None:
                        on_event(event)
                    if event.type == "finished":
                        break
            status = await self.status(backtest_id)
            if status.result is not None:
                return status.result
            await asyncio.sleep(RESUBSCRIBE_S)

    async def _events(self, backtest_id: str) -> AsyncGenerator[BacktestEvent, None]:
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
class Followed:
    """A backtest this broker client submitted: its request, progress and result."""

    request: BacktestRequest | None
    queue: str
    result: asyncio.Future[BacktestResult]
    last: BacktestEvent | None = None
    listeners: list[EventCallback] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def tell(self, event: BacktestEvent) -> None:
        self.last = event = event.after(self.last)
        for listener in self.listeners:
            listener(event)


class Broker:
    """The broker API: publish requests as the URL's user, listen for their answers."""

    def __init__(self, url: str, local: Path) -> None:
        self.where = redact(url)
        self.user = unquote(urlsplit(url).username or "guest")
        self._local = local  # the candles a report's prices come from
        self._bus = RabbitBus(url, name="stratorch-client", connect_attempts=1)
        self._followed: dict[str, Followed] = {}

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
            raise rejected(raw, received.problem)
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
            followed = Followed(received.request, queue, future)
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

    async def _listen(self, backtest_id: str, followed: Followed) -> None:
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

    def _find(self, backtest_id: str) -> Followed:
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
