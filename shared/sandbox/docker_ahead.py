"""A Docker sandbox container started ahead, as ``stratorch run --sandbox docker`` begins.

The Docker twin of :func:`shared.sandbox.spawn.start_ahead`: ``stratorch run`` calls
:func:`start_ahead` first thing, and a thread creates and starts a runner container while the
command imports its modules, so the run's first call (``describe``) finds the runner up, its
pandas imported, instead of paying a container's start-up (~0.25 s) itself.

The thread talks to dockerd with blocking HTTP on its socket (the standard library only:
neither aiodocker nor an event loop exists yet). The container is created and started, not
attached: the runner imports pandas, then waits for its first job on its stdin, which stays
open until the sandbox attaches (``StdinOnce``); it writes nothing before that, so nothing is
lost. It is created by :func:`~shared.sandbox.docker_config.container_config` like any
other, with no session label, and :class:`~shared.sandbox.docker.DockerSandbox` adopts it
(:func:`take`) only if its create request is exactly the one the sandbox would send for its
first call (the same image, runtime, limits, owner, environment and mounts); otherwise the
sandbox removes it. One nobody takes is removed when the process exits; if the process is
killed, it is a leftover like any other (owner label), removed by the next ``DockerSandbox``.

Best effort: when dockerd is down, slow, on TLS or ssh, or the image missing, the thread gives
up (within :data:`~shared.sandbox.docker_host.API_TIMEOUT_S` at worst; nothing waits for it
but :func:`take`), and the sandbox starts its containers as usual, reporting what is wrong.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import logging
import os
import shutil
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

from shared.sandbox.docker_config import DEFAULT_IMAGE, RUNNER_LABEL, container_config
from shared.sandbox.docker_host import API_TIMEOUT_S, copy_runner_code, current_owner

__all__ = ["Ahead", "readable_dir", "start_ahead", "take"]

_log = logging.getLogger(__name__)

#: The candle directory of the container started ahead, in its runner-code copy.
_CANDLES = "candles-ahead"
#: Seconds the process waits at exit for a container still being started ahead.
_EXIT_WAIT_S = 10.0


@dataclass(frozen=True)
class Ahead:
    """A container started ahead: its id, create request, runner-code copy (``None``: the
    image's own) and candle directory."""

    id: str
    config: dict[str, Any]
    code_copy: str | None
    candles_dir: str | None


_thread: threading.Thread | None = None
_ahead: Ahead | None = None


def start_ahead(memory_bytes: int) -> None:
    """Start a container in a thread now, for the first ``DockerSandbox`` call of this process
    with this memory limit, on ``DOCKER_HOST``'s dockerd and ``STRATORCH_SANDBOX_IMAGE``
    (``STRATORCH_SANDBOX_RUNTIME``), as the command's sandbox will have them."""
    global _thread
    _thread = threading.Thread(
        target=_start, args=(memory_bytes,), name="stratorch sandbox ahead", daemon=True
    )
    _thread.start()
    atexit.register(_remove_untaken)


def take(wait_s: float = API_TIMEOUT_S) -> Ahead | None:
    """The container started ahead once its thread is done (blocking: call it in a thread),
    the caller's from then on — to adopt, or to remove with its candle directory and, if the
    caller does not use it, its runner-code copy. ``None`` if there is none (also the second
    time). Waits ``wait_s`` at most: a container still being started then is left to the
    leftover removal (its owner will be gone)."""
    global _ahead, _thread
    thread, _thread = _thread, None
    if thread is not None:
        thread.join(wait_s)
    ahead, _ahead = _ahead, None
    return ahead


def readable_dir(path: str) -> None:
    """A new directory the container's user may read (whatever this process's umask)."""
    os.mkdir(path)
    os.chmod(path, 0o755)


def _start(memory_bytes: int) -> None:
    global _ahead
    image = os.environ.get("STRATORCH_SANDBOX_IMAGE") or DEFAULT_IMAGE
    code_copy = None
    container = None
    try:
        info = _call("GET", f"/images/{urllib.parse.quote(image, safe='')}/json")
        owner = current_owner()
        candles_dir = None
        if RUNNER_LABEL not in ((info.get("Config") or {}).get("Labels") or {}):
            code_copy = copy_runner_code(owner)
            candles_dir = os.path.join(code_copy, _CANDLES)
            readable_dir(candles_dir)
        config = container_config(
            image=image,
            owner=owner,
            memory_bytes=memory_bytes,
            code_copy=code_copy,
            candles_dir=candles_dir,
            runtime=os.environ.get("STRATORCH_SANDBOX_RUNTIME") or None,
        )
        container = _call("POST", "/containers/create", config)["Id"]
        _call("POST", f"/containers/{container}/start")
        _ahead = Ahead(container, config, code_copy, candles_dir)
    except Exception as exc:  # best effort: the sandbox starts its containers as usual
        _log.debug("no sandbox container started ahead: %s", exc)
        _remove(container, code_copy)


def _remove_untaken() -> None:
    ahead = take(_EXIT_WAIT_S)
    if ahead is not None:
        _remove(ahead.id, ahead.code_copy)


def _remove(container: str | None, code_copy: str | None) -> None:
    if container is not None:
        with contextlib.suppress(Exception):
            _call("DELETE", f"/containers/{container}?force=1")
    if code_copy is not None:
        shutil.rmtree(code_copy, ignore_errors=True)


def _call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One Docker API call on ``DOCKER_HOST`` (``unix://`` or plain ``tcp://``; default the
    local socket): its JSON answer, ``OSError`` if it failed."""
    connection = _connection()
    try:
        headers = {"Content-Type": "application/json"}
        connection.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    if response.status >= 300:
        raise OSError(f"dockerd: {method} {path}: HTTP {response.status} {data[:200]!r}")
    return json.loads(data) if data else None


def _connection() -> http.client.HTTPConnection:
    url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if os.environ.get("DOCKER_TLS_VERIFY"):
        raise OSError("TLS to dockerd is left to the sandbox")
    scheme, _, address = url.partition("://")
    if scheme == "unix":
        return _UnixConnection(address)
    if scheme == "tcp":
        host, _, port = address.partition(":")
        return http.client.HTTPConnection(host, int(port or 2375), timeout=API_TIMEOUT_S)
    raise OSError(f"DOCKER_HOST {url!r} is left to the sandbox")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=API_TIMEOUT_S)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock
