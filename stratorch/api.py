"""``stratorch.backtest``: a backtest from Python (a script or a notebook), no servers.

The same engine as ``stratorch run``: the call builds a :class:`BacktestRequest` from its
arguments, sends it through the same handlers on the local candle store, and wraps the
:class:`BacktestResult` in a :class:`Backtest` whose metrics, trades and equity are pandas
objects.

Errors are raised, as backtesting.py users expect from ``Backtest.run()``: an invalid request
(a bad field, an unknown strategy or parameter) raises :class:`BacktestRejected`, a
``ValueError`` naming each field; a backtest that fails while it runs (the strategy raised,
no candles, a timeout) raises :class:`BacktestFailed` with the strategy's last output lines.
Both carry the :class:`Backtest` (``.backtest``) with its status and errors.
"""

from __future__ import annotations
import __future__

import ast
import asyncio
import builtins
import concurrent.futures
import functools
import inspect
import io
import json
import linecache
import logging
import sys
import textwrap
from collections.abc import Callable, Coroutine, Mapping
from datetime import date
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import pandas as pd
import structlog
from rich.console import Console

from shared.errors import FieldError, StratorchError
from shared.messages import BacktestRequest, BacktestResult, ErrorInfo, Trade
from shared.sandbox.factory import new_sandbox
from shared.settings import Settings
from stratorch.audit import AuditReport, show
from stratorch.audit import audit as audit_strategy
from stratorch.embedded import EventCallback, prepare, run_to_end
from stratorch.paths import SAMPLE_STORE

__all__ = [
    "Backtest",
    "BacktestFailed",
    "BacktestRejected",
    "LookAheadFound",
    "backtest",
    "backtest_async",
]

Strategy = str | Mapping[str, Any] | type
_T = TypeVar("_T")
_P = ParamSpec("_P")


class BacktestRejected(ValueError):
    """The request is invalid (``fields`` holds each invalid field: its path and what is
    wrong; the message names them all), or it cannot run here (``sandbox="docker"`` with no
    dockerd in reach), as ``stratorch run`` rejects it."""

    def __init__(self, backtest: Backtest) -> None:
        self.backtest = backtest
        self.fields: list[FieldError] = [
            FieldError(tuple(f.loc), f.message) for e in backtest.errors for f in e.fields
        ]
        super().__init__(f"backtest rejected: {'; '.join(e.message for e in backtest.errors)}")


class BacktestFailed(RuntimeError):
    """The backtest ran and failed (or was cancelled): the message gives each error and the
    strategy's last output lines; ``backtest`` has them too, as ``errors``."""

    def __init__(self, backtest: Backtest) -> None:
        self.backtest = backtest
        super().__init__(f"backtest {backtest.id} {backtest.status}: {_errors(backtest.errors)}")


class LookAheadFound(ValueError):
    """``audit=True`` found look-ahead: the message is ``stratorch audit``'s report (each
    symbol's changed bars, the first named); ``audit`` holds it
    (:class:`stratorch.audit.AuditReport`). Nothing was backtested."""

    def __init__(self, audit: AuditReport) -> None:
        self.audit = audit
        text = io.StringIO()
        show(audit, Console(file=text, width=100, color_system=None))
        super().__init__(f"look-ahead found, so no backtest was run:\n{text.getvalue().rstrip()}")


class Backtest:
    """A backtest's result, as pandas objects. ``result`` is the :class:`BacktestResult`
    itself (what ``stratorch run --out`` writes)."""

    def __init__(
        self,
        result: BacktestResult,
        request: BacktestRequest | None,
        candles: Path | None,
        *,
        audit: AuditReport | None = None,
    ) -> None:
        self.result = result
        self.request = request
        #: The candle store the report draws prices from (none: no price lines).
        self.candles = candles
        #: The clean look-ahead audit that ran first (``audit=True``), else ``None``.
        self.audit = audit

    @property
    def id(self) -> str:
        return self.result.backtest_id

    @property
    def status(self) -> str:
        """``completed``, ``failed``, ``rejected`` or ``cancelled``."""
        return self.result.status

    @property
    def errors(self) -> list[ErrorInfo]:
        return self.result.errors

    @property
    def metrics(self) -> pd.Series:
        """The portfolio's metrics by name (``sharpe``, ``max_drawdown``, ...); empty unless
        completed. Undefined ones are ``None``."""
        if self.result.metrics is None:
            return pd.Series(dtype=object, name="metrics")
        return pd.Series(self.result.metrics.model_dump(), dtype=object, name="metrics")

    @property
    def per_symbol(self) -> pd.DataFrame:
        """One row per symbol (the index), a column per symbol metric."""
        rows = {symbol: m.model_dump() for symbol, m in self.result.per_symbol.items()}
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = "symbol"
        return frame

    @property
    def trades(self) -> pd.DataFrame:
        """One row per round trip, in the result's order; ``entry_time`` and ``exit_time``
        are UTC datetimes (bar open times)."""
        frame = pd.DataFrame(
            [t.model_dump() for t in self.result.trades], columns=list(Trade.model_fields)
        )
        for column in ("entry_time", "exit_time"):
            frame[column] = pd.to_datetime(frame[column].astype("int64"), unit="ms", utc=True)
        return frame

    @property
    def equity(self) -> pd.Series:
        """Equity at each bar's close, indexed by the bar's open time (UTC), as
        ``equity_curve`` holds it (at most 10,000 points)."""
        times = [t for t, _ in self.result.equity_curve]
        index = pd.DatetimeIndex(pd.to_datetime(times, unit="ms", utc=True), name="time")
        values = [e for _, e in self.result.equity_curve]
        return pd.Series(values, index=index, dtype="float64", name="equity")

    def to_json(self, *, indent: int | None = None) -> str:
        """The :class:`BacktestResult` as JSON, as ``stratorch run --out`` writes it."""
        return self.result.model_dump_json(indent=indent)

    def report(self, path: str | Path) -> Path:
        """Write the HTML report (as ``stratorch run --report`` does) to ``path``."""
        from shared import report  # here: plotly is imported only for a report

        page = _run(report.build(self.result, _candle_store(self.candles), self.request))
        target = Path(path)
        target.write_text(page, encoding="utf-8")
        return target

    def __repr__(self) -> str:
        """The summary table ``stratorch run`` prints."""
        from stratorch.cli import _summary  # see backtest_async

        text = io.StringIO()
        console = Console(file=text, width=100, color_system=None)
        _summary(console, self.result, self.candles_from)
        return text.getvalue().rstrip()

    @property
    def candles_from(self) -> Path | str | None:
        """Where the candles came from, as the summary says it."""
        return self.candles


async def backtest_async(
    strategy: Strategy,
    symbols: list[str],
    interval: str = "1h",
    start: str | date | None = None,
    end: str | date | None = None,
    params: Mapping[str, Any] | None = None,
    *,
    candles: str | Path | None = None,
    state: str | Path | None = None,
    sandbox: Literal["process", "docker"] | None = None,
    on_event: EventCallback | None = None,
    audit: bool = False,
    **request_fields: Any,
) -> Backtest:
    """Run a backtest in this process: ``stratorch.backtest(...)`` returns it when it has
    finished, ``await stratorch.backtest_async(...)`` runs it on the caller's event loop.

    Inside a running event loop (a Jupyter cell) ``backtest`` runs it on a thread of its own
    and waits for it (blocking the loop meanwhile, as any long call in a cell does).

    :param strategy: a builtin's name (``"sma_cross"``), a strategy spec as a request holds
        it (``{"module": ..., "class": ...}``), or a ``BaseStrategy`` subclass. A class is
        sent as source: its own code, with an import for each module-level name it uses, so
        it may use only what a strategy may import (the standard library, numpy, pandas,
        ``shared.strategy``), and whatever else of its file it needs must be in the class.
    :param params: the strategy's parameters (on top of any the spec gives).
    :param candles: the local candle store (``stratorch run --candles``); default
        ``STRATORCH_CANDLES``, else the bundled sample.
    :param state: keep the run's plan, batches, WAL and result here (``--state``).
    :param sandbox: ``process`` or ``docker`` (``--sandbox``); default ``STRATORCH_SANDBOX``.
    :param on_event: called with each progress event (``BacktestEvent``: units done / total).
    :param audit: first run the look-ahead audit of ``stratorch audit`` on the same candles and
        sandbox; look-ahead raises :class:`LookAheadFound` and nothing is backtested, a clean
        audit's report is the result's ``audit``.
    :param request_fields: any other :class:`BacktestRequest` field (``initial_cash``,
        ``fee_rate``, ``portfolio``, ``id``, ...), with its defaults and validation.
    :raises BacktestRejected: the request is invalid.
    :raises BacktestFailed: the backtest failed or was cancelled (or, with ``audit``, the
        strategy failed in the audit).
    :raises LookAheadFound: ``audit`` found look-ahead.
    """
    # Imported here: `python -m stratorch.cli` imports this package (and so this module)
    # before it runs stratorch.cli as __main__, which must not be imported before that.
    from stratorch.cli import run_local

    settings = Settings.from_env()
    if not structlog.is_configured():  # a notebook shows warnings, not every step's info
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    store = local_candles(candles, settings)
    raw = request_json(
        strategy, params, symbols=symbols, interval=interval, start=start, end=end, **request_fields
    )
    received = prepare(raw)
    if received.problem is not None:
        error = ErrorInfo.from_error(received.problem)
        result = BacktestResult(backtest_id=received.backtest_id, status="rejected", errors=[error])
        raise BacktestRejected(Backtest(result, None, store))
    assert received.request is not None
    found = await audit_first(received.request, store, sandbox, settings) if audit else None
    where = Path(state) if state is not None else None
    result = await run_local(raw, settings, store, sandbox=sandbox, state=where, on_event=on_event)
    return finished(Backtest(result, received.request, store, audit=found))


def request_json(strategy: Strategy, params: Mapping[str, Any] | None, **fields: Any) -> bytes:
    """The request :func:`backtest`'s arguments make (``fields``: ``symbols``, ``interval``,
    ... as it names them), as JSON: sent as a request file or a broker message is, so it gets
    the same validation and the same result as ``stratorch run`` on that file
    (:func:`stratorch.connect`'s client sends it to the stack)."""
    request = {"strategy": _spec(strategy, params)} | fields
    return json.dumps({k: v for k, v in request.items() if v is not None}, default=_json).encode()


def local_candles(candles: str | Path | None, settings: Settings) -> Path:
    """The local candle store: ``candles``, else ``STRATORCH_CANDLES``, else the sample."""
    return Path(candles) if candles is not None else settings.candles or SAMPLE_STORE


def finished(done: Backtest) -> Backtest:
    """``done`` if it completed; else raise what its status means."""
    if done.status == "rejected":
        raise BacktestRejected(done)
    if done.status != "completed":
        raise BacktestFailed(done)
    return done


async def audit_first(
    request: BacktestRequest,
    candles: Path,
    sandbox: Literal["process", "docker"] | None,
    settings: Settings,
) -> AuditReport:
    """``audit=True``: :func:`stratorch.audit.audit` of ``request`` on the local ``candles``
    in ``sandbox``; its report when clean.

    :raises LookAheadFound: it found look-ahead.
    :raises BacktestRejected: the strategy cannot be audited (``source_sha256``).
    :raises BacktestFailed: the strategy failed, or a symbol has no candles here.
    """
    box = new_sandbox(settings, sandbox)
    try:
        async with box:
            report = await audit_strategy(request, _candle_store(candles), box)
    except StratorchError as exc:
        status: Literal["rejected", "failed"] = "rejected" if exc.kind == "rejected" else "failed"
        result = BacktestResult(
            backtest_id=request.id or "audit", status=status, errors=[ErrorInfo.from_error(exc)]
        )
        done = Backtest(result, request, candles)
        raise (BacktestRejected(done) if status == "rejected" else BacktestFailed(done)) from exc
    if not report.clean:
        raise LookAheadFound(report)
    return report


def _blocking(function: Callable[_P, Coroutine[Any, Any, _T]], name: str) -> Callable[_P, _T]:
    """``function`` as a plain function named ``name``: a call runs the coroutine to its end
    (:func:`_run`) and returns what it returns; docs and signature are ``function``'s."""

    @functools.wraps(function)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return _run(function(*args, **kwargs))

    call.__name__ = call.__qualname__ = name
    return call


backtest = _blocking(backtest_async, "backtest")


def _run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` to its end: here, or, when this thread already runs an event loop
    (Jupyter), on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run_to_end(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stratorch") as pool:
        return pool.submit(run_to_end, coroutine).result()


def _candle_store(path: Path | None) -> Any:
    from shared.candles import ParquetCandleStore

    return None if path is None else ParquetCandleStore(path)


def _errors(errors: list[ErrorInfo]) -> str:
    lines = []
    for error in errors:
        where = "".join(f" {x}" for x in (error.symbol, error.unit_id) if x)
        lines.append(f"{error.kind}{where}: {error.message}")
        if error.log_tail:
            lines.append(textwrap.indent(error.log_tail.rstrip(), "  | "))
    return "\n".join(lines) or "no error given"


def _json(value: Any) -> Any:
    """What ``json`` cannot write itself: times as ISO 8601, numpy scalars as numbers."""
    if isinstance(value, date):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON: {value!r}")


def _spec(strategy: Strategy, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``strategy`` as a request's ``strategy`` field, with ``params`` added."""
    if isinstance(strategy, str):
        spec: dict[str, Any] = {"builtin": strategy}
    elif isinstance(strategy, type):
        spec = {"source": _source_of(strategy), "class": strategy.__name__}
    else:
        spec = dict(strategy)
    if params:
        spec["params"] = {**spec.get("params", {}), **params}
    return spec


def _source_of(cls: type) -> str:
    """Self-contained source of the strategy class ``cls``: an import line for each
    module-level name its code uses (a module, or a class or function importable from one),
    an assignment for each constant, then the class.

    :raises TypeError: its source cannot be found (typed into the interactive interpreter),
        or it uses a name of its file that cannot be imported (a helper defined beside it).
    """
    code = textwrap.dedent(_class_source(cls))
    namespace = vars(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else {}
    header = [_definition(n, namespace[n], cls) for n in _free_names(code) if n in namespace]
    if namespace.get("annotations") is __future__.annotations:  # its annotations stay text
        header.insert(0, "from __future__ import annotations")
    return "\n".join([*header, "", code])


def _class_source(cls: type) -> str:
    """The class statement of ``cls``, decorators included. ``inspect`` finds it through its
    module's file; a notebook's ``__main__`` has none (before Python 3.13), so then it is
    found through a method's code, in the cell's source IPython keeps in ``linecache``."""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        pass
    for value in vars(cls).values():
        code = getattr(value, "__code__", None)
        if code is None:
            continue
        lines = linecache.getlines(code.co_filename)
        for node in ast.walk(ast.parse("".join(lines))):
            if (
                isinstance(node, ast.ClassDef)
                and node.name == cls.__name__
                and node.lineno <= code.co_firstlineno <= (node.end_lineno or 0)
            ):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                return "".join(lines[first - 1 : node.end_lineno])
    raise TypeError(
        f"cannot find the source of {cls.__name__}: classes typed into the interactive"
        " interpreter have none. Put the class in a file and import it (or define it in"
        ' Jupyter/IPython, which keep their cells\' source), or pass {"source": "<code>",'
        f' "class": "{cls.__name__}"}} as the strategy'
    )


def _free_names(code: str) -> list[str]:
    """Names the class's code reads but never binds itself, in order of first use."""
    tree = ast.parse(code)
    bound = {"__class__"}
    read: dict[str, None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                read.setdefault(node.id)
            else:
                bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            bound.add(node.name)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    return [name for name in read if name not in bound and not hasattr(builtins, name)]


def _definition(name: str, value: Any, cls: type) -> str:
    """The line that defines ``name`` as ``value`` in uploaded source."""
    if inspect.ismodule(value):
        return f"import {value.__name__} as {name}"
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    if module and qualname and module != "__main__" and module != cls.__module__:
        return f"from {module} import {qualname} as {name}"
    try:
        if ast.literal_eval(repr(value)) == value:
            return f"{name} = {value!r}"
    except (ValueError, SyntaxError):
        pass
    raise TypeError(
        f"{cls.__name__} uses {name!r}, which is defined beside it and cannot be sent with it"
        f" ({type(value).__name__}): move it into the class (a method or class attribute),"
        " or into a module the strategy imports by name ({'module': ..., 'class': ...})"
    )
