"""``ProcessSandbox``: strategies in child processes with resource limits. NOT a security boundary.

The embedded default (``STRATORCH_SANDBOX=process``): it needs nothing but Python, so
``stratorch run`` works on a fresh machine. A child process keeps a strategy's crash, hang,
memory bomb or output flood away from the service — it is killed and reported as a structured
error — but it does not keep the strategy away from the host: it runs as the service's user
and can read files, open sockets and start programs. Run only code you trust in it; untrusted
code belongs in the Docker sandbox.

Each child runs ``python -m shared.sandbox.runner --serve``; the children form the warm pool
of :class:`~shared.sandbox.pool.PooledSandbox` (a child per call, or warm ones per session;
start-up ~0.4 s of CPU: pandas). A child found unfit — timeout, output flood, out of memory,
crash, unreadable result, cancelled call, something left running — is killed.

Per child: a fresh temporary directory (cwd, ``HOME`` and ``TMPDIR``; emptied after each
call, removed with the child), a minimal environment (nothing from the host's but two
OpenBLAS tuning variables), its own session and process group (so the whole group is killed:
nothing it starts outlives it), ``RLIMIT_AS`` = the memory limit and no core files. Per call:
a wall-clock timeout and output caps. Candles go in a file in the child's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any, Protocol

from shared.sandbox.connection import RunnerConnection
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
from shared.sandbox.spawn import Ahead, memory_cap, runner_argv, runner_options, take_ahead

__all__ = ["DEFAULT_IDLE_TTL_S", "ProcessSandbox"]

_log = logging.getLogger(__name__)

#: Buffer size of the child's output streams (asyncio's default).
_READ_LIMIT = 64 * 1024

_warned = False


class _Process(Protocol):
    """What a child needs of its process: an :class:`asyncio.subprocess.Process`, or
    :class:`_Adopted` for one started ahead."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class _Child(Runner):
    """One ``runner --serve`` child: its process, the connection to it, its directory.

    Its key's memory limit is its ``RLIMIT_AS``, set at its start.
    """

    def __init__(
        self,
        process: _Process,
        connection: RunnerConnection,
        close_pipes: Callable[[], None],
        workdir: str,
        key: RunnerKey | None,
    ) -> None:
        super().__init__(connection, key)
        self.process = process
        #: Closes the pipes when the child is retired: ``Process.wait()`` returns only once
        #: every pipe is closed, and a killed child may leave output nobody will read.
        self.close_pipes = close_pipes
        self.workdir = workdir

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def reset(self) -> None:
        await asyncio.to_thread(empty_dir, self.workdir)

    async def retire(self) -> None:
        """Kill the child and all it started, wait for it, remove its directory."""
        _kill_group(self.process.pid)
        self.close_pipes()
        try:
            await self.process.wait()
        finally:
            await asyncio.to_thread(shutil.rmtree, self.workdir, ignore_errors=True)

    def abandon(self) -> None:
        if self.process.returncode is None:
            _kill_group(self.process.pid)


class ProcessSandbox(PooledSandbox[_Child]):
    """Runs strategies in child processes, warm ones within a session. NOT a security boundary.

    For trusted code only (see the module docstring): limits contain accidents, not attacks.
    Calls may run concurrently; how many is the caller's business. Pass ``session=`` (the
    backtest id) to reuse warm children across a backtest's calls.

    :param python: the interpreter for the children; default the running one, whose
        environment must be able to import numpy, pandas and :mod:`shared`.
    :param idle_ttl_s: how long a session's idle child is kept for the session's next call
        (see :data:`DEFAULT_IDLE_TTL_S`).

    Example::

        async with ProcessSandbox() as sandbox:
            code = ComponentRef(builtin="sma_cross", params={"fast": 5})
            info = await sandbox.describe(code, ["BTCUSDT"], session="bt-1")
            signals = await sandbox.signals(
                code, {"BTCUSDT": (frame, 200)}, interval="1h", session="bt-1"
            )  # the same warm child: no second start-up
    """

    def __init__(
        self,
        *,
        python: str | None = None,
        idle_ttl_s: float = DEFAULT_IDLE_TTL_S,
        spare: bool = False,
    ) -> None:
        global _warned
        super().__init__(idle_ttl_s=idle_ttl_s, spare=spare)
        self._python = python or sys.executable
        self._candle_files = itertools.count()
        if not _warned:
            _warned = True
            _log.warning(
                "ProcessSandbox runs strategies as child processes of this service: it is NOT "
                "a security boundary; use it only for trusted code (STRATORCH_SANDBOX=docker "
                "isolates untrusted code)"
            )

    def _repr_fields(self) -> str:
        return f"python={self._python!r} "

    def _memory_key(self, limits: SandboxLimits) -> int:
        return memory_cap(limits.memory_bytes)

    async def _deliver(
        self, runner: _Child, job: dict[str, Any], candles: Candles
    ) -> tuple[dict[str, Any], bytes]:
        """The candles go in a file in the child's directory."""
        path = os.path.join(runner.workdir, f"candles-{next(self._candle_files)}.bin")
        writing = asyncio.ensure_future(asyncio.to_thread(write_candles, path, candles))
        try:
            await asyncio.shield(writing)
        except asyncio.CancelledError:
            await asyncio.wait([writing])  # a thread cannot be stopped: let it finish
            raise
        return {**job, "candles_path": path}, b""

    async def _start_runner(self, key: RunnerKey | None, limits: SandboxLimits) -> _Child:
        memory = self._memory_key(limits)
        ahead = take_ahead(self._python, memory)
        if ahead is not None:
            return await _adopt(ahead, key)
        loop = asyncio.get_running_loop()
        workdir = tempfile.mkdtemp(prefix="stratorch-sandbox-")
        try:
            # create_subprocess_exec, keeping the transport
            transport, protocol = await loop.subprocess_exec(
                lambda: asyncio.subprocess.SubprocessStreamProtocol(limit=_READ_LIMIT, loop=loop),
                *runner_argv(self._python),
                **runner_options(workdir, memory),
            )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        process = asyncio.subprocess.Process(transport, protocol, loop)
        assert process.stdin is not None and process.stdout is not None
        assert process.stderr is not None
        connection = _connect(process, process.stdin, process.stdout, process.stderr)
        return _Child(process, connection, transport.close, workdir, key)


class _Adopted:
    """A child started ahead (:func:`shared.sandbox.spawn.start_ahead`), seen as a process."""

    def __init__(self, popen: Any) -> None:
        self._popen = popen
        self.pid: int = popen.pid

    @property
    def returncode(self) -> int | None:
        code: int | None = self._popen.poll()
        return code

    async def wait(self) -> int:
        code: int = await asyncio.to_thread(self._popen.wait)
        return code


async def _adopt(ahead: Ahead, key: RunnerKey | None) -> _Child:
    """The child started ahead, its pipes now streams on this event loop."""
    loop = asyncio.get_running_loop()
    popen = ahead.process
    transports: list[asyncio.BaseTransport] = []

    async def reader(pipe: Any) -> asyncio.StreamReader:
        stream = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream, loop=loop), pipe
        )
        transports.append(transport)
        return stream

    stdout, stderr = await reader(popen.stdout), await reader(popen.stderr)
    # A StreamReaderProtocol is the flow control a StreamWriter waits on in drain().
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop),
        popen.stdin,
    )
    transports.append(transport)
    stdin = asyncio.StreamWriter(transport, protocol, None, loop)

    def close_pipes() -> None:
        for pipe in transports:
            pipe.close()

    process = _Adopted(popen)
    return _Child(
        process, _connect(process, stdin, stdout, stderr), close_pipes, ahead.workdir, key
    )


def _connect(
    process: _Process,
    stdin: asyncio.StreamWriter,
    stdout: asyncio.StreamReader,
    stderr: asyncio.StreamReader,
) -> RunnerConnection:
    """A connection over the child's pipes; killing it kills its whole process group."""

    async def kill() -> None:
        _kill_group(process.pid)

    return RunnerConnection(stdin, stdout, stderr, kill=kill, exit_status=process.wait)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
