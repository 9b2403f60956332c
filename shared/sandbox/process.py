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
import functools
import itertools
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import shared
from shared.sandbox.connection import RunnerConnection
from shared.sandbox.pool import DEFAULT_IDLE_TTL_S, Candles, PooledSandbox, Runner, RunnerKey
from shared.sandbox.port import SandboxLimits
from shared.sandbox.protocol import sandbox_env, write_candles

__all__ = ["DEFAULT_IDLE_TTL_S", "ProcessSandbox"]

_log = logging.getLogger(__name__)

#: Buffer size of the child's output streams (asyncio's default).
_READ_LIMIT = 64 * 1024
#: A fixed PATH: the host's could point into a user's directories.
_PATH = "/usr/local/bin:/usr/bin:/bin"

_warned = False


class _Child(Runner):
    """One ``runner --serve`` child: its process, the connection to it, its directory.

    Its key's memory limit is its ``RLIMIT_AS``, set at its start.
    """

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        transport: asyncio.SubprocessTransport,
        workdir: str,
        key: RunnerKey | None,
    ) -> None:
        super().__init__(_connect(process), key)
        self.process = process
        #: Held to close the pipes when the child is retired: ``Process.wait()`` returns only
        #: once every pipe is closed, and a killed child may leave output nobody will read.
        self.transport = transport
        self.workdir = workdir

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def reset(self) -> None:
        await asyncio.to_thread(_empty_dir, self.workdir)

    async def retire(self) -> None:
        """Kill the child and all it started, wait for it, remove its directory."""
        _kill_group(self.process.pid)
        self.transport.close()
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
        self._root = str(Path(next(iter(shared.__path__))).resolve().parent)
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
        return _memory_cap(limits.memory_bytes)

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
        loop = asyncio.get_running_loop()
        workdir = tempfile.mkdtemp(prefix="stratorch-sandbox-")
        try:
            # create_subprocess_exec, keeping the transport
            transport, protocol = await loop.subprocess_exec(
                lambda: asyncio.subprocess.SubprocessStreamProtocol(limit=_READ_LIMIT, loop=loop),
                self._python,
                "-P",  # no cwd on sys.path
                "-s",  # no user site-packages
                "-m",
                "shared.sandbox.runner",
                "--serve",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=workdir,
                env=self._child_env(workdir),
                start_new_session=True,
                preexec_fn=functools.partial(_limit_child, self._memory_key(limits)),
            )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        process = asyncio.subprocess.Process(transport, protocol, loop)
        return _Child(process, transport, workdir, key)

    def _child_env(self, workdir: str) -> dict[str, str]:
        env = {
            "PATH": _PATH,
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONPATH": self._root,
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONFAULTHANDLER": "1",  # a segfault leaves a Python traceback in the log
            **sandbox_env(os.environ),
        }
        return env


def _connect(process: asyncio.subprocess.Process) -> RunnerConnection:
    """A connection over the child's pipes; killing it kills its whole process group."""
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None

    async def kill() -> None:
        _kill_group(process.pid)

    return RunnerConnection(
        process.stdin, process.stdout, process.stderr, kill=kill, exit_status=process.wait
    )


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _limit_child(memory_bytes: int) -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _memory_cap(memory_bytes: int) -> int:
    """``memory_bytes``, or the service's own hard limit if that is lower (a child cannot
    raise it, and asking would fail the start)."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    return memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)


def _empty_dir(path: str) -> None:
    """Remove everything in ``path`` — the call's candles, whatever the strategy wrote — so
    the next call starts in an empty directory, as a new child would. ``path`` itself stays:
    it is the child's working directory."""
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
