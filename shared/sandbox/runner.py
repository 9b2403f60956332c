"""The program that runs a strategy inside the sandbox: ``python -m shared.sandbox.runner``.

It runs wherever untrusted code runs (a child process, a container), so it imports only the
standard library, numpy, pandas and :mod:`shared.strategy` — and numpy only after it has
pinned BLAS to one thread.

Protocol
--------
stdin carries one JSON job::

    {"op": "describe", "strategy": {<loader spec with "params">}, "symbols": [...]}
    {"op": "signals", "strategy": {...}, "interval": "1h", "candles_path": "/.../candles.npz"}

The candles come in an ``.npz`` file written by :func:`write_candles` (plain arrays, read
with ``allow_pickle=False``: never pickle across the boundary). The result is exactly one
JSON document on the original fd 1::

    {"ok": true, "lookback": 51, "units": [["BTCUSDT"], ...]}           # describe
    {"ok": true, "signals": {"BTCUSDT": [{"t": ..., "signal": ...}, ...]}}  # signals
    {"ok": false, "error": {"kind": ..., "message": ..., "symbol": ..., "traceback": ...}}

Everything the strategy writes — ``print``, warnings, C code writing to fd 1 or 2 — goes to
fd 2, the log stream: before anything else runs, fd 1 is duplicated privately for the result
and then pointed at fd 2, so no output of the strategy can corrupt the result.

Error kinds: ``rejected`` (the code does not load: ``ComponentError``), ``invalid_output``
(``StrategyOutputError``, or a result that is not JSON-serializable), ``oom``
(``MemoryError``) and ``crashed`` (anything else the strategy raised, at import too, and
``sys.exit``). ``traceback`` holds the frames of the strategy's code, not the runner's.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CANDLE_COLUMNS", "THREAD_ENV", "main", "read_candles", "write_candles"]

#: Pins numpy's BLAS and OpenMP pools to one thread: a sandbox gets one core's worth of work,
#: and N idle BLAS threads per child only add memory and scheduling noise.
THREAD_ENV: Mapping[str, str] = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

#: Column -> dtype of the canonical candle frame (``shared.candles.frame.CANDLE_COLUMNS``,
#: repeated here because that module's package is not part of the sandbox image; a unit test
#: keeps the two equal).
CANDLE_COLUMNS: Mapping[str, str] = {
    "open_time": "int64",
    "open": "float64",
    "high": "float64",
    "low": "float64",
    "close": "float64",
    "volume": "float64",
    "close_time": "int64",
    "quote_volume": "float64",
    "trades": "int64",
    "taker_buy_base": "float64",
    "taker_buy_quote": "float64",
}

_SHARED_DIR = str(Path(__file__).resolve().parent.parent)
# Written without allocating when even formatting an error runs out of memory.
_OOM_REPLY = (
    b'{"ok": false, "error": {"kind": "oom", "message": "MemoryError", '
    b'"symbol": null, "traceback": ""}}'
)
_MAX_TRACEBACK_CHARS = 8192


# -- candles on the wire --------------------------------------------------------------------


def write_candles(
    path: str | os.PathLike[str], candles: Mapping[str, tuple[pd.DataFrame, int]]
) -> None:
    """Write each symbol's canonical frame and ``first_sim`` to an uncompressed ``.npz``.

    Symbols are stored as a unicode array and the frames column by column under their index
    (``"0.close"``), so no name from a request ever becomes a file name in the archive.
    Raises ``ValueError`` when a frame lacks a canonical column or ``first_sim`` is outside
    ``0..len(frame)`` — the caller's mistake, not the strategy's.
    """
    import numpy as np

    arrays: dict[str, Any] = {"symbols": np.array(list(candles), dtype=str)}
    for i, (symbol, (frame, first_sim)) in enumerate(candles.items()):
        missing = [name for name in CANDLE_COLUMNS if name not in frame.columns]
        if missing:
            raise ValueError(f"candles for {symbol} lack the canonical columns {missing}")
        if isinstance(first_sim, bool) or not 0 <= int(first_sim) <= len(frame):
            raise ValueError(
                f"first_sim for {symbol} must be in 0..{len(frame)} (rows), got {first_sim!r}"
            )
        arrays[f"{i}.first_sim"] = np.array(int(first_sim), dtype=np.int64)
        for name, dtype in CANDLE_COLUMNS.items():
            arrays[f"{i}.{name}"] = frame[name].to_numpy(dtype=dtype)
    np.savez(path, **arrays)


def read_candles(path: str | os.PathLike[str]) -> Iterator[tuple[str, pd.DataFrame, int]]:
    """Yield ``(symbol, frame, first_sim)`` from a file of :func:`write_candles`, one at a time."""
    import numpy as np
    import pandas as pd

    with np.load(path, allow_pickle=False) as archive:
        for i, symbol in enumerate(archive["symbols"].tolist()):
            frame = pd.DataFrame({name: archive[f"{i}.{name}"] for name in CANDLE_COLUMNS})
            yield str(symbol), frame, int(archive[f"{i}.first_sim"])


# -- the job ----------------------------------------------------------------------------------


class _Failure(Exception):
    """A failure to report as ``{"ok": false}`` with this ``kind`` and ``message``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class _Job:
    """Runs one job; remembers the symbol in progress so a failure can name it."""

    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job = job
        self.symbol: str | None = None

    def run(self) -> dict[str, Any]:
        op = self.job.get("op")
        if op == "describe":
            return self._describe()
        if op == "signals":
            return self._signals()
        raise ValueError(f"unknown op {op!r}")  # a runner bug, reported as crashed

    def _load(self) -> Any:
        from shared.strategy import BUILTIN_STRATEGIES, load_component

        return load_component(self.job["strategy"], registry=BUILTIN_STRATEGIES)

    def _describe(self) -> dict[str, Any]:
        strategy = self._load()
        lookback = strategy.get_required_lookback()
        units = strategy.work_units(list(self.job["symbols"]))
        return {"ok": True, "lookback": lookback, "units": units}

    def _signals(self) -> dict[str, Any]:
        from shared.strategy import compute_signals

        strategy = self._load()
        interval = self.job["interval"]
        signals: dict[str, Any] = {}
        for symbol, frame, first_sim in read_candles(self.job["candles_path"]):
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


def _error_reply(exc: BaseException, symbol: str | None) -> dict[str, Any]:
    from shared.strategy import ComponentError, StrategyOutputError

    tb = ""
    if isinstance(exc, _Failure):
        kind, message = exc.kind, exc.message
    elif isinstance(exc, ComponentError) and _raised_by_strategy(cause := exc.__cause__):
        # The spec was fine but the strategy's own code failed while loading: a crash.
        kind, tb = "crashed", _user_traceback(cause)
        if isinstance(cause, SystemExit):
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
    else:
        kind, tb = "crashed", _user_traceback(exc)
        message = _describe_exception(exc)
    return {
        "ok": False,
        "error": {"kind": kind, "message": message, "symbol": symbol, "traceback": tb},
    }


# -- entry point ------------------------------------------------------------------------------


def _isolate_stdout() -> int:
    """Keep a private duplicate of fd 1 for the result; point fd 1 at fd 2 (the log)."""
    result_fd = os.dup(1)  # not inherited by anything the strategy starts
    os.dup2(2, 1)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return result_fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> None:
    """Run the job on stdin, write its result to the original fd 1 and exit 0.

    Exits with ``os._exit`` right after the result is written, so neither the strategy's
    atexit hooks nor its leftover threads can change or delay the outcome.
    """
    result_fd = _isolate_stdout()
    for name, value in THREAD_ENV.items():
        os.environ.setdefault(name, value)
    try:
        try:
            job = json.loads(sys.stdin.buffer.read())
        except BaseException as exc:
            raise _Failure("crashed", f"the sandbox received a malformed job: {exc}") from exc
        runner = _Job(job)
        try:
            data = _encode(runner.run(), job.get("op"))
        except BaseException as exc:  # the strategy's failure, whatever it is
            if isinstance(exc, MemoryError):
                traceback.clear_frames(exc.__traceback__)  # free what the strategy held
            data = _encode(_error_reply(exc, runner.symbol), None)
    except MemoryError:
        data = _OOM_REPLY
    except BaseException as exc:  # the runner's own failure: still one JSON document
        data = _encode(_error_reply(exc, None), None)
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except BaseException:  # a strategy that closed or replaced the streams loses its log
        pass
    _write_all(result_fd, data)
    os.close(result_fd)
    os._exit(0)


if __name__ == "__main__":
    main()
