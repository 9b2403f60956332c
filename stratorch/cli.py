"""The ``stratorch`` command.

``stratorch run REQUEST.json`` backtests in this one process (the embedded default);
``stratorch ingest binance FILE...`` loads Binance kline files into a local candle store
(``--candles DIR``) or MongoDB (``--mongo URI``); ``stratorch audit REQUEST.json`` looks for
look-ahead in the strategy's ``signals(df)``.
Exit codes of ``run``: 0 completed, 1 failed or cancelled, 2 rejected or a usage error; of
``ingest``: 0 done, 1 the database failed, 2 a bad file or a usage error; of ``audit``: 0 clean,
1 look-ahead found, 2 a bad request or a strategy that fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.candles import ParquetCandleStore, Written, ingest_binance
from shared.candles.binance import ParsedKlines, parse_binance
from shared.errors import IngestError
from shared.logging import configure
from shared.messages import BacktestEvent, BacktestResult, ErrorInfo, new_backtest_id
from shared.ports import Ports
from shared.sandbox.factory import new_sandbox
from shared.settings import Settings, SettingsError
from shared.store import FileStore
from stratorch.embedded import EventCallback, prepare, run_backtest, run_to_end
from stratorch.paths import SAMPLE_STORE

EXIT_CODES = {"completed": 0, "failed": 1, "cancelled": 1, "rejected": 2}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"stratorch: {exc}", file=sys.stderr)
        return 2
    # --quiet: only errors (a bug) may still reach stderr; notices such as the process
    # sandbox's "not a security boundary" do not.
    configure("error" if getattr(args, "quiet", False) else settings.log_level)
    code: int = args.command(args, settings)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stratorch", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a backtest in this process (no servers)")
    run.add_argument("request", type=Path, metavar="REQUEST.json", help="a BacktestRequest")
    run.add_argument(
        "--candles", type=Path, metavar="DIR", help="local candle store (default: bundled sample)"
    )
    run.add_argument("--store", dest="candles", type=Path, action=_Renamed, new="--candles")
    run.add_argument("--sandbox", choices=["process", "docker"], help="where strategy code runs")
    run.add_argument("--out", type=Path, metavar="RESULT.json", help="write the BacktestResult")
    run.add_argument("--state", type=Path, help="keep plan, batches, WAL and result here")
    run.add_argument("--report", type=Path, metavar="FILE.html", help="write an HTML report")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    run.set_defaults(command=_run)

    audit = commands.add_parser("audit", help="look for look-ahead in a strategy's signals")
    audit.add_argument("request", type=Path, metavar="REQUEST.json", help="a BacktestRequest")
    audit.add_argument("--candles", type=Path, metavar="DIR", help="local candle store")
    audit.add_argument("--sandbox", choices=["process", "docker"], help="where strategy code runs")
    audit.set_defaults(command=_audit)

    ingest = commands.add_parser("ingest", help="load candles into a candle store")
    sources = ingest.add_subparsers(required=True, metavar="SOURCE")
    binance = sources.add_parser("binance", help="Binance kline CSV files or their .zip archives")
    binance.add_argument("files", type=Path, nargs="+", metavar="FILE")
    binance.add_argument("--symbol", required=True, help="e.g. BTCUSDT")
    binance.add_argument("--interval", required=True, help="the files' interval, e.g. 1m")
    destination = binance.add_mutually_exclusive_group(required=True)
    destination.add_argument(
        "--candles", type=Path, metavar="DIR", help="local candle store directory"
    )
    destination.add_argument("--store", dest="candles", type=Path, action=_Renamed, new="--candles")
    destination.add_argument(
        "--mongo", metavar="URI", help="MongoDB connection string (a user that may write)"
    )
    binance.add_argument(
        "--mongo-db", metavar="NAME", help="database with --mongo (default: STRATORCH_MONGO_DB)"
    )
    binance.set_defaults(command=_ingest)
    return parser


class _Renamed(argparse.Action):
    """An option's old name, accepted for one more release: it sets the new option's value
    and says on stderr that it is renamed (hidden from ``--help``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        _renamed(option_string or self.option_strings[0], self.new)
        setattr(namespace, self.dest, values)


def _renamed(old: str, new: str) -> None:
    """Say on stderr, even with ``--quiet``, that ``old`` is deprecated: scripts that use it
    must change before the next release, where it is gone."""
    print(
        f"stratorch: {old} is deprecated and will be removed in the next release; use {new}",
        file=sys.stderr,
    )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if settings.store is not None:
        _renamed("STRATORCH_STORE", "STRATORCH_CANDLES")
    candles = args.candles or settings.candles or settings.store or SAMPLE_STORE
    result = _result(args, settings, candles)
    if args.out:
        args.out.write_text(result.model_dump_json(indent=2))
    if args.report:
        from shared import report  # here: plotly is imported only for a report

        html = asyncio.run(report.build(result, ParquetCandleStore(candles), args.request))
        args.report.write_text(html, encoding="utf-8")
    if not args.quiet:
        _summary(Console(), result, candles)
    return EXIT_CODES[result.status]


def _result(args: argparse.Namespace, settings: Settings, candles: Path) -> BacktestResult:
    """The run's result; a request that cannot be read, or a Docker sandbox that cannot be
    reached, is a ``rejected`` result too, so ``--out`` always gets one."""
    try:
        raw = args.request.read_bytes()
    except OSError as exc:
        return _refused(new_backtest_id(), f"cannot read the request {args.request}: {exc}")
    with _progress(Console(stderr=True), args.quiet) as on_event:
        return run_to_end(
            run_local(
                raw, settings, candles, sandbox=args.sandbox, state=args.state, on_event=on_event
            )
        )


async def run_local(
    raw: bytes,
    settings: Settings,
    candles: Path,
    *,
    sandbox: Literal["process", "docker"] | None = None,
    state: Path | None = None,
    on_event: EventCallback | None = None,
) -> BacktestResult:
    """Run ``raw`` as ``stratorch run`` does (``stratorch.backtest`` too): the embedded engine
    on the local candle store ``candles``, ``sandbox`` (default ``STRATORCH_SANDBOX``) and a
    file store in ``state`` (default ``STRATORCH_STATE_DIR``, else a temporary directory). A
    Docker sandbox that cannot be reached is a ``rejected`` result, saying what to do."""
    kind = sandbox or settings.sandbox
    unavailable: tuple[type[Exception], ...] = ()
    if kind == "docker":
        from shared.sandbox.docker import DockerUnavailable  # imports aiodocker

        unavailable = (DockerUnavailable,)
    with _state_dir(state or settings.state_dir) as directory:
        files = FileStore(directory, lease_s=settings.claim_lease_s)
        ports = Ports(ParquetCandleStore(candles), new_sandbox(settings, kind), files)
        try:
            return await _backtest(raw, ports, on_event, settings.deadline_s)
        except unavailable as exc:
            message = (
                f"the Docker sandbox is unavailable: {exc}; start dockerd (or set DOCKER_HOST),"
                " or run trusted code with --sandbox process"
            )
            return _refused(prepare(raw).backtest_id, message)


def _refused(backtest_id: str, message: str) -> BacktestResult:
    error = ErrorInfo(kind="rejected", message=message)
    return BacktestResult(backtest_id=backtest_id, status="rejected", errors=[error])


async def _backtest(raw: bytes, ports: Ports, on_event: Any, deadline_s: float) -> BacktestResult:
    async with ports.sandbox:  # the Docker sandbox removes its containers on the way out
        return await run_backtest(raw, ports, on_event=on_event, deadline_s=deadline_s)


def _audit(args: argparse.Namespace, settings: Settings) -> int:
    from stratorch import audit

    candles = args.candles or settings.candles or SAMPLE_STORE
    return audit.command(args.request, candles, new_sandbox(settings, args.sandbox))


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from shared import mongo  # here, so that `stratorch run` never imports PyMongo

    try:
        if args.mongo is None:
            report = ingest_binance(
                args.files,
                symbol=args.symbol,
                interval=args.interval,
                candles=ParquetCandleStore(args.candles),
            )
            destination = str(args.candles)
        else:
            database = args.mongo_db or settings.mongo_db
            parsed = parse_binance(args.files, symbol=args.symbol, interval=args.interval)
            report = parsed.report(asyncio.run(_write_mongo(args.mongo, database, parsed)))
            destination = f"{mongo.redact(args.mongo)} database {database}"
    except (IngestError, OSError) as exc:
        Console(stderr=True).print(f"[red]ingest failed:[/] {exc}")
        return 2
    except mongo.MongoError as exc:
        Console(stderr=True).print(f"[red]ingest failed:[/] {exc}")
        return 1
    first, last = (_utc(report.first_open_time), _utc(report.last_open_time))
    print(
        f"{args.symbol.upper()} {args.interval}: {report.rows_read} rows read from"
        f" {report.files} file(s), {report.rows_written} new bars, {report.rows_replaced} stored"
        f" bars replaced (other values), {report.duplicates} duplicates in the files"
        f" ({report.conflicts} conflicting), {first} → {last}, store {destination}"
    )
    return 0


async def _write_mongo(url: str, database: str, parsed: ParsedKlines) -> Written:
    """Write parsed klines to MongoDB's ``candles`` (creating its indexes first)."""
    from shared import mongo

    client = await mongo.connect(url, retries=2)
    try:
        db = client[database]
        await mongo.ensure_indexes(db)
        return await mongo.write_candles(db, parsed.symbol, parsed.interval, parsed.frame)
    finally:
        await client.close()


@contextmanager
def _state_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="stratorch-") as tmp:
        yield Path(tmp)


@contextmanager
def _progress(console: Console, quiet: bool) -> Iterator[EventCallback | None]:
    """A progress bar of units done, on a terminal only (scripts get clean stderr)."""
    if quiet or not console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("[bold]backtest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("units"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("planning", total=None)

        def on_event(event: BacktestEvent) -> None:
            symbols = ",".join(event.symbols[:3]) if event.type == "unit_done" else ""
            bar.update(
                task, total=event.unit_count, completed=event.units_done, description=symbols
            )

        yield on_event


def _summary(console: Console, result: BacktestResult, candles: Path) -> None:
    status_colour = {"completed": "green", "rejected": "red", "failed": "red"}.get(
        result.status, "yellow"
    )
    console.print(f"backtest [bold]{result.backtest_id}[/]: [{status_colour}]{result.status}[/]")
    for error in result.errors:
        where = "".join(f" {x}" for x in (error.symbol, error.unit_id) if x)
        console.print(f"  [red]{error.kind}[/]{where}: {error.message}")
        if error.log_tail:
            console.print("  last lines of the strategy's output:", style="dim")
            console.print(error.log_tail, style="dim", markup=False)
    if result.sweep is not None:
        _sweep_summary(console, result)
    if result.metrics is None:
        return
    m = result.metrics
    console.print(f"candles: {candles}", style="dim")
    table = Table(title="portfolio", show_header=False)
    rows = [
        ("initial cash", f"{m.initial_cash:,.2f}"),
        ("final equity", f"{m.final_equity:,.2f}"),
        ("total return", _pct(m.total_return)),
        ("CAGR", _pct(m.cagr)),
        ("Sharpe", _num(m.sharpe)),
        ("Sortino", _num(m.sortino)),
        ("max drawdown", _pct(m.max_drawdown)),
        ("Calmar", _num(m.calmar)),
        ("trades", str(m.trade_count)),
        ("win rate", _pct(m.win_rate)),
        ("profit factor", _num(m.profit_factor)),
        ("expectancy", _num(m.expectancy)),
        ("exposure", _pct(m.exposure)),
        ("fees paid", f"{m.fees_paid:,.2f}"),
        ("rejected entries", str(m.rejected_entries)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    per = Table(title="per symbol")
    per.add_column("symbol", no_wrap=True)
    for column in ("trades", "win rate", "PF", "pnl", "fees", "exposure", "rejected"):
        per.add_column(column, justify="right")
    for symbol, s in result.per_symbol.items():
        per.add_row(
            symbol,
            str(s.trade_count),
            _pct(s.win_rate),
            _num(s.profit_factor),
            f"{s.pnl:,.2f}",
            f"{s.fees_paid:,.2f}",
            _pct(s.exposure),
            str(s.rejected_entries),
        )
    console.print(per)


#: Rows of a sweep's ranking the summary shows (``--out`` has them all).
_RANKED_SHOWN = 20


def _sweep_summary(console: Console, result: BacktestResult) -> None:
    """A sweep's ranking (its best first) and walk-forward folds; the portfolio table after
    it is the best combination's."""
    sweep = result.sweep
    assert sweep is not None
    if sweep.ranking:
        title = f"sweep: {sweep.combinations} combinations by {sweep.metric}"
        table = Table(title=title)
        for column in ("rank", "params", sweep.metric, "return", "trades", "status"):
            table.add_column(column, justify="left" if column == "params" else "right")
        for r in sweep.ranking[:_RANKED_SHOWN]:
            m = r.metrics
            table.add_row(
                str(r.rank),
                _params(r.params),
                _num(r.value),
                _pct(m.total_return if m else None),
                str(m.trade_count) if m else "—",
                r.status if not r.errors else f"{r.status}: {r.errors[0].message[:60]}",
            )
        console.print(table)
        if len(sweep.ranking) > _RANKED_SHOWN:
            console.print(f"  ... {len(sweep.ranking) - _RANKED_SHOWN} more in --out", style="dim")
    if sweep.walk_forward:
        table = Table(title=f"walk-forward: best by {sweep.metric} on train, then tested")
        for column in ("train", "test", "chosen params", f"test {sweep.metric}", "test return"):
            table.add_column(column)
        for fold in sweep.walk_forward:
            m = fold.test.metrics if fold.test else None
            table.add_row(
                f"{_utc(fold.train_start)[:10]} – {_utc(fold.train_end)[:10]}",
                f"{_utc(fold.test_start)[:10]} – {_utc(fold.test_end)[:10]}",
                _params(fold.params) if fold.params is not None else "—",
                _num(fold.test.value if fold.test else None),
                _pct(m.total_return if m else None),
            )
        console.print(table)
        if sweep.oos_equity:
            final = sweep.oos_equity[-1][1]
            console.print(f"out-of-sample equity, stitched: {final:,.2f} at the end")


def _params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.2%}"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:,.2f}"


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


if __name__ == "__main__":
    sys.exit(main())
