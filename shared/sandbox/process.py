"""``ProcessSandbox``: strategies in a child process with resource limits. NOT a security boundary.

The embedded default (``STRATORCH_SANDBOX=process``): it needs nothing but Python, so
``stratorch run`` works on a fresh machine. A child process keeps a strategy's crash, hang,
memory bomb or output flood away from the service — it is killed and reported as a structured
error — but it does not keep the strategy away from the host: it runs as the service's user
and can read files, open sockets and start programs. Run only code you trust in it; untrusted
code belongs in the Docker sandbox.

Per call: a fresh temporary directory (cwd, ``HOME`` and ``TMPDIR``; removed afterwards), a
minimal environment (nothing from the host's but two OpenBLAS tuning variables), its own
session and process group (so the whole group is killed: nothing it starts outlives the call),
``RLIMIT_AS`` = the memory limit, no core files, and a wall-clock timeout. The job goes in on
stdin, candles in an ``.npz`` file in the directory; see :mod:`shared.sandbox.runner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import shared
from shared.errors import (
    InvalidOutput,
    OutputTooLarge,
    RequestRejected,
    StrategyCrashed,
    StrategyOutOfMemory,
    StrategyTimeout,
    StratorchError,
)
from shared.sandbox.port import (
    DEFAULT_LIMITS,
    SandboxLimits,
    StrategyCode,
    StrategyInfo,
    validate_strategy_info,
)
from shared.sandbox.runner import THREAD_ENV, write_candles

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ProcessSandbox"]

_log = logging.getLogger(__name__)

#: What error messages quote of the strategy's output: its last lines, this many at most.
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 4096

_READ_CHUNK = 64 * 1024
_PARSE_IN_THREAD_BYTES = 256 * 1024  # a larger result is parsed off the event loop
_MAX_ERROR_TEXT = 4096
#: A fixed PATH: the host's could point into a user's directories.
_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Host variables passed through: OpenBLAS tuning the host sets on purpose (a CPU the
#: library misdetects); nothing else of the host's environment reaches a strategy.
_PASSTHROUGH_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: Text in the log of a process that died without a result that says memory ran out.
_OOM_SIGNS = ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory")

_warned = False


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB"


class _Log:
    """The newest ``keep`` bytes of the strategy's output, and how much it wrote in all."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._buf = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._buf += chunk
        if len(self._buf) > self._keep:
            del self._buf[: len(self._buf) - self._keep]

    def tail(self) -> str:
        """The last :data:`LOG_TAIL_LINES` lines, :data:`LOG_TAIL_BYTES` at most."""
        data = bytes(self._buf[-LOG_TAIL_BYTES:])
        cut = len(data) < len(self._buf)
        lines = data.decode(errors="replace").splitlines()
        if cut and len(lines) > 1:
            lines = lines[1:]  # a partial first line
        if len(lines) > LOG_TAIL_LINES:
            lines, cut = lines[-LOG_TAIL_LINES:], True
        return ("...\n" if cut else "") + "\n".join(lines)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _limit_child(memory_bytes: int) -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class ProcessSandbox:
    """Runs each call's strategy in a fresh child process. NOT a security boundary.

    For trusted code only (see the module docstring): limits contain accidents, not attacks.
    Calls may run concurrently; how many is the caller's business.

    :param python: the interpreter for the child; default the running one, whose environment
        must be able to import numpy, pandas and :mod:`shared`.

    Example::

        async with ProcessSandbox() as sandbox:
            code = StrategyCode.from_spec({"builtin": "sma_cross", "params": {"fast": 5}})
            info = await sandbox.describe(code, ["BTCUSDT"])
            signals = await sandbox.signals(code, {"BTCUSDT": (frame, 200)}, interval="1h")
    """

    def __init__(self, *, python: str | None = None) -> None:
        global _warned
        self._python = python or sys.executable
        self._root = str(Path(next(iter(shared.__path__))).resolve().parent)
        self._state: Literal["unopened", "opened", "closed"] = "unopened"
        self._children: set[asyncio.subprocess.Process] = set()
        self._killed_on_close: set[asyncio.subprocess.Process] = set()
        if not _warned:
            _warned = True
            _log.warning(
                "ProcessSandbox runs strategies as child processes of this service: it is NOT "
                "a security boundary; use it only for trusted code (STRATORCH_SANDBOX=docker "
                "isolates untrusted code)"
            )

    def __repr__(self) -> str:
        return f"<ProcessSandbox python={self._python!r} state={self._state}>"

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
        """Refuse new calls and kill strategies still running (their calls raise
        ``RuntimeError``); idempotent."""
        self._state = "closed"
        for proc in list(self._children):
            self._killed_on_close.add(proc)
            _kill_group(proc.pid)

    def __del__(self) -> None:
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
        self, code: StrategyCode, symbols: list[str], *, limits: SandboxLimits = DEFAULT_LIMITS
    ) -> StrategyInfo:
        """See :meth:`shared.sandbox.port.Sandbox.describe`."""
        job = {"op": "describe", "strategy": code.loader_spec(), "symbols": list(symbols)}
        reply = await self._call(job, code, limits, symbols=symbols)
        return validate_strategy_info(
            reply.get("lookback"), reply.get("units"), symbols, label=code.label
        )

    async def signals(
        self,
        code: StrategyCode,
        candles: Mapping[str, tuple[pd.DataFrame, int]],
        *,
        interval: str,
        limits: SandboxLimits = DEFAULT_LIMITS,
    ) -> dict[str, list[dict[str, Any]]]:
        """See :meth:`shared.sandbox.port.Sandbox.signals`."""
        if not candles:
            self._open()
            return {}
        symbols = list(candles)
        job = {"op": "signals", "strategy": code.loader_spec(), "interval": interval}
        reply = await self._call(job, code, limits, symbols=symbols, candles=candles)
        signals = reply.get("signals")
        if (
            not isinstance(signals, dict)
            or sorted(signals) != sorted(symbols)
            or not all(
                isinstance(records, list) and all(isinstance(r, dict) for r in records)
                for records in signals.values()
            )
        ):
            raise InvalidOutput(
                f"{code.label}: the sandbox returned no list of signal records per symbol"
            )
        return signals

    # -- one child ------------------------------------------------------------------------

    async def _call(
        self,
        job: dict[str, Any],
        code: StrategyCode,
        limits: SandboxLimits,
        *,
        symbols: list[str],
        candles: Mapping[str, tuple[pd.DataFrame, int]] | None = None,
    ) -> dict[str, Any]:
        self._open()
        workdir = tempfile.mkdtemp(prefix="stratorch-sandbox-")
        proc: asyncio.subprocess.Process | None = None
        try:
            if candles is not None:
                path = os.path.join(workdir, "candles.npz")
                writing = asyncio.ensure_future(asyncio.to_thread(write_candles, path, candles))
                try:
                    await asyncio.shield(writing)
                except asyncio.CancelledError:
                    await asyncio.wait([writing])  # a thread cannot be stopped: let it finish
                    raise
                job["candles_path"] = path
            payload = json.dumps(job).encode()
            proc = await asyncio.create_subprocess_exec(
                self._python,
                "-P",  # no cwd on sys.path
                "-s",  # no user site-packages
                "-m",
                "shared.sandbox.runner",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=workdir,
                env=self._child_env(workdir),
                start_new_session=True,
                preexec_fn=functools.partial(_limit_child, _memory_cap(limits.memory_bytes)),
            )
            self._children.add(proc)
            return await self._communicate(proc, payload, code, limits, symbols)
        finally:
            await asyncio.shield(self._cleanup(proc, workdir))

    async def _cleanup(self, proc: asyncio.subprocess.Process | None, workdir: str) -> None:
        try:
            if proc is not None:
                _kill_group(proc.pid)  # also whatever the strategy started
                await proc.wait()
                self._children.discard(proc)
                self._killed_on_close.discard(proc)
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)

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
            **THREAD_ENV,
        }
        env.update({name: os.environ[name] for name in _PASSTHROUGH_ENV if name in os.environ})
        return env

    async def _communicate(
        self,
        proc: asyncio.subprocess.Process,
        payload: bytes,
        code: StrategyCode,
        limits: SandboxLimits,
        symbols: list[str],
    ) -> dict[str, Any]:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
        log = _Log(limits.log_bytes)
        result = bytearray()
        overflow: list[str] = []  # what went over its cap; the child is killed at once

        async def feed() -> None:
            try:
                stdin.write(payload)
                await stdin.drain()
                stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the child died before reading its job; its exit status tells why

        async def read_result() -> None:
            while chunk := await stdout.read(_READ_CHUNK):
                if len(result) + len(chunk) > limits.output_bytes:
                    if not overflow:
                        overflow.append("result")
                        _kill_group(proc.pid)
                    continue
                result.extend(chunk)

        async def read_log() -> None:
            while chunk := await stderr.read(_READ_CHUNK):
                log.add(chunk)
                if log.total > limits.log_flood_bytes and not overflow:
                    overflow.append("log")
                    _kill_group(proc.pid)

        timed_out = False
        try:
            async with asyncio.timeout(limits.timeout_s), asyncio.TaskGroup() as group:
                group.create_task(feed())
                group.create_task(read_result())
                group.create_task(read_log())
                group.create_task(proc.wait())
        except TimeoutError:
            timed_out = True
            _kill_group(proc.pid)
            await proc.wait()
        if proc in self._killed_on_close:
            raise RuntimeError(f"the sandbox was closed while {code.label} ran")
        if overflow == ["log"]:
            raise OutputTooLarge(
                f"{code.label} printed more than {_mib(limits.log_flood_bytes)} and was killed; "
                "print less (log a summary, not every bar)",
                log_tail=log.tail(),
            )
        if overflow == ["result"]:
            raise OutputTooLarge(
                f"{code.label} returned more than {_mib(limits.output_bytes)} of signals and "
                "was killed; return fewer signals or a smaller 'meta'",
                log_tail=log.tail(),
            )
        if timed_out:
            raise StrategyTimeout(
                f"{code.label} did not finish within {limits.timeout_s:g} s and was killed; "
                "make it faster (a vectorized signals() instead of decide()) or raise the "
                "unit timeout",
                log_tail=log.tail(),
            )
        reply = await _parse(bytes(result))
        returncode = proc.returncode
        assert returncode is not None
        if reply is None:
            tail = log.tail()
            if returncode == 0:
                raise InvalidOutput(
                    f"{code.label} ended without a valid result (did it write to the "
                    "sandbox's result stream, or call os._exit?)",
                    log_tail=tail,
                )
            died = _exit_text(returncode)
            if returncode == -signal.SIGKILL or any(sign in tail for sign in _OOM_SIGNS):
                raise StrategyOutOfMemory(
                    f"{code.label} {died}, most likely for running out of memory (limit "
                    f"{_mib(limits.memory_bytes)}); use less, e.g. smaller windows or dtypes",
                    log_tail=tail,
                )
            raise StrategyCrashed(f"{code.label} {died} before returning a result", log_tail=tail)
        if reply.get("ok") is True:
            return reply
        raise _error(reply.get("error"), code, limits, symbols, log)


def _memory_cap(memory_bytes: int) -> int:
    """``memory_bytes``, or the service's own hard limit if that is lower (a child cannot
    raise it, and asking would fail the start)."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    return memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)


async def _parse(data: bytes) -> dict[str, Any] | None:
    """The runner's result document, or ``None`` when there is none or it is not one."""
    if not data:
        return None
    try:
        if len(data) > _PARSE_IN_THREAD_BYTES:
            reply = await asyncio.to_thread(json.loads, data)
        else:
            reply = json.loads(data)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) and isinstance(reply.get("ok"), bool) else None


def _text(value: object) -> str:
    text = value if isinstance(value, str) else ""
    return text if len(text) <= _MAX_ERROR_TEXT else "..." + text[-_MAX_ERROR_TEXT:]


def _error(
    error: object, code: StrategyCode, limits: SandboxLimits, symbols: list[str], log: _Log
) -> StratorchError:
    """The ``shared.errors`` exception for a runner's ``{"ok": false, "error": ...}``.

    The fields come from the child and are treated as untrusted text: unknown kinds count as
    crashes and a symbol the call did not ask for is dropped.
    """
    fields = error if isinstance(error, dict) else {}
    kind = fields.get("kind")
    message = _text(fields.get("message")) or "no message"
    symbol = fields.get("symbol")
    symbol = symbol if isinstance(symbol, str) and symbol in symbols else None
    tail = log.tail()
    trace = _text(fields.get("traceback"))
    if trace:
        tail = f"{tail}\n{trace}" if tail else trace
    on = f" on {symbol}" if symbol else ""
    if kind == "rejected":
        return RequestRejected(message, symbol=symbol, log_tail=tail)
    if kind == "invalid_output":
        return InvalidOutput(
            f"{code.label} returned invalid output{on}: {message}", symbol=symbol, log_tail=tail
        )
    if kind == "oom":
        return StrategyOutOfMemory(
            f"{code.label} ran out of memory{on} (limit {_mib(limits.memory_bytes)}): {message}",
            symbol=symbol,
            log_tail=tail,
        )
    return StrategyCrashed(f"{code.label} crashed{on}: {message}", symbol=symbol, log_tail=tail)
