"""The Docker API proxy: dockerd's API, cut down to what a sandbox needs.

In the compose stack this is the only container holding dockerd's socket; the scheduler and
the symbol workers reach dockerd through it (``DOCKER_HOST=tcp://docker-proxy:2375`` on a
network of their own), so a compromised worker can run sandbox containers and nothing else:
:mod:`services.docker_proxy.policy` says what passes. A refused request is answered
``403 {"message": ...}`` (what dockerd's own errors look like, so the client's error names
the reason) and logged.

Each client connection carries one request: it is parsed completely, checked, re-written
canonically (so the client cannot smuggle a second request past the check) and sent on a
connection of its own to dockerd with ``Connection: close``; the answer is relayed back as
it comes. ``attach`` switches protocols: after dockerd's 101, the bytes flow both ways (the
container's stdin and output), still on that one checked container.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import structlog

from services.docker_proxy.policy import (
    LIVE_STATES,
    Allowed,
    Denied,
    Rules,
    check,
    check_container,
    check_count,
)
from shared.sandbox.docker import LABEL

_log = structlog.get_logger("docker_proxy")

#: Longest request head and body accepted (a container config is a few KiB).
_MAX_HEAD = 64 * 1024
_MAX_BODY = 1024 * 1024
#: Seconds a client may take to send its request.
_READ_TIMEOUT_S = 30.0
_CHUNK = 64 * 1024


class _BadRequest(Exception):
    pass


class _NoSuchContainer(Exception):
    """dockerd's 404, passed on as such: a client removing a container already gone expects
    it (DockerSandbox does)."""


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    content_type: str | None
    body: bytes


class DockerProxy:
    """Serve the filtered API on ``host:port``, forwarding to dockerd's unix socket."""

    def __init__(self, rules: Rules, upstream: str) -> None:
        self.rules = rules
        self.upstream = upstream
        self._session: aiohttp.ClientSession | None = None

    async def serve(self, host: str, port: int) -> asyncio.Server:
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.upstream))
        return await asyncio.start_server(self._handle, host, port, limit=_MAX_HEAD)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT_S):
                    request = await _read_request(reader)
                allowed = check(
                    self.rules, request.method, request.path, request.query, request.body
                )
                if allowed.container is not None:
                    check_container(self.rules, await self._inspect(allowed.container))
                elif allowed.path.endswith("/containers/create"):
                    check_count(self.rules, await self._live_sandboxes())
            except _BadRequest as exc:
                await _answer(writer, 400, str(exc))
                return
            except _NoSuchContainer as exc:
                await _answer(writer, 404, str(exc))
                return
            except Denied as exc:
                _log.warning("docker request refused", reason=str(exc))
                await _answer(writer, 403, f"refused by the stratorch docker proxy: {exc}")
                return
            except TimeoutError:
                return
            await self._forward(request, allowed, reader, writer)
        except (ConnectionError, OSError) as exc:
            _log.debug("docker proxy connection ended", error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _live_sandboxes(self) -> int:
        assert self._session is not None
        filters = json.dumps({"label": [f"{LABEL}=1"], "status": list(LIVE_STATES)})
        async with self._session.get(
            "http://docker/containers/json", params={"all": "1", "filters": filters}
        ) as response:
            if response.status != 200:
                raise Denied(f"cannot count sandbox containers: {response.status} from dockerd")
            return len(await response.json())

    async def _inspect(self, container: str) -> dict[str, object]:
        assert self._session is not None
        async with self._session.get(f"http://docker/containers/{container}/json") as response:
            if response.status == 404:
                raise _NoSuchContainer(f"No such container: {container}")
            if response.status != 200:
                raise Denied(f"container {container[:12]}: {response.status} from dockerd")
            found: dict[str, object] = await response.json()
            return found

    async def _forward(
        self,
        request: _Request,
        allowed: Allowed,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.upstream)
        try:
            up_writer.write(_canonical(request, allowed))
            await up_writer.drain()
            if allowed.upgrade:
                head = await up_reader.readuntil(b"\r\n\r\n")
                client_writer.write(head)
                await client_writer.drain()
                if head.split(b" ", 2)[1:2] == [b"101"]:
                    await _splice(
                        _pipe(up_reader, client_writer),
                        _pipe(client_reader, up_writer),
                        upgraded=True,
                    )
                    return
            # One request per connection: the client may not send anything more.
            await _splice(
                _pipe(up_reader, client_writer), _until_eof(client_reader), upgraded=False
            )
        finally:
            up_writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await up_writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> _Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest("request head too large") from None
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("the client left before sending a request") from None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise _BadRequest("malformed request line") from None
    if version not in ("HTTP/1.1", "HTTP/1.0") or not target.startswith("/"):
        raise _BadRequest("malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest("malformed header")
            headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _BadRequest("chunked request bodies are not accepted")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _BadRequest("bad Content-Length") from None
    if not 0 <= length <= _MAX_BODY:
        raise _BadRequest("request body too large")
    body = await reader.readexactly(length) if length else b""
    parts = urlsplit(target)
    return _Request(
        method,
        parts.path,
        parse_qsl(parts.query, keep_blank_values=True),
        headers.get("content-type"),
        body,
    )


def _canonical(request: _Request, allowed: Allowed) -> bytes:
    """The checked request, written anew: only what was checked reaches dockerd."""
    target = allowed.path + (f"?{urlencode(allowed.query)}" if allowed.query else "")
    lines = [f"{allowed.method} {target} HTTP/1.1", "Host: docker"]
    if request.body:
        lines += [
            f"Content-Type: {request.content_type or 'application/json'}",
            f"Content-Length: {len(request.body)}",
        ]
    if allowed.upgrade:
        lines += ["Connection: Upgrade", "Upgrade: tcp"]
    else:
        lines += ["Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(_CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _until_eof(reader: asyncio.StreamReader) -> None:
    await reader.read(1)  # EOF, or a byte the client had no right to send: either way, done


async def _splice(answer: Awaitable[None], client: Awaitable[None], *, upgraded: bool) -> None:
    """Relay dockerd's answer until it ends, while ``client`` runs beside it. Upgraded, the
    client's side (the container's stdin) ending changes nothing: the container's last output
    still comes. Not upgraded, the client's side is only a watch for its leaving (a client
    that gave up on a long ``wait``): then the answer is abandoned."""
    relay, other = asyncio.ensure_future(answer), asyncio.ensure_future(client)
    try:
        done, _ = await asyncio.wait({relay, other}, return_when=asyncio.FIRST_COMPLETED)
        if relay not in done and upgraded:
            await relay
    finally:
        for task in (relay, other):
            task.cancel()
        await asyncio.gather(relay, other, return_exceptions=True)


async def _answer(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    body = json.dumps({"message": message}).encode()
    reason = {400: "Bad Request", 403: "Forbidden", 404: "Not Found"}[status]
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()
