"""``DockerSandbox``: strategies in locked-down containers — the boundary for untrusted code.

The real sandbox (``STRATORCH_SANDBOX=docker``). Each runner lives in a container of its own,
created through dockerd's API (aiodocker; no docker CLI) with:

- no network (``NetworkMode: none``: only a loopback interface), no host environment (only
  :func:`~shared.sandbox.runner.sandbox_env` and a few Python settings), a fixed hostname;
- a read-only root file system, a size-capped ``noexec`` tmpfs on ``/tmp`` as the only
  writable place, no ``/dev/shm`` (``IpcMode: none``), working directory ``/``;
- a non-root user (uid 10001), every capability dropped, ``no-new-privileges``, dockerd's
  default seccomp profile, a private cgroup namespace, no core files;
- a pids limit, a memory limit with no swap (``MemorySwap = Memory``), a CPU quota;
- log driver ``none``: dockerd keeps nothing of what a strategy prints — the output is read
  live from the attached streams and capped by :class:`~shared.sandbox.connection.RunnerConnection`;
- optionally another OCI runtime (``runtime="runsc"``: gVisor, a user-space kernel).

The runner (``python -m shared.sandbox.runner --serve``) is baked into the production image
(``services/symbol_worker/sandbox/Dockerfile``, labelled :data:`RUNNER_LABEL`); for an image
without it (the test image) it is bind-mounted read-only from a neutral temporary copy
(``/tmp/stratorch-sandbox-<random>``: the container can read the host path of a bind mount
in ``/proc/self/mountinfo``). The strategy's code travels in each job; the candles follow
the job line on the container's stdin (no file is shared, so this works against a dockerd on
another machine, or the host's dockerd from inside a compose service). Signals come back on
stdout as JSON, the strategy's output on stderr.

Containers are reused only within a session (a backtest), exactly as
:class:`~shared.sandbox.process.ProcessSandbox` reuses children: a call with ``session=None``
gets a fresh container, removed after the call; calls of one session reuse idle warm
containers (start-up ~0.6 s: pandas), never a busy one, and an idle one is removed after
``idle_ttl_s``. A container the connection found unfit — timeout, output flood, crash,
unreadable result, cancelled call, the kernel's OOM killer — is killed and removed. The OOM
killer may strike a child process and leave the runner be: dockerd's ``OOMKilled`` says so
only once the container has exited (and then maybe with exit code 0), so the runner reads
the container's own OOM kill count around each job (``watch_oom``).

Every container is labelled ``org.stratorch.sandbox=1`` and with its owner (host and pid
namespace, pid, and the pid's start time). A sandbox removes its containers in every case it
lives through — success, failure, cancellation, ``aclose``; containers (and runner-code
copies) of a process that died — SIGKILL, a crash — are removed by the next
``DockerSandbox`` started in the same place.
An idle container of a dead owner also ends on its own: its stdin closes with the owner's
connection (``StdinOnce``) and the runner exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
import warnings
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.stream import Stream

import shared
from shared.errors import Cancelled, StrategyOutOfMemory
from shared.sandbox.connection import RunnerConnection
from shared.sandbox.port import (
    DEFAULT_LIMITS,
    SandboxLimits,
    StoppedSessions,
    StrategyInfo,
    validate_signal_reply,
    validate_strategy_info,
)
from shared.sandbox.runner import sandbox_env, write_candles
from shared.strategy.reference import ComponentRef

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DEFAULT_IDLE_TTL_S",
    "DEFAULT_IMAGE",
    "LABEL",
    "OWNER_LABEL",
    "RUNNER_LABEL",
    "SESSION_LABEL",
    "DockerSandbox",
    "DockerUnavailable",
]

_log = logging.getLogger(__name__)

#: The production sandbox image (``services/symbol_worker/sandbox/Dockerfile``).
DEFAULT_IMAGE = "stratorch-sandbox:latest"
#: Every sandbox container carries ``LABEL=1``: how leftovers are found.
LABEL = "org.stratorch.sandbox"
#: ``host/pidns:pid:start`` of the process that created the container: is it a leftover?
OWNER_LABEL = "org.stratorch.sandbox.owner"
#: The session (backtest id) a warm container serves: which backtest's it is.
SESSION_LABEL = "org.stratorch.sandbox.session"
#: An image with this label has the runner code baked in (under its value, on PYTHONPATH).
RUNNER_LABEL = "org.stratorch.sandbox.runner"
#: Seconds a session's idle container is kept for the session's next call; as
#: :data:`shared.sandbox.process.DEFAULT_IDLE_TTL_S`, for the same reasons.
DEFAULT_IDLE_TTL_S = 30.0

_MiB = 1024 * 1024
#: Where the runner code is mounted (and baked in the production image): ``PYTHONPATH``.
_CODE_DIR = "/opt/stratorch"
#: What of ``shared`` runs inside the sandbox; the production Dockerfile copies the same.
_RUNNER_FILES = ("__init__.py", "errors.py", "intervals.py", "strategy", "sandbox")
#: The uid:gid strategies run as, whatever the image says (the images create this user).
_USER = "10001:10001"
#: ``-P``: no working directory on ``sys.path``; ``-s``: no user site-packages.
_COMMAND = ["python3", "-P", "-s", "-m", "shared.sandbox.runner", "--serve"]
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONFAULTHANDLER": "1",  # a segfault leaves a Python traceback in the log
}
#: Seconds for one Docker API call (create, start, inspect, kill, remove); a dockerd that
#: takes longer is reported as unavailable rather than waited for.
_API_TIMEOUT_S = 60.0
#: Seconds to wait, after removing a container, for its attached streams to end.
_DRAIN_TIMEOUT_S = 10.0
#: Seconds between two looks for containers whose owner is gone (see ``_remove_leftovers``).
DEFAULT_LEFTOVER_CHECK_S = 10.0
#: A stopped sandbox container of another host this long is a leftover: its owner would
#: have removed it within seconds.
_ORPHAN_GRACE_S = 60.0
#: The reaper retires a container this close to its expiry rather than sleep again for it.
_CLOCK_SLACK_S = 0.001

#: A warm container serves only calls of its session and memory limit (set at its start).
_Key = tuple[str, int]


class DockerUnavailable(RuntimeError):
    """Docker itself failed: dockerd unreachable, the image missing, an API call refused or
    timed out. Not the strategy's doing, so not a :class:`~shared.errors.StratorchError`: a
    worker lets it propagate and the unit is delivered again."""


# -- the attached streams as RunnerConnection's reader/writer -------------------------------


class _Pipe:
    """One output stream of the container (stdout or stderr), demultiplexed from the attach
    stream; a :class:`~shared.sandbox.connection.ByteReader`.

    The pump feeds it without ever waiting: a client that stops reading a container's
    attached output stalls dockerd, which then never marks the container exited and hangs
    wait, inspect and delete. So the buffer is the only brake, and it is capped: past
    ``limit`` unread bytes the container is killed (``on_overflow``) and further output
    dropped. ``limit`` stays above the connection's own caps, so the connection still sees
    enough to report the flood itself.
    """

    def __init__(self, on_overflow: asyncio.Event) -> None:
        self._buf = bytearray()
        self._eof = False
        self._ready = asyncio.Event()
        self._on_overflow = on_overflow
        #: Unread bytes past which the container is killed; set per job.
        self.limit = DEFAULT_LIMITS.output_bytes + DEFAULT_LIMITS.log_flood_bytes
        #: Drop what comes: nobody will read it (the container is being removed).
        self.discarding = False

    def feed(self, data: bytes) -> None:
        if self.discarding:
            return
        self._buf += data
        self._ready.set()
        if len(self._buf) > self.limit:
            self.discarding = True
            self._on_overflow.set()

    def feed_eof(self) -> None:
        self._eof = True
        self._ready.set()

    def discard(self) -> None:
        self.discarding = True
        self._buf.clear()

    async def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            self._ready.clear()
            await self._ready.wait()
        if n < 0 or n >= len(self._buf):
            data = bytes(self._buf)
            self._buf.clear()
        else:
            data = bytes(self._buf[:n])
            del self._buf[:n]
        return data


class _Stdin:
    """The container's stdin; a :class:`~shared.sandbox.connection.ByteWriter`."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._pending.append(data)

    async def drain(self) -> None:
        pending, self._pending = self._pending, []
        try:
            for data in pending:
                await self._stream.write_in(data)
        except (RuntimeError, aiohttp.ClientError, OSError) as exc:
            # the connection treats a lost stdin as the runner being gone
            raise ConnectionResetError(f"the sandbox container's stdin closed: {exc}") from exc


async def _pump(stream: Stream, results: _Pipe, log: _Pipe) -> None:
    """Move the attach stream's frames into the two pipes until it ends."""
    try:
        while (message := await stream.read_out()) is not None:
            (results if message.stream == 1 else log).feed(message.data)
    except (aiohttp.ClientError, OSError) as exc:
        _log.debug("sandbox container stream failed: %s", exc)
    finally:
        results.feed_eof()
        log.feed_eof()


# -- one container -----------------------------------------------------------------------------


class _Container:
    """One ``runner --serve`` container: its API handle, its attached streams split into the
    two pipes, and the :class:`RunnerConnection` over them.

    :param key: the session and memory limit it serves; ``None``: one call only.
    """

    def __init__(self, handle: DockerContainer, stream: Stream, key: _Key | None) -> None:
        self.handle = handle
        self.stream = stream
        self.key = key
        #: ``loop.time()`` when it last went idle.
        self.idle_since = 0.0
        #: Calls it has been given.
        self.calls = 0
        #: The kernel's OOM killer struck in it (seen when it ended): never reuse it.
        self.oom_killed = False
        self.killed = False
        #: Killed by :meth:`DockerSandbox.stop`: its call raises ``Cancelled``.
        self.stopped = False
        overflow = asyncio.Event()
        self.results, self.log = _Pipe(overflow), _Pipe(overflow)
        self.pump = asyncio.create_task(
            _pump(stream, self.results, self.log), name=f"sandbox {self.short_id} output"
        )
        self._watcher = asyncio.create_task(self._kill_on(overflow))
        self.connection = RunnerConnection(
            _Stdin(stream), self.results, self.log, kill=self.kill, exit_status=self.exit_status
        )

    @property
    def short_id(self) -> str:
        return self.handle.id[:12]

    def set_limits(self, limits: SandboxLimits) -> None:
        cap = max(limits.output_bytes, limits.log_flood_bytes) + _MiB
        self.results.limit = self.log.limit = cap

    async def _kill_on(self, overflow: asyncio.Event) -> None:
        await overflow.wait()
        _log.warning("sandbox container %s flooded its output unread; killing it", self.short_id)
        await self.kill()

    async def remove(self) -> None:
        """Remove the container (killing it first if need be) and close its streams."""
        self.results.discard()
        self.log.discard()
        self.killed = True
        self._watcher.cancel()
        await _remove(self.handle, self.stream, self.pump)

    async def kill(self) -> None:
        """SIGKILL the container (idempotent); its streams then end, the pump keeps draining."""
        if self.killed:
            return
        self.killed = True
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, TimeoutError):
            async with asyncio.timeout(_API_TIMEOUT_S):
                await self.handle.kill()

    async def exit_status(self) -> int:
        """The runner's exit status as :attr:`subprocess.Popen.returncode` would have it.

        ``-SIGKILL`` whenever the OOM killer struck — whatever the exit code: when it killed
        a child of the runner, the runner may still exit 0. Docker reports a signal death as
        ``128 + signal``.
        """
        async with asyncio.timeout(_API_TIMEOUT_S):
            waited = await self.handle.wait()
            state = (await self.handle.show()).get("State", {})
        code = int(waited.get("StatusCode", state.get("ExitCode", -1)))
        if state.get("OOMKilled"):
            self.oom_killed = True
            return -signal.SIGKILL
        if 128 < code < 128 + signal.NSIG:
            return -(code - 128)
        return code


# -- the sandbox -------------------------------------------------------------------------------


class DockerSandbox:
    """Runs strategies in locked-down Docker containers, warm ones within a session.

    The isolation boundary for untrusted code (see the module docstring for what each
    container gets). Calls may run concurrently; each has a container of its own. Pass
    ``session=`` (the backtest id) to reuse warm containers across a backtest's calls.

    :param image: the sandbox image; it must have ``python3`` with numpy and pandas, and a
        user 10001. The production image (:data:`DEFAULT_IMAGE`) has the runner code too.
    :param mount_runner: bind-mount the runner code (``shared``'s sandbox-relevant files)
        read-only from a neutral temporary copy (needs a dockerd that sees this machine's
        ``/tmp``), or use the image's own. ``None`` (default): the image's own if it carries
        :data:`RUNNER_LABEL` (the production image does), else mount (the test image of
        ``scripts/build-sandbox-image.sh``).
    :param runtime: the OCI runtime of the containers; ``None`` is dockerd's default (runc).
        ``"runsc"`` (gVisor, once installed and registered with dockerd) puts a user-space
        kernel between strategies and the host's.
    :param cpus: CPU quota per container, in cores. One, as a strategy runs single-threaded
        (BLAS is pinned to one thread).
    :param pids_limit: processes and threads per container: room for the runner and a few
        helpers, not for a fork bomb.
    :param tmp_bytes: size of the ``/tmp`` tmpfs, the only writable place; its pages count
        against the memory limit.
    :param idle_ttl_s: how long a session's idle container is kept for its next call.
    :param leftover_check_s: how often to look for containers whose owner is gone (a worker
        killed mid-call) and remove them.
    :param docker_url: dockerd's address; ``None``: ``DOCKER_HOST``, else the local socket.

    Example::

        async with DockerSandbox(image="stratorch-sandbox:latest") as sandbox:
            code = ComponentRef(builtin="sma_cross")
            info = await sandbox.describe(code, ["BTCUSDT"], session="bt-1")
            signals = await sandbox.signals(
                code, {"BTCUSDT": (frame, 200)}, interval="1h", session="bt-1"
            )  # the same warm container: no second start-up
    """

    def __init__(
        self,
        *,
        image: str = DEFAULT_IMAGE,
        mount_runner: bool | None = None,
        runtime: str | None = None,
        cpus: float = 1.0,
        pids_limit: int = 64,
        tmp_bytes: int = 64 * _MiB,
        idle_ttl_s: float = DEFAULT_IDLE_TTL_S,
        leftover_check_s: float = DEFAULT_LEFTOVER_CHECK_S,
        docker_url: str | None = None,
    ) -> None:
        if not cpus > 0:
            raise ValueError(f"DockerSandbox cpus must be > 0, got {cpus!r}")
        if pids_limit < 8:
            raise ValueError(
                f"DockerSandbox pids_limit must be >= 8 (Python needs a few), got {pids_limit!r}"
            )
        if tmp_bytes < _MiB:
            raise ValueError(f"DockerSandbox tmp_bytes must be >= 1 MiB, got {tmp_bytes!r}")
        if not idle_ttl_s > 0:
            raise ValueError(f"DockerSandbox idle_ttl_s must be > 0, got {idle_ttl_s!r}")
        self._image = image
        self._mount_runner = mount_runner
        self._runtime = runtime
        self._cpus = cpus
        self._pids_limit = pids_limit
        self._tmp_bytes = tmp_bytes
        self._idle_ttl_s = idle_ttl_s
        self._leftover_check_s = leftover_check_s
        self._docker_url = docker_url
        self._state: Literal["unopened", "opened", "closed"] = "unopened"
        self._docker: aiodocker.Docker | None = None
        self._code_copy: str | None = None
        self._starting = asyncio.Lock()
        self._owner = _owner()
        self._containers: set[_Container] = set()  # every live container, idle or busy
        self._idle: dict[_Key, list[_Container]] = {}
        self._calls = 0  # calls in progress
        self._settled = asyncio.Event()  # set while no call is in progress
        self._settled.set()
        self._stopped = StoppedSessions()
        self._reaper: asyncio.Task[None] | None = None
        self._leftovers: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        idle = sum(map(len, self._idle.values()))
        runtime = f" runtime={self._runtime!r}" if self._runtime else ""
        return (
            f"<DockerSandbox image={self._image!r}{runtime} state={self._state} "
            f"containers={len(self._containers)} idle={idle}>"
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Refuse new calls and remove every container: the idle ones, and those still running
        a call (the call raises ``RuntimeError``); return once they are gone. Idempotent."""
        self._state = "closed"
        idle = self._take_idle()
        busy = [container for container in self._containers if container not in idle]
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
        leftovers, self._leftovers = self._leftovers, None
        if leftovers is not None:
            leftovers.cancel()
        await asyncio.gather(
            *(self._retire(container) for container in idle),
            *(container.kill() for container in busy),
            *([reaper] if reaper is not None else []),
            *([leftovers] if leftovers is not None else []),
            return_exceptions=True,
        )
        # Busy calls fail and remove their containers; calls still starting one remove it as
        # soon as it runs. The client stays open for them.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_API_TIMEOUT_S):
                await self._settled.wait()
        docker, self._docker = self._docker, None
        if docker is not None:
            await docker.close()
        copy, self._code_copy = self._code_copy, None
        if copy is not None:
            await asyncio.to_thread(shutil.rmtree, copy, ignore_errors=True)

    async def stop(self, session: str) -> None:
        """See :meth:`shared.sandbox.port.Sandbox.stop`."""
        self._stopped.add(session)
        idle = self._take_idle(session=session)
        busy = [c for c in self._containers if c.key and c.key[0] == session and c not in idle]
        for container in busy:
            container.stopped = True
        # A busy container's call fails as it dies and removes it again (404s are fine).
        await asyncio.gather(
            *(self._retire(container) for container in idle),
            *(container.remove() for container in busy),
            return_exceptions=True,
        )

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "opened":
            warnings.warn(
                f"{self!r} was never closed; use 'async with DockerSandbox()' or aclose() "
                "(its containers are removed by the next DockerSandbox on this host)",
                ResourceWarning,
                stacklevel=2,
            )

    async def _open(self) -> aiodocker.Docker:
        """The Docker client; on first use connect, remove leftovers, copy the runner code."""
        self._refuse_if_closed()
        if self._docker is not None:
            return self._docker
        async with self._starting:
            if self._docker is None:
                self._docker = await self._connect()
                self._state = "opened"
                self._leftovers = asyncio.create_task(
                    self._remove_leftovers_every(self._docker), name="DockerSandbox leftovers"
                )
        return self._docker

    async def _remove_leftovers_every(self, docker: aiodocker.Docker) -> None:
        """While open, remove the containers of owners that are gone (a worker killed while
        its strategy ran) every ``leftover_check_s``, not only when the next sandbox starts."""
        while True:
            await asyncio.sleep(self._leftover_check_s)
            try:
                await _remove_leftovers(docker, self._owner)
            except DockerUnavailable as exc:
                _log.warning("could not look for leftover sandbox containers: %s", exc)

    def _refuse_if_closed(self) -> None:
        if self._state == "closed":
            raise RuntimeError("this DockerSandbox is closed; create a new one")

    async def _connect(self) -> aiodocker.Docker:
        try:
            docker = aiodocker.Docker(
                url=self._docker_url,
                timeout=aiohttp.ClientTimeout(total=_API_TIMEOUT_S, sock_connect=10),
            )
        except ValueError as exc:  # no DOCKER_HOST and no local socket
            raise DockerUnavailable(f"cannot reach dockerd: {exc}") from exc
        try:
            await _remove_leftovers(docker, self._owner)
            await asyncio.to_thread(_remove_stale_copies, self._owner)
            if self._runtime is not None:
                await _check_runtime(docker, self._runtime)
            labels = await _image_labels(docker, self._image)
            mount = RUNNER_LABEL not in labels if self._mount_runner is None else self._mount_runner
            if mount and self._code_copy is None:
                self._code_copy = await asyncio.to_thread(_copy_runner_code, self._owner)
            self._refuse_if_closed()  # closed meanwhile
        except BaseException:
            await docker.close()
            raise
        return docker

    # -- the port -------------------------------------------------------------------------

    async def describe(
        self,
        code: ComponentRef,
        symbols: list[str],
        *,
        limits: SandboxLimits = DEFAULT_LIMITS,
        session: str | None = None,
    ) -> StrategyInfo:
        """See :meth:`shared.sandbox.port.Sandbox.describe`."""
        job = {
            "op": "describe",
            "strategy": code.to_json(),
            "symbols": list(symbols),
            "watch_oom": True,
        }
        reply = await self._call(job, code, limits, symbols=symbols, session=session)
        return validate_strategy_info(
            reply.get("lookback"), reply.get("units"), symbols, label=code.label
        )

    async def signals(
        self,
        code: ComponentRef,
        candles: Mapping[str, tuple[pd.DataFrame, int]],
        *,
        interval: str,
        limits: SandboxLimits = DEFAULT_LIMITS,
        session: str | None = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """See :meth:`shared.sandbox.port.Sandbox.signals`."""
        if not candles:
            await self._open()
            return {}
        symbols = list(candles)
        job = {
            "op": "signals",
            "strategy": code.to_json(),
            "interval": interval,
            "watch_oom": True,  # the container is the runner's own memory cgroup
        }
        reply = await self._call(
            job, code, limits, symbols=symbols, session=session, candles=candles
        )
        return validate_signal_reply(reply, symbols, label=code.label)

    # -- one call -------------------------------------------------------------------------

    async def _call(
        self,
        job: dict[str, Any],
        code: ComponentRef,
        limits: SandboxLimits,
        *,
        symbols: list[str],
        session: str | None,
        candles: Mapping[str, tuple[pd.DataFrame, int]] | None = None,
    ) -> dict[str, Any]:
        await self._open()
        if session is not None and session in self._stopped:
            raise self._stopped.error(session, code.label)
        self._calls += 1
        self._settled.clear()
        try:
            key = None if session is None else (session, limits.memory_bytes)
            container = await self._acquire(key, limits)
            warm = container.calls > 0
            try:
                return await self._run(container, job, code, limits, symbols, candles)
            except StrategyOutOfMemory:
                # As in ProcessSandbox: a warm runner holds memory its earlier calls freed
                # but the allocator kept, so a new container decides whether the call fits.
                if not warm:
                    raise
            await self._open()
            fresh = await self._start(key, limits)
            return await self._run(fresh, job, code, limits, symbols, candles)
        finally:
            self._calls -= 1
            if not self._calls:
                self._settled.set()

    async def _run(
        self,
        container: _Container,
        job: dict[str, Any],
        code: ComponentRef,
        limits: SandboxLimits,
        symbols: list[str],
        candles: Mapping[str, tuple[pd.DataFrame, int]] | None,
    ) -> dict[str, Any]:
        """One call in ``container``; then park or retire it."""
        container.calls += 1
        try:
            self._refuse_if_closed()  # closed while the container started
            payload = b""
            if candles is not None:  # a new container imports pandas meanwhile
                payload = await _pack(candles)
                job = {**job, "candles_bytes": len(payload)}
            container.set_limits(limits)
            if container.key is not None and container.key[0] in self._stopped:
                container.stopped = True  # stopped while this container started
                raise self._stopped.error(container.key[0], code.label)
            try:
                return await container.connection.run(
                    job, label=code.label, limits=limits, symbols=symbols, payload=payload
                )
            except StrategyOutOfMemory as exc:
                if not container.oom_killed:
                    raise
                # Docker said so when the runner died: no "most likely" about it.
                raise StrategyOutOfMemory(
                    f"{code.label} was killed by the kernel at its memory limit "
                    f"({limits.memory_bytes / _MiB:g} MiB); use less, e.g. smaller windows "
                    "or dtypes",
                    symbol=exc.symbol,
                    log_tail=exc.log_tail,
                ) from None
        except Exception as exc:
            if self._state == "closed":
                raise RuntimeError(f"the sandbox was closed while {code.label} ran") from None
            if container.stopped and container.key is not None and not isinstance(exc, Cancelled):
                raise self._stopped.error(container.key[0], code.label) from None
            raise
        finally:
            await asyncio.shield(self._release(container))

    # -- containers -----------------------------------------------------------------------

    async def _acquire(self, key: _Key | None, limits: SandboxLimits) -> _Container:
        """An idle container of the session, the most recently used (so the others can
        expire); a new one when there is none."""
        while key is not None and (pool := self._idle.get(key)):
            container = pool.pop()
            if not pool:
                del self._idle[key]
            if not container.pump.done():
                return container
            await self._retire(container)  # it died while idle
        return await self._start(key, limits)

    def _config(self, limits: SandboxLimits, key: _Key | None) -> dict[str, Any]:
        """The container: see the module docstring for why each setting."""
        env = {**_ENV, **sandbox_env(os.environ)}
        binds = []
        if self._code_copy is not None:
            env["PYTHONPATH"] = _CODE_DIR
            binds.append(f"{self._code_copy}/shared:{_CODE_DIR}/shared:ro")
        host_config: dict[str, Any] = {
            "NetworkMode": "none",
            "ReadonlyRootfs": True,
            "Tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={self._tmp_bytes},mode=1777"},
            "IpcMode": "none",
            "CgroupnsMode": "private",  # /proc/self/cgroup shows "/", not the host's paths
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "PidsLimit": self._pids_limit,
            "Memory": limits.memory_bytes,
            "MemorySwap": limits.memory_bytes,
            "NanoCpus": int(self._cpus * 1e9),
            "Ulimits": [{"Name": "core", "Soft": 0, "Hard": 0}],
            "LogConfig": {"Type": "none", "Config": {}},
            "Binds": binds,
        }
        if self._runtime is not None:
            host_config["Runtime"] = self._runtime
        return {
            "Image": self._image,
            "Entrypoint": _COMMAND[:1],
            "Cmd": _COMMAND[1:],
            "Env": [f"{name}={value}" for name, value in env.items()],
            "User": _USER,
            "WorkingDir": "/",
            "Hostname": "sandbox",
            "NetworkDisabled": True,
            "AttachStdin": True,
            "AttachStdout": True,
            "AttachStderr": True,
            "OpenStdin": True,
            "StdinOnce": True,  # the owner's connection gone: stdin ends, the runner exits
            "Tty": False,
            "Labels": {
                LABEL: "1",
                OWNER_LABEL: self._owner,
                **({SESSION_LABEL: key[0]} if key is not None else {}),
            },
            "HostConfig": host_config,
        }

    async def _start(self, key: _Key | None, limits: SandboxLimits) -> _Container:
        """Create a container, attach to it, start it; remove it again if any step fails."""
        docker = await self._open()
        handle: DockerContainer | None = None
        stream: Stream | None = None
        try:
            try:
                async with asyncio.timeout(_API_TIMEOUT_S):
                    handle = await docker.containers.create(self._config(limits, key))
                    # Attached before the start, so no output is missed.
                    stream = handle.attach(stdin=True, stdout=True, stderr=True)
                    await stream.__aenter__()
                    await handle.start()
            except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise DockerUnavailable(
                    f"cannot start a sandbox container from image {self._image!r}: "
                    f"{_docker_message(exc)}; is dockerd running and the image built "
                    "(scripts/build-sandbox-image.sh, or `docker compose build sandbox-image`)?"
                ) from exc
        except BaseException:
            if handle is not None:
                await asyncio.shield(_remove(handle, stream))
            raise
        assert stream is not None
        container = _Container(handle, stream, key)
        self._containers.add(container)
        return container

    async def _release(self, container: _Container) -> None:
        """After a call: park the container for its session if it may serve again, else
        retire it."""
        if (
            container.key is not None
            and container.connection.reusable
            and not container.oom_killed
            and not container.killed
            and not container.stopped
            and not container.pump.done()
            and self._state == "opened"
        ):
            self._park(container)
            return
        await self._retire(container)

    def _park(self, container: _Container) -> None:
        assert container.key is not None
        container.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(container.key, []).append(container)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="DockerSandbox reaper")

    def _take_idle(
        self, idle_since: float = math.inf, *, session: str | None = None
    ) -> list[_Container]:
        """Remove from their pools the containers idle since before ``idle_since`` (by
        default all), of ``session`` only if given; return them."""
        taken = []
        for key, pool in list(self._idle.items()):
            if session is not None and key[0] != session:
                continue
            taken += [c for c in pool if c.idle_since < idle_since]
            pool[:] = [c for c in pool if c.idle_since >= idle_since]
            if not pool:
                del self._idle[key]
        return taken

    async def _reap(self) -> None:
        """Retire containers idle for ``idle_ttl_s``: sleep until the next one is due; stop
        when none is idle. Cancelled, it retires every idle container."""
        loop = asyncio.get_running_loop()
        ttl = self._idle_ttl_s
        try:
            while self._idle:
                due = min(c.idle_since for pool in self._idle.values() for c in pool)
                if due + ttl > loop.time():
                    await asyncio.sleep(due + ttl - loop.time())
                    continue
                expired = self._take_idle(idle_since=loop.time() - ttl + _CLOCK_SLACK_S)
                await asyncio.gather(*(self._retire(c) for c in expired))
        except asyncio.CancelledError:
            await asyncio.gather(*(self._retire(c) for c in self._take_idle()))
            raise

    async def _retire(self, container: _Container) -> None:
        try:
            await container.remove()
        finally:
            self._containers.discard(container)


# -- helpers -----------------------------------------------------------------------------------


async def _remove(
    handle: DockerContainer, stream: Stream | None, pump: asyncio.Task[None] | None = None
) -> None:
    """Force-remove a container (SIGKILL + remove) while its output keeps being drained (a
    stalled attach would hang the removal), then close the attach stream. Failures are
    logged, not raised: the next DockerSandbox on this host removes what is left."""
    try:
        async with asyncio.timeout(_API_TIMEOUT_S):
            await handle.delete(force=True)
    except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        if not (isinstance(exc, aiodocker.DockerError) and exc.status == 404):
            _log.warning("could not remove sandbox container %s: %s", handle.id[:12], exc)
    if pump is not None:
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(_DRAIN_TIMEOUT_S):
                await asyncio.shield(pump)
        pump.cancel()
    if stream is not None:
        with contextlib.suppress(Exception):
            await stream.close()


async def _remove_leftovers(docker: aiodocker.Docker, owner: str) -> None:
    """Remove sandbox containers whose owner is gone (killed, or crashed before it could
    remove them):

    - on this host and pid namespace (``owner``'s place), those of a process that is gone;
    - anywhere, those that stopped over :data:`_ORPHAN_GRACE_S` ago. A live owner removes its
      container as soon as it stops; one whose owner died stops by itself once its stdin
      closes (``StdinOnce``) — at once if idle, after its job if busy. This covers workers in
      other containers or hosts sharing the dockerd, whose pids cannot be checked from here.
    """
    place = owner.split(":", 1)[0]
    try:
        found = await docker.containers.list(all=True, filters={"label": [f"{LABEL}=1"]})
    except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
        raise DockerUnavailable(f"cannot list containers on dockerd: {exc}") from exc
    for handle in found:
        label = (handle["Labels"] or {}).get(OWNER_LABEL, "")
        parts = label.split(":")
        if len(parts) == 3 and parts[0] == place:
            if _alive(parts[1], parts[2]):
                continue
        elif handle["State"] == "running" or not await _stopped_long_ago(handle):
            continue
        _log.warning("removing sandbox container %s left by %s", handle.id[:12], label)
        await _remove(handle, None)


async def _stopped_long_ago(handle: DockerContainer) -> bool:
    """Whether a container that is not running stopped (or was created and never started)
    more than :data:`_ORPHAN_GRACE_S` ago."""
    try:
        state = (await handle.show()).get("State") or {}
    except (aiodocker.DockerError, aiohttp.ClientError, OSError):
        return False  # removed meanwhile, or dockerd busy: next time
    stamp = str(state.get("FinishedAt") or "")
    if stamp.startswith("0001"):  # never ran: when it was created
        stamp = str(handle["Created"])
        since = float(stamp) if stamp.isdigit() else time.time()
    else:
        try:  # RFC 3339 with nanoseconds: the seconds are enough
            since = datetime.fromisoformat(stamp[:19] + "+00:00").timestamp()
        except ValueError:
            return False
    return time.time() - since > _ORPHAN_GRACE_S


async def _image_labels(docker: aiodocker.Docker, image: str) -> dict[str, str]:
    """The image's labels; ``DockerUnavailable`` saying how to build it when it is missing
    (nothing is ever pulled: a sandbox image comes from this project's build)."""
    try:
        info = await docker.images.inspect(image)
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            raise DockerUnavailable(f"cannot inspect image {image!r}: {exc.message}") from exc
        raise DockerUnavailable(
            f"the sandbox image {image!r} is not on dockerd; build it: "
            "`docker compose build sandbox-image` (production, stratorch-sandbox:latest) or "
            "scripts/build-sandbox-image.sh (tests, stratorch-sandbox:test); "
            "STRATORCH_SANDBOX_IMAGE names the image to use"
        ) from exc
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise DockerUnavailable(f"cannot reach dockerd: {exc}") from exc
    labels = (info.get("Config") or {}).get("Labels") or {}
    return {str(key): str(value) for key, value in labels.items()}


async def _check_runtime(docker: aiodocker.Docker, runtime: str) -> None:
    """``DockerUnavailable`` unless dockerd knows the OCI runtime ``runtime``."""
    try:
        known = (await docker.system.info()).get("Runtimes") or {}
    except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise DockerUnavailable(f"cannot reach dockerd: {exc}") from exc
    if runtime not in known:
        raise DockerUnavailable(
            f"dockerd has no runtime {runtime!r} (it has {', '.join(sorted(known))}); for "
            "gVisor install runsc and register it: `runsc install` adds it to "
            "/etc/docker/daemon.json, then restart dockerd"
        )


def _owner() -> str:
    """``host/pidns:pid:start`` of this process. Only a process in the same pid namespace
    can tell whether a pid lives (two worker containers may share a hostname, not a pid
    namespace), and the start time tells a reused pid apart."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{namespace}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int | str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _alive(pid: str, start: str) -> bool:
    return pid.isdigit() and start != "?" and _start_time(pid) == start


_COPY_PREFIX = "stratorch-sandbox-"
#: In a copy's directory, beside the mounted ``shared``: whose copy it is.
_COPY_OWNER = "owner"


def _copy_runner_code(owner: str) -> str:
    """Copy what of ``shared`` runs in the sandbox to ``/tmp/stratorch-sandbox-<random>/shared``,
    world-readable: mounted from there, the container's ``/proc/self/mountinfo`` shows that
    neutral path, not where the service is installed."""
    source = Path(next(iter(shared.__path__)))
    root = tempfile.mkdtemp(prefix=_COPY_PREFIX)
    (Path(root) / _COPY_OWNER).write_text(owner)
    target = Path(root) / "shared"
    target.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in _RUNNER_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name, ignore=skip)
        else:
            shutil.copy2(source / name, target / name)
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    return root


def _remove_stale_copies(owner: str) -> None:
    """Remove the runner-code copies of processes of this place that are gone (a killed
    worker cannot remove its own)."""
    place = owner.split(":", 1)[0]
    for root in Path(tempfile.gettempdir()).glob(f"{_COPY_PREFIX}*"):
        try:
            parts = (root / _COPY_OWNER).read_text().split(":")
        except OSError:
            continue  # not a copy (ProcessSandbox's directories share the prefix)
        if len(parts) == 3 and parts[0] == place and not _alive(parts[1], parts[2]):
            shutil.rmtree(root, ignore_errors=True)


async def _pack(candles: Mapping[str, tuple[pd.DataFrame, int]]) -> bytes:
    """The candles as the ``.npz`` the runner reads, built in a thread."""

    def pack() -> bytes:
        buffer = io.BytesIO()
        write_candles(buffer, candles)
        return buffer.getvalue()

    packing = asyncio.ensure_future(asyncio.to_thread(pack))
    try:
        return await asyncio.shield(packing)
    except asyncio.CancelledError:
        await asyncio.wait([packing])  # a thread cannot be stopped: let it finish
        raise


def _docker_message(exc: BaseException) -> str:
    if isinstance(exc, aiodocker.DockerError):
        return f"{exc.message} (HTTP {exc.status})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {_API_TIMEOUT_S:g} s"
    return str(exc) or type(exc).__name__
