"""``stratorch audit``: run a strategy on its whole history and on prefixes, and report every
bar whose signal changes when later bars are removed (look-ahead).

The strategy is the user's code, so it runs in the sandbox like a backtest's: one warm
session, so only the first call pays the start-up. :func:`audit` is the engine (the CLI and
the Python API call it); which prefixes are cut and how runs are compared is
:mod:`shared.strategy.audit`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from shared.candles import ParquetCandleStore
from shared.candles.frame import Span, SymbolCandles
from shared.errors import NoDataError, RequestRejected, StratorchError
from shared.messages import BacktestRequest
from shared.ports import CandleSource
from shared.sandbox import Sandbox
from shared.strategy import signal_records
from shared.strategy.audit import SymbolAudit, changed_bars, cut_points
from stratorch.embedded import prepare

__all__ = ["AuditReport", "audit", "command", "show"]

#: Why a per-bar strategy is not audited.
PER_BAR_NOTE = (
    "the strategy runs per bar through decide(), which sees only the bars up to the current "
    "one: it cannot look ahead, so no prefixes were run"
)


@dataclass
class AuditReport:
    """What :func:`audit` found: one :class:`SymbolAudit` per symbol."""

    symbols: list[SymbolAudit] = field(default_factory=list)
    #: Wall time of the audit (loading candles and every sandbox call).
    elapsed_s: float = 0.0
    #: Set when the strategy was not audited, saying why (a per-bar strategy).
    note: str = ""

    @property
    def clean(self) -> bool:
        return all(s.clean for s in self.symbols)

    @property
    def exit_code(self) -> int:
        """``stratorch audit``'s: 1 when a symbol shows look-ahead, else 0."""
        return 0 if self.clean else 1


async def audit(
    request: BacktestRequest,
    candles: CandleSource,
    sandbox: Sandbox,
    *,
    spread: int = 12,
    at_signals: int = 12,
) -> AuditReport:
    """Audit ``request``'s strategy for look-ahead on its symbols, interval and range.

    Each symbol's candles (with the strategy's warm-up bars) are run whole, then cut after
    ``spread`` bars spread evenly over the range and after up to ``at_signals`` of the bars
    where the whole run gives a signal (see :func:`shared.strategy.audit.cut_points`); every
    bar of each prefix is compared with the whole run. ``sandbox`` must be open.

    :raises shared.errors.StratorchError: the strategy does not load or fails (as in a
        backtest), or a symbol has no candles in the range.
    """
    started = time.perf_counter()
    code = request.strategy.ref()
    if code.source is None and code.source_sha256 is not None:
        raise RequestRejected(
            "the audit runs uploaded code sent inline: give the strategy's 'source', "
            "not its 'source_sha256'"
        )
    session = f"audit-{request.id}"
    info = await sandbox.describe(code, list(request.symbols), session=session)
    if not info.vectorized:
        return AuditReport(elapsed_s=time.perf_counter() - started, note=PER_BAR_NOTE)
    window = Span(request.interval, request.start_ms, request.end_ms, info.lookback)
    report = AuditReport()
    for symbol in request.symbols:
        frame = await candles.load(symbol, window)
        first = int(frame["open_time"].searchsorted(request.start_ms))
        if first >= len(frame):
            raise NoDataError(
                f"no {request.interval} candles for {symbol} in the requested range", symbol=symbol
            )
        whole = {symbol: SymbolCandles(frame, first)}
        found_in_whole = await sandbox.signals(
            code, whole, interval=request.interval, session=session
        )
        full = signal_records(found_in_whole[symbol])
        times = frame["open_time"].to_numpy()
        signal_bars = times.searchsorted(found_in_whole[symbol]["t"]).tolist()
        found = SymbolAudit(symbol, bars=len(frame), first=first)
        seen: set[int] = set()
        for cut in cut_points(len(frame), first, signal_bars, spread=spread, at_signals=at_signals):
            prefix = SymbolCandles(frame.iloc[: cut + 1], first)
            found_in_prefix = await sandbox.signals(
                code, {symbol: prefix}, interval=request.interval, session=session
            )
            truncated = signal_records(found_in_prefix[symbol])
            found.cuts.append(int(times[cut]))
            for change in changed_bars(full, truncated, int(times[cut])):
                if change.t not in seen:  # the shortest prefix showing it
                    seen.add(change.t)
                    found.changes.append(change)
        found.changes.sort(key=lambda c: c.t)
        report.symbols.append(found)
    report.elapsed_s = time.perf_counter() - started
    return report


def show(report: AuditReport, console: Console, *, examples: int = 5) -> None:
    """The report as ``stratorch audit`` prints it: per symbol clean, or its changed bars
    (the first named, a few examples), what was sampled, and the time it took."""
    if report.note:
        console.print(f"[green]clean[/]: {report.note} ({report.elapsed_s:.2f} s)")
        return
    for s in report.symbols:
        span = f"{_utc(s.cuts[0])} … {_utc(s.cuts[-1])}" if s.cuts else "none"
        sampled = f"{len(s.cuts)} prefixes of its {s.bars - s.first:,} bars, ending {span}"
        if s.clean:
            console.print(f"[bold]{s.symbol}[/]: [green]clean[/] ({sampled})")
            continue
        first = s.changes[0]
        console.print(
            f"[bold]{s.symbol}[/]: [red]look-ahead[/]: {len(s.changes)} bar(s) change when later"
            f" bars are removed, the first {_utc(first.t)} ({sampled})"
        )
        table = Table(show_edge=False)
        for column in ("bar", "whole history", "without later bars", "prefix ends"):
            table.add_column(column)
        for change in s.changes[:examples]:
            table.add_row(_utc(change.t), change.full, change.truncated, _utc(change.cut))
        console.print(table)
    verdict = "[green]no look-ahead found[/]" if report.clean else "[red]look-ahead found[/]"
    console.print(f"{verdict} in {report.elapsed_s:.2f} s")


def _utc(ms: int) -> str:
    return f"{pd.Timestamp(ms, unit='ms'):%Y-%m-%d %H:%M}"


def command(request_path: Path, candles: Path, sandbox: Sandbox) -> int:
    """``stratorch audit``: print the report; 0 clean, 1 look-ahead, 2 when the request
    cannot be read or the strategy cannot be audited (it does not load, fails, no data)."""
    errors = Console(stderr=True)
    try:
        received = prepare(request_path.read_bytes())
        if received.problem is not None:
            raise received.problem
        assert received.request is not None
        report = asyncio.run(_audit_in(received.request, ParquetCandleStore(candles), sandbox))
    except OSError as exc:
        errors.print(f"[red]audit failed:[/] cannot read the request {request_path}: {exc}")
        return 2
    except StratorchError as exc:
        errors.print(f"[red]audit failed:[/] {exc.kind}: ", end="")
        errors.print(str(exc), markup=False)
        if exc.log_tail:
            errors.print(exc.log_tail, style="dim", markup=False)
        return 2
    show(report, Console(soft_wrap=True))  # a line per symbol: grep-able
    return report.exit_code


async def _audit_in(
    request: BacktestRequest, candles: CandleSource, sandbox: Sandbox
) -> AuditReport:
    async with sandbox:
        return await audit(request, candles, sandbox)
