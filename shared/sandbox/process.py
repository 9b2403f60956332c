"""``ProcessSandbox``: strategies in child processes with resource limits. NOT a security boundary.

The embedded default (``STRATORCH_SANDBOX=process``): it needs nothing but Python, so
``stratorch run`` works on a fresh machine. A child process keeps a strategy's crash, hang,
memory bomb or output flood away from the service — it is killed and reported as a structured
error — but it does not keep the strategy away from the host: it runs as the service's user
and can read files, open sockets and start programs. Run only code you trust in it; untrusted
code belongs in the Docker sandbox.

Each child runs ``python -m shared.sandbox.runner --serve``;
:class:`~shared.sandbox.connection.RunnerConnection` speaks to it. A call with
``session=None`` gets a fresh child, ended after the call. Calls with the same session (one
backtest) reuse warm children, so the child's start-up (~0.4 s of CPU: pandas) is paid once
per child rather than once per call. A session's children form a small pool: an idle child is
reused, a busy one is never shared (concurrent calls get a child each), and a child idle for
``idle_ttl_s`` is ended. A child the connection found unfit — timeout, output flood, out of
memory, crash, unreadable result, cancelled call — is killed; the next call starts a new one.
A call that runs out of memory in a warm child is run again in a new one: a warm child may
hold memory earlier calls left behind, and a call's outcome must not depend on its child.

Per child: a fresh temporary directory (cwd, ``HOME`` and ``TMPDIR``; emptied after each
call, removed with the child), a minimal environment (nothing from the host's but two
OpenBLAS tuning variables), its own session and process group (so the whole group is killed:
nothing it starts outlives it), ``RLIMIT_AS`` = the memory limit and no core files. Per call:
a wall-clock timeout and output caps. Candles go in an ``.npz`` file in the child's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import shared
from shared.errors import StrategyOutOfMemory
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

__all__ = ["DEFAULT_IDLE_TTL_S", "ProcessSandbox"]

_log = logging.getLogger(__name__)

#: Seconds a session's idle child is kept for the session's next call. A backtest's calls
#: come in bursts (describe, then its units); 30 s bridges the gaps and, for a backtest that
#: is over, costs one idle Python with pandas loaded (~100 MB) per child for half a minute.
DEFAULT_IDLE_TTL_S = 30.0

#: The reaper retires a child this close to its expiry rather than sleep again for it.
_CLOCK_SLACK_S = 0.001
#: Buffer size of the child's output streams (asyncio's default).
_READ_LIMIT = 64 * 1024
#: A fixed PATH: the host's could point into a user's directories.
_PATH = "/usr/local/bin:/usr/bin:/bin"

#: A warm child serves only calls of its session and memory cap (``RLIMIT_AS`` is set at its
#: start).
_Key = tuple[str, int]

_warned = False


@dataclass(eq=False)
class _Child:
    """One ``runner --serve`` child: its process, the connection to it, its directory."""

    process: asyncio.subprocess.Process
    #: Held to close the pipes when the child is retired: ``Process.wait()`` returns only
    #: once every pipe is closed, and a killed child may leave output nobody will read.
    transport: asyncio.SubprocessTransport
    connection: RunnerConnection
    workdir: str
    #: The session and memory cap it serves; ``None``: one call only.
    key: _Key | None
    #: ``loop.time()`` when it last went idle.
    idle_since: float = 0.0
    #: Calls it has been given.
    calls: int = 0
    #: Killed by :meth:`ProcessSandbox.stop`: its call raises ``Cancelled``.
    stopped: bool = False


class ProcessSandbox:
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
        self, *, python: str | None = None, idle_ttl_s: float = DEFAULT_IDLE_TTL_S
    ) -> None:
        global _warned
        if not idle_ttl_s > 0:
            raise ValueError(f"ProcessSandbox idle_ttl_s must be > 0, got {idle_ttl_s!r}")
        self._python = python or sys.executable
        self._idle_ttl_s = idle_ttl_s
        self._root = str(Path(next(iter(shared.__path__))).resolve().parent)
        self._state: Literal["unopened", "opened", "closed"] = "unopened"
        self._children: set[_Child] = set()  # every live child, idle or busy
        self._idle: dict[_Key, list[_Child]] = {}
        self._killed_on_close: set[_Child] = set()
        self._stopped = StoppedSessions()
        self._reaper: asyncio.Task[None] | None = None
        self._candle_files = itertools.count()
        if not _warned:
            _warned = True
            _log.warning(
                "ProcessSandbox runs strategies as child processes of this service: it is NOT "
                "a security boundary; use it only for trusted code (STRATORCH_SANDBOX=docker "
                "isolates untrusted code)"
            )

    def __repr__(self) -> str:
        idle = sum(map(len, self._idle.values()))
        return (
            f"<ProcessSandbox python={self._python!r} state={self._state} "
            f"children={len(self._children)} idle={idle}>"
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Refuse new calls and end every child: the idle ones, and those still running a call
        (the call raises ``RuntimeError``); return once they are gone. Idempotent."""
        self._state = "closed"
        idle = self._take_idle()
        busy = [child for child in self._children if child not in idle]
        for child in busy:
            self._killed_on_close.add(child)
            _kill_group(child.process.pid)
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
        await asyncio.gather(
            *(self._retire(child) for child in idle),
            *(child.process.wait() for child in busy),
            *([reaper] if reaper is not None else []),
            return_exceptions=True,
        )

    async def stop(self, session: str) -> None:
        """See :meth:`shared.sandbox.port.Sandbox.stop`."""
        self._stopped.add(session)
        idle = self._take_idle(session=session)
        busy = [c for c in self._children if c.key and c.key[0] == session and c not in idle]
        for child in busy:
            child.stopped = True
            _kill_group(child.process.pid)
        await asyncio.gather(
            *(self._retire(child) for child in idle),
            *(child.process.wait() for child in busy),
            return_exceptions=True,
        )

    def __del__(self) -> None:
        # The loop may be gone: end what is left by pid, nothing asynchronous.
        for child in getattr(self, "_children", ()):
            if child.process.returncode is None:
                _kill_group(child.process.pid)
        if getattr(self, "_state", None) == "opened":
            warnings.warn(
                f"{self!r} was never closed; use 'async with ProcessSandbox()' or aclose()",
                ResourceWarning,
                stacklevel=2,
            )

    def _open(self) -> None:
        if self._state == "closed":
            raise RuntimeError("this ProcessSandbox is closed; create a new one")
        self._state = "opened"

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
        job = {"op": "describe", "strategy": code.to_json(), "symbols": list(symbols)}
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
            self._open()
            return {}
        symbols = list(candles)
        job = {"op": "signals", "strategy": code.to_json(), "interval": interval}
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
        self._open()
        if session is not None and session in self._stopped:
            raise self._stopped.error(session, code.label)
        key = None if session is None else (session, _memory_cap(limits.memory_bytes))
        child = await self._acquire(key, limits)
        warm = child.calls > 0
        try:
            return await self._run(child, job, code, limits, symbols, candles)
        except StrategyOutOfMemory:
            # A warm child keeps memory its earlier calls freed but the allocator did not
            # return, so a call can fit in a new child and not in it. A new child decides:
            # whether a call runs out of memory must not depend on which child ran it.
            if not warm:
                raise
        self._open()
        fresh = await self._start(key, limits)
        return await self._run(fresh, job, code, limits, symbols, candles)

    async def _run(
        self,
        child: _Child,
        job: dict[str, Any],
        code: ComponentRef,
        limits: SandboxLimits,
        symbols: list[str],
        candles: Mapping[str, tuple[pd.DataFrame, int]] | None,
    ) -> dict[str, Any]:
        """One call on ``child``; then park or retire it."""
        child.calls += 1
        try:
            if candles is not None:  # a new child imports pandas meanwhile
                job["candles_path"] = await self._write_candles(child.workdir, candles)
            try:
                if child.key is not None and child.key[0] in self._stopped:
                    child.stopped = True  # stopped while this child started
                    raise self._stopped.error(child.key[0], code.label)
                return await child.connection.run(
                    job, label=code.label, limits=limits, symbols=symbols
                )
            except Exception:
                if child in self._killed_on_close:
                    raise RuntimeError(f"the sandbox was closed while {code.label} ran") from None
                if child.stopped and child.key is not None:
                    raise self._stopped.error(child.key[0], code.label) from None
                raise
        finally:
            await asyncio.shield(self._release(child))

    async def _write_candles(
        self, workdir: str, candles: Mapping[str, tuple[pd.DataFrame, int]]
    ) -> str:
        path = os.path.join(workdir, f"candles-{next(self._candle_files)}.npz")
        writing = asyncio.ensure_future(asyncio.to_thread(write_candles, path, candles))
        try:
            await asyncio.shield(writing)
        except asyncio.CancelledError:
            await asyncio.wait([writing])  # a thread cannot be stopped: let it finish
            raise
        return path

    # -- children -------------------------------------------------------------------------

    async def _acquire(self, key: _Key | None, limits: SandboxLimits) -> _Child:
        """An idle child of the session, the most recently used (so the others can expire);
        a new child when there is none."""
        while key is not None and (pool := self._idle.get(key)):
            child = pool.pop()
            if not pool:
                del self._idle[key]
            if child.process.returncode is None:
                return child
            await self._retire(child)  # it died while idle
        return await self._start(key, limits)

    async def _start(self, key: _Key | None, limits: SandboxLimits) -> _Child:
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
                preexec_fn=functools.partial(_limit_child, _memory_cap(limits.memory_bytes)),
            )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        process = asyncio.subprocess.Process(transport, protocol, loop)
        child = _Child(process, transport, _connect(process), workdir, key)
        self._children.add(child)
        return child

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

    async def _release(self, child: _Child) -> None:
        """After a call: park the child for its session if it may serve again, else retire it."""
        if (
            child.key is not None
            and child.connection.reusable
            and not child.stopped
            and child.process.returncode is None
            and self._state == "opened"
        ):
            await asyncio.to_thread(_empty_dir, child.workdir)
            if self._state == "opened":  # not closed meanwhile
                self._park(child)
                return
        await self._retire(child)

    def _park(self, child: _Child) -> None:
        assert child.key is not None
        child.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(child.key, []).append(child)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="ProcessSandbox reaper")

    def _take_idle(
        self, idle_since: float = math.inf, *, session: str | None = None
    ) -> list[_Child]:
        """Remove from their pools the children idle since before ``idle_since`` (by default
        all), of ``session`` only if given; return them."""
        taken = []
        for key, pool in list(self._idle.items()):
            if session is not None and key[0] != session:
                continue
            taken += [child for child in pool if child.idle_since < idle_since]
            pool[:] = [child for child in pool if child.idle_since >= idle_since]
            if not pool:
                del self._idle[key]
        return taken

    async def _reap(self) -> None:
        """Retire children idle for ``idle_ttl_s``: sleep until the next one is due; stop
        when none is idle.

        Cancelled — by :meth:`aclose`, or by ``asyncio.run`` as its loop ends — it retires
        every idle child, so none outlives the loop that started it, closed sandbox or not.
        """
        loop = asyncio.get_running_loop()
        ttl = self._idle_ttl_s
        try:
            while self._idle:
                due = min(child.idle_since for pool in self._idle.values() for child in pool)
                if due + ttl > loop.time():
                    await asyncio.sleep(due + ttl - loop.time())
                    continue
                expired = self._take_idle(idle_since=loop.time() - ttl + _CLOCK_SLACK_S)
                await asyncio.gather(*(self._retire(child) for child in expired))
        except asyncio.CancelledError:
            await asyncio.gather(*(self._retire(child) for child in self._take_idle()))
            raise

    async def _retire(self, child: _Child) -> None:
        """Kill the child and all it started, wait for it, remove its directory."""
        _kill_group(child.process.pid)
        child.transport.close()
        try:
            await child.process.wait()
        finally:
            self._children.discard(child)
            self._killed_on_close.discard(child)
            await asyncio.to_thread(shutil.rmtree, child.workdir, ignore_errors=True)


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
