"""``DockerSandbox``: strategies in locked-down containers — the boundary for untrusted code.

The real sandbox (``STRATORCH_SANDBOX=docker``). Each runner lives in a container of its own,
created through dockerd's API (aiodocker; no docker CLI) with:

- no network (``NetworkMode: none``: only a loopback interface), no host environment (only
  :func:`~shared.sandbox.protocol.sandbox_env` and a few Python settings), a fixed hostname;
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
in ``/proc/self/mountinfo``). The strategy's code travels in each job. The candles reach
the runner as the process sandbox's do, in a file it maps without copying, when dockerd sees
this machine's files (the runner code is mounted): each container gets a directory of its own
beside that copy, mounted read-only at ``/candles``, where the sandbox writes each call's
candles and removes them after the call. Otherwise (the production image, a dockerd on another
machine, the host's dockerd from inside a compose service) they follow the job line on the
container's stdin, through dockerd's attach stream: nothing is shared, at the cost of that
copy (~25 ms per 100k bars). Signals come back on stdout as JSON, the strategy's output on
stderr.

The containers form the warm pool of :class:`~shared.sandbox.pool.PooledSandbox`, as the
process sandbox's children do (start-up ~0.3 s, pandas included); ``stratorch run`` starts its
first one ahead, while it loads (:mod:`shared.sandbox.docker_ahead`), and the first call
adopts it if it is configured exactly as the sandbox would configure it. A container found
unfit — timeout, output flood, crash, unreadable result, cancelled call, the kernel's OOM
killer — is removed.
The OOM killer may strike a child process and leave the runner be: dockerd's ``OOMKilled``
says so only once the container has exited (and then maybe with exit code 0), so the runner
reads the container's own OOM kill count around each job (``watch_oom``).

Every container is labelled ``org.stratorch.sandbox=1`` and with its owner; what a dead owner
left is removed by the next ``DockerSandbox`` (:mod:`shared.sandbox.docker_host`). The
attached streams become the connection's pipes in :mod:`shared.sandbox.docker_streams`; the
create request is :func:`~shared.sandbox.docker_config.container_config`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import itertools
import logging
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.stream import Stream

from shared.errors import ServerUnavailable, StrategyOutOfMemory
from shared.sandbox import docker_ahead
from shared.sandbox.connection import RunnerConnection
from shared.sandbox.docker_ahead import Ahead, readable_dir
from shared.sandbox.docker_config import (
    CANDLES_DIR,
    DEFAULT_CPUS,
    DEFAULT_IMAGE,
    DEFAULT_PIDS_LIMIT,
    DEFAULT_TMP_BYTES,
    RUNNER_LABEL,
    SESSION_LABEL,
    container_config,
)
from shared.sandbox.docker_host import (
    API_TIMEOUT_S,
    LABEL,
    OWNER_LABEL,
    copy_runner_code,
    current_owner,
    remove_container,
    remove_leftovers,
    remove_stale_copies,
)
from shared.sandbox.docker_streams import ContainerStdin, OutputPipe, pump
from shared.sandbox.pool import (
    DEFAULT_IDLE_TTL_S,
    Candles,
    PooledSandbox,
    Runner,
    RunnerKey,
    empty_dir,
)
from shared.sandbox.port import SandboxLimits
from shared.sandbox.protocol import write_candles

__all__ = [
    "DEFAULT_IDLE_TTL_S",
    "DEFAULT_IMAGE",
    "DEFAULT_LEFTOVER_CHECK_S",
    "LABEL",
    "OWNER_LABEL",
    "RUNNER_LABEL",
    "SESSION_LABEL",
    "DockerSandbox",
    "DockerUnavailable",
]

_log = logging.getLogger(__name__)

#: Seconds between two looks for containers whose owner is gone (see ``remove_leftovers``).
DEFAULT_LEFTOVER_CHECK_S = 10.0

_MiB = 1024 * 1024


class DockerUnavailable(ServerUnavailable):
    """Docker itself failed: dockerd unreachable, the image missing, an API call refused or
    timed out. Not the strategy's doing, so not a :class:`~shared.errors.StratorchError`: a
    worker retries the unit, as through any outage."""


# -- one container -----------------------------------------------------------------------------


class _Container(Runner):
    """One ``runner --serve`` container: its API handle, its attached streams split into the
    two pipes, and the :class:`RunnerConnection` over them.

    :param key: the session and memory limit it serves; ``None``: one call only.
    """

    def __init__(
        self,
        handle: DockerContainer,
        stream: Stream,
        key: RunnerKey | None,
        candles_dir: str | None,
    ) -> None:
        self.handle = handle
        self.stream = stream
        #: The host directory mounted read-only at ``/candles``, or ``None``: the
        #: candles go on stdin.
        self.candles_dir = candles_dir
        self._candle_files = itertools.count()
        #: The kernel's OOM killer struck in it (seen when it ended): never reuse it.
        self.oom_killed = False
        self.killed = False
        overflow = asyncio.Event()
        self.results, self.log = OutputPipe(overflow), OutputPipe(overflow)
        self.pump = asyncio.create_task(
            pump(stream, self.results, self.log), name=f"sandbox {self.short_id} output"
        )
        self._watcher = asyncio.create_task(self._kill_on(overflow))
        connection = RunnerConnection(
            ContainerStdin(stream),
            self.results,
            self.log,
            kill=self.kill,
            exit_status=self.exit_status,
        )
        super().__init__(connection, key)

    @property
    def short_id(self) -> str:
        return self.handle.id[:12]

    @property
    def alive(self) -> bool:
        return not self.pump.done()

    @property
    def reusable(self) -> bool:
        return super().reusable and not self.oom_killed and not self.killed

    async def run(
        self,
        job: Mapping[str, Any],
        *,
        label: str,
        limits: SandboxLimits,
        symbols: Sequence[str],
        payload: bytes,
    ) -> dict[str, Any]:
        """The job, its output capped per ``limits``; when Docker saw the OOM killer strike,
        an out-of-memory error that says so."""
        cap = max(limits.output_bytes, limits.log_flood_bytes) + _MiB
        self.results.limit = self.log.limit = cap
        try:
            return await super().run(
                job, label=label, limits=limits, symbols=symbols, payload=payload
            )
        except StrategyOutOfMemory as exc:
            if not self.oom_killed:
                raise
            # Docker said so when the runner died: no "most likely" about it.
            raise StrategyOutOfMemory(
                f"{label} was killed by the kernel at its memory limit "
                f"({limits.memory_bytes / _MiB:g} MiB); use less, e.g. smaller windows "
                "or dtypes",
                symbol=exc.symbol,
                log_tail=exc.log_tail,
            ) from None

    async def _kill_on(self, overflow: asyncio.Event) -> None:
        await overflow.wait()
        _log.warning("sandbox container %s flooded its output unread; killing it", self.short_id)
        await self.kill()

    async def retire(self) -> None:
        """Remove the container (killing it first if need be), close its streams, remove its
        candle directory."""
        self.results.discard()
        self.log.discard()
        self.killed = True
        self._watcher.cancel()
        await remove_container(self.handle, self.stream, self.pump)
        if self.candles_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self.candles_dir, ignore_errors=True)

    def candles_path(self) -> tuple[str, str]:
        """A new candle file's path on the host and in the container."""
        assert self.candles_dir is not None
        name = f"candles-{next(self._candle_files)}.bin"
        return os.path.join(self.candles_dir, name), f"{CANDLES_DIR}/{name}"

    async def reset(self) -> None:
        """Remove the last call's candles, as a new container would not have them."""
        if self.candles_dir is not None:
            await asyncio.to_thread(empty_dir, self.candles_dir)

    async def kill(self) -> None:
        """SIGKILL the container (idempotent); its streams then end, the pump keeps draining."""
        if self.killed:
            return
        self.killed = True
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, TimeoutError):
            async with asyncio.timeout(API_TIMEOUT_S):
                await self.handle.kill()

    async def exit_status(self) -> int:
        """The runner's exit status as :attr:`subprocess.Popen.returncode` would have it.

        ``-SIGKILL`` whenever the OOM killer struck — whatever the exit code: when it killed
        a child of the runner, the runner may still exit 0. Docker reports a signal death as
        ``128 + signal``.
        """
        async with asyncio.timeout(API_TIMEOUT_S):
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


class DockerSandbox(PooledSandbox[_Container]):
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

    _WATCH_OOM = True  # the container is the runner's own memory cgroup
    _UNCLOSED_NOTE = " (its containers are removed by the next DockerSandbox on this host)"

    def __init__(
        self,
        *,
        image: str = DEFAULT_IMAGE,
        mount_runner: bool | None = None,
        runtime: str | None = None,
        cpus: float = DEFAULT_CPUS,
        pids_limit: int = DEFAULT_PIDS_LIMIT,
        tmp_bytes: int = DEFAULT_TMP_BYTES,
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
        super().__init__(idle_ttl_s=idle_ttl_s)
        self._image = image
        self._mount_runner = mount_runner
        self._runtime = runtime
        self._cpus = cpus
        self._pids_limit = pids_limit
        self._tmp_bytes = tmp_bytes
        self._leftover_check_s = leftover_check_s
        self._docker_url = docker_url
        self._docker: aiodocker.Docker | None = None
        self._code_copy: str | None = None
        self._candle_dirs = itertools.count()
        self._owner = current_owner()
        self._leftovers: asyncio.Task[None] | None = None
        #: The container started ahead (:mod:`shared.sandbox.docker_ahead`), until adopted.
        self._ahead: Ahead | None = None

    def _repr_fields(self) -> str:
        runtime = f" runtime={self._runtime!r}" if self._runtime else ""
        return f"image={self._image!r}{runtime} "

    # -- lifecycle ------------------------------------------------------------------------

    async def _setup(self) -> None:
        """Connect, remove leftovers, copy the runner code."""
        self._docker = await self._connect()
        self._leftovers = asyncio.create_task(
            self._remove_leftovers_every(self._docker), name="DockerSandbox leftovers"
        )

    async def _teardown(self) -> None:
        leftovers, self._leftovers = self._leftovers, None
        if leftovers is not None:
            leftovers.cancel()
            await asyncio.gather(leftovers, return_exceptions=True)
        docker, self._docker = self._docker, None
        if docker is not None:
            ahead, self._ahead = self._ahead, None
            if ahead is not None:
                await _discard(docker, ahead)
            await docker.close()
        copy, self._code_copy = self._code_copy, None
        if copy is not None:
            await asyncio.to_thread(shutil.rmtree, copy, ignore_errors=True)

    async def _remove_leftovers_every(self, docker: aiodocker.Docker) -> None:
        """While open, remove the containers of owners that are gone (a worker killed while
        its strategy ran) every ``leftover_check_s``, not only when the next sandbox starts."""
        while True:
            await asyncio.sleep(self._leftover_check_s)
            try:
                await _remove_leftovers(docker, self._owner)
            except DockerUnavailable as exc:
                _log.warning("could not look for leftover sandbox containers: %s", exc)

    async def _connect(self) -> aiodocker.Docker:
        try:
            docker = aiodocker.Docker(
                url=self._docker_url,
                timeout=aiohttp.ClientTimeout(total=API_TIMEOUT_S, sock_connect=10),
            )
        except ValueError as exc:  # no DOCKER_HOST and no local socket
            raise DockerUnavailable(f"cannot reach dockerd: {exc}") from exc
        try:
            await _remove_leftovers(docker, self._owner)
            await asyncio.to_thread(remove_stale_copies, self._owner)
            if self._runtime is not None:
                await _check_runtime(docker, self._runtime)
            labels = await _image_labels(docker, self._image)
            mount = RUNNER_LABEL not in labels if self._mount_runner is None else self._mount_runner
            ahead = await asyncio.to_thread(docker_ahead.take)
            if ahead is not None and mount == (ahead.code_copy is not None):
                self._ahead = ahead  # its code copy is the sandbox's (teardown removes it)
                self._code_copy = ahead.code_copy
            elif ahead is not None:
                await _discard(docker, ahead)
                if ahead.code_copy is not None:
                    await asyncio.to_thread(shutil.rmtree, ahead.code_copy, ignore_errors=True)
            if mount and self._code_copy is None:
                self._code_copy = await asyncio.to_thread(copy_runner_code, self._owner)
            self._refuse_if_closed()  # closed meanwhile
        except BaseException:
            ahead, self._ahead = self._ahead, None
            if ahead is not None:
                await asyncio.shield(_discard(docker, ahead))
            await docker.close()
            raise
        return docker

    # -- containers -----------------------------------------------------------------------

    async def _deliver(
        self, runner: _Container, job: dict[str, Any], candles: Candles
    ) -> tuple[dict[str, Any], bytes]:
        """The candles go in a file in the container's candle directory if it has one, else
        they follow the job line on its stdin."""
        if runner.candles_dir is None:
            payload = await _in_thread(functools.partial(_pack, candles))
            return {**job, "candles_bytes": len(payload)}, payload
        host_path, path = runner.candles_path()
        await _in_thread(functools.partial(_write_readable, host_path, candles))
        return {**job, "candles_path": path}, b""

    def _config(
        self, limits: SandboxLimits, key: RunnerKey | None, candles_dir: str | None = None
    ) -> dict[str, Any]:
        """The container: see the module docstring for why each setting."""
        return container_config(
            image=self._image,
            owner=self._owner,
            memory_bytes=limits.memory_bytes,
            code_copy=self._code_copy,
            candles_dir=candles_dir,
            session=None if key is None else key[0],
            runtime=self._runtime,
            cpus=self._cpus,
            pids_limit=self._pids_limit,
            tmp_bytes=self._tmp_bytes,
        )

    async def _start_runner(self, key: RunnerKey | None, limits: SandboxLimits) -> _Container:
        """Create a container (and its candle directory, if dockerd sees this machine's
        files), attach to it, start it; remove them again if any step fails."""
        docker = self._docker
        assert docker is not None  # opened, and not torn down while a call is in progress
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead.config == self._config(limits, None, ahead.candles_dir):
                adopted = await self._adopt(docker, ahead, key)
                if adopted is not None:
                    return adopted
            else:
                await asyncio.shield(_discard(docker, ahead))
        handle: DockerContainer | None = None
        stream: Stream | None = None
        candles_dir = None
        if self._code_copy is not None:
            candles_dir = os.path.join(self._code_copy, f"candles-{next(self._candle_dirs)}")
            await asyncio.to_thread(readable_dir, candles_dir)
        try:
            try:
                async with asyncio.timeout(API_TIMEOUT_S):
                    config = self._config(limits, key, candles_dir)
                    handle = await docker.containers.create(config)
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
                await asyncio.shield(remove_container(handle, stream))
            if candles_dir is not None:
                shutil.rmtree(candles_dir, ignore_errors=True)
            raise
        assert stream is not None
        return _Container(handle, stream, key, candles_dir)

    async def _adopt(
        self, docker: aiodocker.Docker, ahead: Ahead, key: RunnerKey | None
    ) -> _Container | None:
        """The container started ahead, attached to (it waits for its first job); ``None``,
        and it removed, if it is gone (dockerd refuses to attach to a stopped container)."""
        handle = docker.containers.container(ahead.id)
        stream = handle.attach(stdin=True, stdout=True, stderr=True)
        try:
            async with asyncio.timeout(API_TIMEOUT_S):
                await stream.__aenter__()
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            _log.debug("the sandbox container started ahead is unusable: %s", exc)
        except BaseException:
            await asyncio.shield(_discard(docker, ahead, stream))
            raise
        else:
            return _Container(handle, stream, key, ahead.candles_dir)
        await asyncio.shield(_discard(docker, ahead, stream))
        return None


# -- helpers -----------------------------------------------------------------------------------


async def _discard(docker: aiodocker.Docker, ahead: Ahead, stream: Stream | None = None) -> None:
    """Remove a container started ahead that is not adopted, and its candle directory."""
    await remove_container(docker.containers.container(ahead.id), stream)
    if ahead.candles_dir is not None:
        await asyncio.to_thread(shutil.rmtree, ahead.candles_dir, ignore_errors=True)


async def _remove_leftovers(docker: aiodocker.Docker, owner: str) -> None:
    """:func:`~shared.sandbox.docker_host.remove_leftovers`; ``DockerUnavailable`` when
    dockerd cannot list the containers."""
    try:
        await remove_leftovers(docker, owner)
    except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
        raise DockerUnavailable(f"cannot list containers on dockerd: {exc}") from exc


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


T = TypeVar("T")


async def _in_thread(work: Callable[[], T]) -> T:
    """``work()`` in a thread; cancelled, it still waits for the thread (which cannot be
    stopped), so no file is written after the call is over."""
    running = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait([running])
        raise


def _pack(candles: Candles) -> bytes:
    """The candles as the payload the runner reads on stdin."""
    buffer = io.BytesIO()
    write_candles(buffer, candles)
    return buffer.getvalue()


def _write_readable(path: str, candles: Candles) -> None:
    """The candles in a new file at ``path`` the container's user may read."""
    write_candles(path, candles)
    os.chmod(path, 0o644)


def _docker_message(exc: BaseException) -> str:
    if isinstance(exc, aiodocker.DockerError):
        return f"{exc.message} (HTTP {exc.status})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {API_TIMEOUT_S:g} s"
    return str(exc) or type(exc).__name__
