"""The parent's side of the runner's protocol: one job at a time over the runner's three streams.

:class:`RunnerConnection` knows the wire format of :mod:`shared.sandbox.runner` — a job line
in; a result line and a log ending in the job's end marker out — and turns what comes back
into a reply or a :mod:`shared.errors` exception. It does not know how the runner was
started: :class:`shared.sandbox.process.ProcessSandbox` hands it a child process's pipes, a
Docker sandbox hands it an attached container's streams; each also gives it a way to kill the
runner and to learn its exit status.

After each job, :attr:`RunnerConnection.reusable` says whether the runner may take another.
It stays true after a strategy's own error (``ok: false``), which leaves the runner sound.
Anything that may have left it in a bad state — a timeout, an output flood, a result over its
cap or unreadable, running out of memory, the runner dying, the call being cancelled, or the
runner saying it is unfit — makes it false, and the connection has then killed the runner.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from shared.errors import (
    ForbiddenOperation,
    InvalidOutput,
    OutputTooLarge,
    RequestRejected,
    StrategyCrashed,
    StrategyOutOfMemory,
    StrategyTimeout,
    StratorchError,
)
from shared.sandbox.port import SandboxLimits
from shared.sandbox.protocol import PROTOCOL, log_end_marker

__all__ = ["LOG_TAIL_BYTES", "LOG_TAIL_LINES", "ByteReader", "ByteWriter", "RunnerConnection"]

#: What error messages quote of the strategy's output: its last lines, this many at most.
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 4096

_READ_CHUNK = 64 * 1024
_PARSE_IN_THREAD_BYTES = 256 * 1024  # a larger result is parsed off the event loop
_MAX_ERROR_TEXT = 4096
#: Text in the log of a runner that died without a result that says memory ran out.
_OOM_SIGNS = ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory")


class ByteReader(Protocol):
    """One of the runner's output streams (``asyncio.StreamReader`` is one)."""

    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    """The runner's input stream (``asyncio.StreamWriter`` is one)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB"


class _Log:
    """The newest ``keep`` bytes of a job's output, and how much it wrote in all."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._buf = bytearray()
        self.total = 0
        #: The newest bytes, not yet added: they may be the start of the end marker. Shown
        #: in :meth:`tail` all the same, in case no more output comes (a timeout).
        self.pending = b""

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._buf += chunk
        if len(self._buf) > self._keep:
            del self._buf[: len(self._buf) - self._keep]

    def tail(self) -> str:
        """The last :data:`LOG_TAIL_LINES` lines, :data:`LOG_TAIL_BYTES` at most."""
        data = (bytes(self._buf[-LOG_TAIL_BYTES:]) + self.pending)[-LOG_TAIL_BYTES:]
        cut = len(data) < len(self._buf) + len(self.pending)
        lines = data.decode(errors="replace").splitlines()
        if cut and len(lines) > 1:
            lines = lines[1:]  # a partial first line
        if len(lines) > LOG_TAIL_LINES:
            lines, cut = lines[-LOG_TAIL_LINES:], True
        return ("...\n" if cut else "") + "\n".join(lines)


class RunnerConnection:
    """Runs jobs, one at a time, on a runner started with ``--serve``.

    :param jobs: the runner's stdin.
    :param results: the runner's result stream (its stdout).
    :param log: the runner's log stream (its stderr).
    :param kill: ends the runner and everything it started, at once; called on any failure
        that may have left it in a bad state. Must be idempotent.
    :param exit_status: waits for the runner to end; its exit code, or ``-signal`` when a
        signal killed it (as :attr:`subprocess.Popen.returncode`). Called only after both
        output streams have ended.
    """

    def __init__(
        self,
        jobs: ByteWriter,
        results: ByteReader,
        log: ByteReader,
        *,
        kill: Callable[[], Awaitable[None]],
        exit_status: Callable[[], Awaitable[int]],
    ) -> None:
        self._jobs = jobs
        self._results = results
        self._log = log
        self._kill = kill
        self._exit_status = exit_status
        #: Whether the runner may take another job; false once it has been killed.
        self.reusable = True

    async def run(
        self,
        job: Mapping[str, Any],
        *,
        label: str,
        limits: SandboxLimits,
        symbols: Sequence[str] = (),
        payload: bytes = b"",
    ) -> dict[str, Any]:
        """Run ``job`` (a runner job without its ``id``) and return its ``ok: true`` reply.

        :param label: names the strategy in messages (:attr:`ComponentRef.label`).
        :param limits: the job's wall-clock timeout and output caps; ``memory_bytes`` is the
            starter's to enforce, messages only quote it.
        :param symbols: the job's symbols; an error naming another symbol is not believed.
        :param payload: bytes sent right after the job line, inside the timeout: the job's
            candles when it says ``candles_bytes`` (see :mod:`shared.sandbox.runner`).
        :raises StratorchError: the strategy failed; see :class:`shared.sandbox.port.Sandbox`.
        :raises RuntimeError: the runner was killed by an earlier job.
        """
        if not self.reusable:
            raise RuntimeError("this runner was ended after an earlier job; start a new one")
        self.reusable = False  # until this job ends cleanly
        token = secrets.token_hex(8)
        log = _Log(limits.log_bytes)
        try:
            reply = await self._exchange({**job, "id": token}, payload, token, log, label, limits)
            self.reusable = reply.get("reusable") is True and not _is_oom(reply)
        finally:
            if not self.reusable:
                await self._kill()
        if reply.get("ok") is True:
            return reply
        raise _error(reply.get("error"), label, limits, symbols, log)

    async def _exchange(
        self,
        job: Mapping[str, Any],
        payload: bytes,
        token: str,
        log: _Log,
        label: str,
        limits: SandboxLimits,
    ) -> dict[str, Any]:
        """Send the job; read its reply and its log, both to their end, within the timeout.

        The three run as tasks so that neither pipe fills up while another is awaited; the
        first failure ends the exchange. (Not a ``TaskGroup``: on Python 3.11 a child failing
        while the group exits leaves the calling task marked as cancelling.)
        """
        line = json.dumps(job).encode() + b"\n"
        tasks = [
            asyncio.create_task(self._send(line, payload)),
            asyncio.create_task(self._receive(token, log, label, limits)),
            asyncio.create_task(self._read_log(log, log_end_marker(token), label, limits)),
        ]
        deadline = asyncio.timeout(limits.timeout_s)
        try:
            async with deadline:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in tasks:
                    if task.done() and (failure := task.exception()) is not None:
                        raise failure
                reply = tasks[1].result()
                if reply is None:
                    raise _death(await self._exit_status(), label, limits, log.tail())
        except TimeoutError:
            if not deadline.expired():
                raise
            raise StrategyTimeout(
                f"{label} did not finish within {limits.timeout_s:g} s and was killed; "
                "make it faster (a vectorized signals() instead of decide()) or raise the "
                "unit timeout",
                log_tail=log.tail(),
            ) from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return reply

    async def _send(self, line: bytes, payload: bytes) -> None:
        try:
            self._jobs.write(line)
            if payload:
                self._jobs.write(payload)
            await self._jobs.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the runner is gone; its exit status says why

    async def _receive(
        self, token: str, log: _Log, label: str, limits: SandboxLimits
    ) -> dict[str, Any] | None:
        """The job's reply; ``None`` when the result stream ends without one.

        A reply the runner does not vouch for gets the runner killed right away: it may have
        lost the job's end marker, and then only the end of the log stream ends the log.
        """
        data = bytearray()
        chunk = b""
        while b"\n" not in chunk:  # the reply's one newline ends it
            chunk = await self._results.read(_READ_CHUNK)
            if not chunk:
                return None
            data += chunk
            if len(data) > limits.output_bytes:
                raise OutputTooLarge(
                    f"{label} returned more than {_mib(limits.output_bytes)} of signals and "
                    "was killed; return fewer signals or a smaller 'meta'",
                    log_tail=log.tail(),
                )
        reply = await _parse(bytes(data))
        if reply is None or reply.get("id") != token:
            raise InvalidOutput(
                f"{label} wrote something other than its result to the sandbox's result "
                "stream; print to stdout or stderr instead",
                log_tail=log.tail(),
            )
        if reply.get("protocol") != PROTOCOL:
            await self._kill()
            raise StrategyCrashed(
                f"the sandbox's runner answers in protocol {reply.get('protocol', 1)} and this"
                f" worker reads protocol {PROTOCOL}: the sandbox image holds the runner of"
                " another stratorch version; rebuild it from this one (`docker compose build`,"
                " or services/symbol_worker/sandbox/Dockerfile)"
            )
        if reply.get("reusable") is not True:
            await self._kill()
        return reply

    async def _read_log(self, log: _Log, marker: bytes, label: str, limits: SandboxLimits) -> None:
        """Read the log stream into ``log`` up to the job's end marker or the stream's end.

        The last ``len(marker) - 1`` bytes stay pending until the next chunk, so a marker
        split across two reads is still found and never shows in the log.
        """
        while chunk := await self._log.read(_READ_CHUNK):
            data = log.pending + chunk
            at = data.find(marker)
            if at >= 0:
                log.pending = b""
                log.add(data[:at])
                return
            cut = max(len(data) - len(marker) + 1, 0)
            log.pending = data[cut:]
            log.add(data[:cut])
            if log.total > limits.log_flood_bytes:
                raise OutputTooLarge(
                    f"{label} printed more than {_mib(limits.log_flood_bytes)} and was "
                    "killed; print less (log a summary, not every bar)",
                    log_tail=log.tail(),
                )
        log.add(log.pending)
        log.pending = b""


def _is_oom(reply: Mapping[str, Any]) -> bool:
    error = reply.get("error")
    return isinstance(error, dict) and error.get("kind") == "oom"


async def _parse(data: bytes) -> dict[str, Any] | None:
    """The runner's reply, or ``None`` when ``data`` is not one."""
    try:
        if len(data) > _PARSE_IN_THREAD_BYTES:
            reply = await asyncio.to_thread(json.loads, data)
        else:
            reply = json.loads(data)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) and isinstance(reply.get("ok"), bool) else None


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def _death(returncode: int, label: str, limits: SandboxLimits, tail: str) -> StratorchError:
    """The error for a runner that ended in the middle of a job, from its exit status."""
    if returncode == 0:
        return InvalidOutput(
            f"{label} ended without a valid result (did it write to the sandbox's result "
            "stream, or call os._exit?)",
            log_tail=tail,
        )
    died = _exit_text(returncode)
    if returncode == -signal.SIGKILL or any(sign in tail for sign in _OOM_SIGNS):
        return StrategyOutOfMemory(
            f"{label} {died}, most likely for running out of memory (limit "
            f"{_mib(limits.memory_bytes)}); use less, e.g. smaller windows or dtypes",
            log_tail=tail,
        )
    return StrategyCrashed(f"{label} {died} before returning a result", log_tail=tail)


def _text(value: object) -> str:
    text = value if isinstance(value, str) else ""
    return text if len(text) <= _MAX_ERROR_TEXT else "..." + text[-_MAX_ERROR_TEXT:]


def _error(
    error: object, label: str, limits: SandboxLimits, symbols: Sequence[str], log: _Log
) -> StratorchError:
    """The ``shared.errors`` exception for a runner's ``{"ok": false, "error": ...}``.

    The fields come from the runner and are treated as untrusted text: unknown kinds count as
    crashes and a symbol the job did not ask for is dropped.
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
            f"{label} returned invalid output{on}: {message}", symbol=symbol, log_tail=tail
        )
    if kind == "forbidden":
        return ForbiddenOperation(
            f"{label} tried something the sandbox does not allow{on}: {message}; strategies "
            "get no network and a read-only file system (only a small /tmp is writable)",
            symbol=symbol,
            log_tail=tail,
        )
    if kind == "oom":
        return StrategyOutOfMemory(
            f"{label} ran out of memory{on} (limit {_mib(limits.memory_bytes)}): {message}",
            symbol=symbol,
            log_tail=tail,
        )
    return StrategyCrashed(f"{label} crashed{on}: {message}", symbol=symbol, log_tail=tail)
