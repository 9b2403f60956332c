"""The program that runs strategies inside the sandbox: ``python -m shared.sandbox.runner --serve``.

It runs wherever untrusted code runs (a child process, a container), so it imports only the
standard library, numpy, pandas and :mod:`shared.strategy` — and numpy only after it has
pinned BLAS to one thread.

Protocol
--------
The runner serves jobs one after another until stdin ends; it imports pandas once, so a warm
runner answers a job in milliseconds where a fresh one pays ~0.4 s of start-up. Each line on
stdin is one JSON job; ``id`` is the parent's token for it (``[0-9A-Za-z_-]``, ≤ 64 chars)::

    {"id": "9f2c", "op": "describe", "strategy": {<ComponentRef.to_json()>}, "symbols": [...]}
    {"id": "9f2d", "op": "signals", "strategy": {...}, "interval": "1h", "candles_path": "..."}
    {"id": "9f2e", "op": "signals", "strategy": {...}, "interval": "1h", "candles_bytes": 52317}

The candles come as raw column buffers written by :func:`~shared.sandbox.protocol.write_candles`
(a JSON header, then each column's bytes: never pickle across the boundary), which become
the strategy's frame without being parsed or copied: in a file (``candles_path``), or right
after the job line on stdin, exactly ``candles_bytes`` bytes of it — for a sandbox whose file
system the parent cannot write to (a container started through a remote dockerd).
A job may also say ``"watch_oom": true`` (a runner alone in its memory cgroup, as in a
container): then an OOM kill of any of its processes during the job makes the job ``oom``.
For each job the runner writes, in this order:

1. :func:`~shared.sandbox.protocol.log_end_marker` of the job's id to the log stream (fd 2),
   after all the job printed;
2. exactly one line of JSON to the result stream (the original fd 1)::

    {"id": "9f2c", "reusable": true, "ok": true, "lookback": 51, "units": [["BTCUSDT"], ...]}
    {"id": "9f2d", "reusable": true, "ok": true, "signals": {"BTCUSDT": [{"t": ...}, ...]}}
    {"id": ..., "reusable": true, "ok": false, "error": {"kind": ..., "message": ...,
     "symbol": ..., "traceback": ...}}

The marker comes first, so a parent that has the result knows the job's whole log is already
in the log pipe and ends at the marker: the log is attributed to the job that wrote it. A
child process the strategy forks never answers: should it return or raise into the runner's
code, it exits there.
``reusable`` is false when the job left the runner unfit for another — it ran out of memory,
left a thread or a child process behind, or replaced fd 2 (its marker may be lost) — and the
parent should end it. A failing strategy (``ok: false``) does not end the runner.

Every job loads its strategy afresh (uploaded source becomes a new module), and afterwards
the runner drops that module and restores its working directory and environment, so nothing
a job keeps in module state reaches the next one. At the end of stdin it exits 0.

Everything the strategy writes — ``print``, warnings, C code writing to fd 1 or 2 — goes to
fd 2, the log stream: before anything else runs, fd 0 and fd 1 are duplicated privately for
jobs and results, fd 0 is pointed at ``/dev/null`` and fd 1 at fd 2, so no output of the
strategy can corrupt a result and no read of stdin can swallow a job.

Error kinds: ``rejected`` (the code does not load: ``ComponentError``), ``invalid_output``
(``StrategyOutputError``, or a result that is not JSON-serializable), ``oom``
(``MemoryError``, or an OOM kill with ``watch_oom``), ``forbidden`` (the sandbox refused
a file or network operation: a ``PermissionError``, a read-only file system, no network; see
:func:`_refusal`) and ``crashed`` (anything else the strategy raised, at import too, and
``sys.exit``). ``traceback`` holds the frames of the strategy's code, not the runner's.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import io
import json
import os
import re
import socket
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeGuard

from shared.sandbox.protocol import (
    PROTOCOL,
    RUNTIME_ENV,
    log_end_marker,
    read_candles,
    read_exactly,
)

__all__ = ["STRATEGY_IMPORTS", "main", "serve"]

#: What uploaded strategy code may import besides the standard library: what the sandbox
#: image has (``shared`` for ``from shared.strategy import BaseStrategy``). Both sandboxes
#: refuse anything else the same way, so code that runs in one runs in the other.
STRATEGY_IMPORTS = frozenset({"numpy", "pandas", "shared"})

_SHARED_DIR = str(Path(__file__).resolve().parent.parent)
# Written without allocating when even formatting an error runs out of memory.
_OOM_REPLY = (
    b'{"ok": false, "error": {"kind": "oom", "message": "MemoryError", '
    b'"symbol": null, "traceback": ""}}'
)
_JOB_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
#: ``shared.strategy.loader`` registers uploaded code in ``sys.modules`` under this prefix.
_USER_MODULE_PREFIX = "stratorch_user_"
_MAX_TRACEBACK_CHARS = 8192


# -- the job ----------------------------------------------------------------------------------


class _Failure(Exception):
    """A failure to report as ``{"ok": false}`` with this ``kind`` and ``message``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class _Job:
    """Runs one job; remembers the symbol in progress so a failure can name it."""

    def __init__(self, job: Mapping[str, Any], candles: bytearray | None = None) -> None:
        self.job = job
        #: The job's candles when they came on stdin (``candles_bytes``).
        self.candles = candles
        self.symbol: str | None = None

    def run(self) -> dict[str, Any]:
        op = self.job.get("op")
        if op == "describe":
            return self._describe()
        if op == "signals":
            return self._signals()
        raise ValueError(f"unknown op {op!r}")  # a runner bug, reported as crashed

    def _load(self) -> Any:
        from shared.strategy import BUILTIN_STRATEGIES, BaseStrategy, ComponentRef, load_component

        return load_component(
            ComponentRef.from_json(self.job["strategy"]),
            registry=BUILTIN_STRATEGIES,
            base=BaseStrategy,
            imports=STRATEGY_IMPORTS,
        )

    def _describe(self) -> dict[str, Any]:
        from shared.strategy import BaseStrategy

        strategy = self._load()
        lookback = strategy.get_required_lookback()
        units = strategy.work_units(list(self.job["symbols"]))
        vectorized = type(strategy).signals is not BaseStrategy.signals  # as compute_signals
        return {"ok": True, "lookback": lookback, "units": units, "vectorized": vectorized}

    def _signals(self) -> dict[str, Any]:
        from shared.strategy import compute_signals

        strategy = self._load()
        interval = self.job["interval"]
        signals: dict[str, Any] = {}
        source = self.job["candles_path"] if self.candles is None else self.candles
        self.candles = None  # each frame holds its part of the bytes; they go with the last
        for symbol, frame, first_sim in read_candles(source):
            self.symbol = symbol
            signals[symbol] = compute_signals(
                strategy, frame, first_sim=first_sim, interval=interval, symbol=symbol
            )
            del frame
        self.symbol = None
        return {"ok": True, "signals": signals}


def _describe_value(value: object) -> object:
    """``json.dumps`` fallback for describe: numpy scalars become Python ones, the rest a
    readable stand-in, so the host can say what the strategy returned."""
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        return item()
    return f"<{type(value).__name__} {value!r:.100}>"


def _signal_value(value: object) -> object:
    """``json.dumps`` fallback for signals: numpy scalars only; anything else is an error."""
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        return item()
    raise _Failure(
        "invalid_output",
        f"a signal holds a {type(value).__name__} ({value!r:.100}), which is not JSON; "
        "use numbers, strings, lists and dicts",
    )


def _encode(reply: Mapping[str, Any], op: object) -> bytes:
    default = _describe_value if op == "describe" else _signal_value
    return json.dumps(reply, default=default).encode()


# -- errors -----------------------------------------------------------------------------------


def _is_framework(filename: str) -> bool:
    return filename.startswith((_SHARED_DIR + os.sep, "<frozen "))


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the first frame outside the runner and ``shared`` on; all frames
    when there is none (then the failure is ours and every frame helps)."""
    frames = traceback.extract_tb(exc.__traceback__)
    start = next((i for i, frame in enumerate(frames) if not _is_framework(frame.filename)), 0)
    lines = ["Traceback (most recent call last):\n"]
    lines += traceback.format_list(frames[start:])
    lines += traceback.format_exception_only(type(exc), exc)
    text = "".join(lines)
    if len(text) > _MAX_TRACEBACK_CHARS:
        text = "...\n" + text[-_MAX_TRACEBACK_CHARS:]
    return text


def _is_user(filename: str) -> bool:
    """A frame of the strategy's code: neither ``shared``, nor the standard library, nor an
    installed package."""
    library = tuple(p + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix} if p)
    return not _is_framework(filename) and not filename.startswith(library)


def _where(exc: BaseException) -> str:
    """`` (line 7 in decide, <strategy source>)`` for the innermost frame of the strategy."""
    own = [f for f in traceback.extract_tb(exc.__traceback__) if _is_user(f.filename)]
    if not own:
        return ""
    frame = own[-1]
    return f" (line {frame.lineno} in {frame.name}, {Path(frame.filename).name})"


def _describe_exception(exc: BaseException) -> str:
    """``KeyError: 'x' (line 6 in decide, <strategy source>); <notes>`` on one line."""
    text = str(exc)
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    notes = getattr(exc, "__notes__", None)
    where = _where(exc)
    if isinstance(notes, list) and notes:
        return f"{message}{where}; " + "; ".join(map(str, notes))
    return f"{message}{where}"


def _raised_by_strategy(cause: BaseException | None) -> TypeGuard[BaseException]:
    """Whether the cause of a ``ComponentError`` is the strategy's code failing as it ran.

    ``load_component`` wraps everything that goes wrong while loading. A bad spec (unknown
    name, missing class, syntax error, unknown module) and a parameter check (a
    ``ValueError`` from the class's ``__init__``, worded for the user) make the request
    invalid: ``rejected``. The strategy's module failing as it is executed (whatever it
    raises, ``sys.exit`` included) and any other exception from its own frames are crashes.
    """
    if cause is None or isinstance(cause, SyntaxError):
        return False
    own = [f for f in traceback.extract_tb(cause.__traceback__) if _is_user(f.filename)]
    if any(frame.name == "<module>" for frame in own):
        return True
    return bool(own) and not isinstance(cause, ValueError)


#: ``errno`` values of an operation the sandbox refuses: writing outside the one writable
#: directory (read-only root, no permission) or reaching for a network there is none of.
_REFUSED_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ECONNREFUSED,
    }
)


def _refusal(exc: BaseException) -> OSError | None:
    """The ``OSError`` by which the sandbox refused the strategy something, if ``exc`` is one
    or was raised while handling one (a library re-raising it as its own error): a
    ``PermissionError``, a read-only file system, an unreachable network or host, a refused
    connection, a name that cannot be resolved (a sandbox has no DNS)."""
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 50:
        if isinstance(cause, socket.gaierror) or (
            isinstance(cause, OSError) and cause.errno in _REFUSED_ERRNOS
        ):
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


def _error_reply(exc: BaseException, symbol: str | None) -> dict[str, Any]:
    from shared.strategy import ComponentError, StrategyOutputError

    tb = ""
    if isinstance(exc, _Failure):
        kind, message = exc.kind, exc.message
    elif isinstance(exc, ComponentError) and _raised_by_strategy(cause := exc.__cause__):
        # The spec was fine but the strategy's own code failed while loading: a crash (or the
        # sandbox refusing it something).
        kind, tb = "crashed", _user_traceback(cause)
        if _refusal(cause) is not None:
            kind, message = "forbidden", str(exc)
        elif isinstance(cause, SystemExit):
            message = f"the strategy called sys.exit({cause.code!r}) while loading{_where(cause)}"
        else:
            message = str(exc)
    elif isinstance(exc, ComponentError):
        kind, message = "rejected", str(exc)
    elif isinstance(exc, StrategyOutputError):
        kind, message = "invalid_output", str(exc)
    elif isinstance(exc, MemoryError):
        kind, message, tb = "oom", _describe_exception(exc), _user_traceback(exc)
    elif isinstance(exc, SystemExit):
        code = exc.code
        kind, tb = "crashed", _user_traceback(exc)
        message = f"the strategy called sys.exit({code!r}){_where(exc)}"
    elif (refused := _refusal(exc)) is not None:
        kind, tb = "forbidden", _user_traceback(exc)
        message = _describe_exception(exc)
        if refused is not exc:
            message += f" (caused by {type(refused).__name__}: {refused})"
    else:
        kind, tb = "crashed", _user_traceback(exc)
        message = _describe_exception(exc)
    return {
        "ok": False,
        "error": {"kind": kind, "message": message, "symbol": symbol, "traceback": tb},
    }


# -- serving ----------------------------------------------------------------------------------


def _job_id(job: object) -> str | None:
    value = job.get("id") if isinstance(job, dict) else None
    return value if isinstance(value, str) and _JOB_ID.fullmatch(value) else None


def _starved(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was caused by, running out of memory."""
    seen = 0
    while exc is not None and seen < 50:
        if isinstance(exc, MemoryError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _read_payload(job: object, jobs: io.BufferedReader) -> bytearray | None:
    """The ``candles_bytes`` bytes that follow ``job``'s line on stdin, if it has any."""
    size = job.get("candles_bytes") if isinstance(job, dict) else None
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _Failure("crashed", f"the sandbox received a job with candles_bytes={size!r}")
    try:
        return read_exactly(jobs, size)  # writable: the frames' columns are views of it
    except ValueError:
        raise _Failure("crashed", "the sandbox's input ended inside a job's candles") from None


def _oom_kills() -> int | None:
    """How many processes the OOM killer has ended in this memory cgroup (cgroup v2 or v1),
    or ``None`` where that cannot be read.

    Only meaningful where the runner has a memory cgroup of its own — a container: the
    parent asks for it with ``"watch_oom": true``. Docker's ``OOMKilled`` is set only once the
    container has exited, so a warm container has no other way to tell.
    """
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as file:
                lines = file.read().splitlines()
        except OSError:
            continue
        for line in lines:
            name, _, value = line.partition(" ")
            if name == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def _run(line: bytes, jobs: io.BufferedReader) -> tuple[str | None, bytes, bool]:
    """Run the job on ``line`` (reading its candles from ``jobs`` when they follow it): its
    id, its reply (one JSON object) and whether memory held.

    Never raises: whatever fails, the strategy or the runner, becomes an ``ok: false`` reply.
    """
    job_id: str | None = None
    try:
        try:
            job = json.loads(line)
        except ValueError as exc:
            raise _Failure("crashed", f"the sandbox received a malformed job: {exc}") from exc
        candles = _read_payload(job, jobs)  # first: whatever fails next, stdin stays in step
        job_id = _job_id(job)
        if job_id is None:
            raise _Failure("crashed", "the sandbox received a job without a valid 'id'")
        runner = _Job(job, candles)
        del candles
        kills = _oom_kills() if job.get("watch_oom") is True else None
        try:
            reply, fit = _encode(runner.run(), job.get("op")), True
        except BaseException as exc:  # the strategy's failure, whatever it is
            starved = _starved(exc)
            if starved:
                traceback.clear_frames(exc.__traceback__)  # free what the strategy held
            reply, fit = _encode(_error_reply(exc, runner.symbol), None), not starved
        if kills is not None and (after := _oom_kills()) is not None and after > kills:
            # The OOM killer ended a process of the job (a child: the runner is still here).
            # Whatever the strategy made of that, the memory limit decided its outcome.
            message = (
                f"the kernel's OOM killer ended {after - kills} process(es) of the strategy "
                "at the sandbox's memory limit"
            )
            error = {"kind": "oom", "message": message, "symbol": runner.symbol, "traceback": ""}
            reply, fit = _encode({"ok": False, "error": error}, None), False
        return job_id, reply, fit
    except MemoryError:
        return job_id, _OOM_REPLY, False
    except BaseException as exc:  # the runner's own failure: still one JSON document
        return job_id, _encode(_error_reply(exc, None), None), True


def _isolate_streams() -> tuple[io.BufferedReader, int]:
    """Keep private duplicates of fd 0 (jobs) and fd 1 (results); then point fd 0 at
    ``/dev/null`` and fd 1 at fd 2 (the log). ``os.dup`` makes them non-inheritable, so
    nothing the strategy starts holds them either."""
    jobs = os.fdopen(os.dup(0), "rb")
    result_fd = os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return jobs, result_fd


def _warm_up() -> bool:
    """Import what every job needs before the first job arrives, then freeze the heap.

    The import (~0.4 s: pandas) overlaps the parent writing the first job's candles, and
    :func:`gc.freeze` takes those long-lived objects out of the collector's sight, so the
    collection after each job takes microseconds instead of ~10 ms. False when the import
    fails: the first job fails the same way and says why, and the runner is not reused.
    """
    try:
        import shared.strategy  # noqa: F401  (numpy and pandas with it)
    except BaseException:
        return False
    gc.freeze()
    return True


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        stat = os.fstat(fd)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _left_nothing_running() -> bool:
    """Whether the job left no thread and no child process: either would run on, and print,
    into the next job."""
    if threading.active_count() > 1:
        return False
    try:
        os.waitpid(-1, os.WNOHANG)  # raises when there is no child at all, zombies included
    except ChildProcessError:
        return True
    return False


def _flush_stdio() -> None:
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except BaseException:  # a strategy that closed or replaced the streams loses its log
        pass


def _reset(home: str, environ: Mapping[str, str]) -> None:
    """Undo what a job may have changed that the next one would see — its module, the working
    directory, the environment — and free the job's garbage (modules are reference cycles)."""
    for name in [name for name in sys.modules if name.startswith(_USER_MODULE_PREFIX)]:
        del sys.modules[name]
    with contextlib.suppress(OSError):
        os.chdir(home)
    if os.environ != environ:
        os.environ.clear()
        os.environ.update(environ)
    gc.collect()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_result(fd: int, job_id: str | None, reusable: bool, reply: bytes) -> None:
    """``reply`` with ``id`` and ``reusable`` spliced in front, as one line. Spliced, not
    re-encoded: a reply can be tens of MiB of signals."""
    head = json.dumps({"id": job_id, "reusable": reusable, "protocol": PROTOCOL})[:-1] + ", "
    _write_all(fd, head.encode())
    _write_all(fd, memoryview(reply)[1:])
    _write_all(fd, b"\n")


def serve() -> NoReturn:
    """Serve the jobs on stdin one by one (see the module docstring); exit 0 when it ends.

    Exits with ``os._exit``, so neither a strategy's atexit hooks nor its leftover threads can
    change or delay the end.
    """
    jobs, result_fd = _isolate_streams()
    for name, value in RUNTIME_ENV.items():
        os.environ.setdefault(name, value)
    healthy = _warm_up()
    home, environ, log_pipe = os.getcwd(), dict(os.environ), _identity(2)
    runner = os.getpid()
    while line := jobs.readline():
        job_id, reply, fit = _run(line, jobs)
        if os.getpid() != runner:
            # A child the strategy forked, returning or raising through the runner's code: it
            # must not answer (its reply would race the runner's) nor read the next job.
            os._exit(70)
        _flush_stdio()
        reusable = healthy and fit and _left_nothing_running() and _identity(2) == log_pipe
        if job_id is not None:
            with contextlib.suppress(OSError):  # fd 2 closed: then reusable is false too
                _write_all(2, log_end_marker(job_id))
        try:
            _write_result(result_fd, job_id, reusable, reply)
        except OSError:  # the parent is gone
            os._exit(1)
        del reply
        _reset(home, environ)
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m shared.sandbox.runner --serve``; anything else is a usage error."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--serve"]:
        sys.stderr.write(
            "usage: python -m shared.sandbox.runner --serve\n"
            "  runs the JSON jobs on stdin, one per line (see shared/sandbox/runner.py)\n"
        )
        raise SystemExit(2)
    serve()


if __name__ == "__main__":
    main()
