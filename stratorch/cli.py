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
import logging
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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
from shared.sweep.expand import parent_of
from stratorch.embedded import (
    EventCallback,
    prepare,
    run_backtest,
    run_to_end,
    tune_allocators,
)
from stratorch.paths import SAMPLE_STORE

if TYPE_CHECKING:  # imported where used: `stratorch run` needs neither (~25 ms of imports)
    from stratorch.api import Backtest
    from stratorch.remote import AsyncClient

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

    _stack_commands(commands)

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
    convert = sources.add_parser(
        "mongo", help="convert a per-bar candle collection to the columnar layout"
    )
    convert.add_argument(
        "--from-collection",
        required=True,
        metavar="NAME",
        help="the per-bar collection to read, e.g. candles (left as it is)",
    )
    convert.add_argument(
        "--mongo", required=True, metavar="URI", help="MongoDB connection string (may write)"
    )
    convert.add_argument(
        "--mongo-db", metavar="NAME", help="database (default: STRATORCH_MONGO_DB)"
    )
    convert.set_defaults(command=_convert)
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
    tune_allocators()
    result = _result(args, settings, candles)
    if args.out:
        args.out.write_text(result.model_dump_json(indent=2))
    if args.report:
        from shared import report  # here: plotly is imported only for a report

        html = run_to_end(report.build(result, ParquetCandleStore(candles), args.request))
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
    kept = state or settings.state_dir
    with _state_dir(kept) as directory:
        files = FileStore(directory, lease_s=settings.claim_lease_s, ephemeral=kept is None)
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
    from stratorch.api import local_candles

    candles = local_candles(args.candles, settings)
    return audit.command(args.request, candles, new_sandbox(settings, args.sandbox))


# -- submit, status, result: the real stack ----------------------------------------------------

#: Exit codes of submit, status and result beyond EXIT_CODES (documented in the README).
UNKNOWN_ID, UNREACHABLE = 3, 4


def _stack_commands(commands: Any) -> None:
    submit = commands.add_parser("submit", help="send a backtest to the stack; print its id")
    submit.add_argument("request", type=Path, metavar="REQUEST.json", help="a BacktestRequest")
    via = submit.add_mutually_exclusive_group()
    via.add_argument("--gateway", metavar="URL", help="the gateway (STRATORCH_GATEWAY_URL)")
    via.add_argument("--amqp", metavar="URL", help="the broker (STRATORCH_AMQP_URL)")
    submit.add_argument("--wait", action="store_true", help="follow it, print its summary")
    _result_options(submit)
    submit.set_defaults(command=_submit)

    status = commands.add_parser("status", help="a backtest's status on the stack (gateway)")
    status.add_argument("id", metavar="ID")
    status.add_argument("--gateway", metavar="URL", help="the gateway (STRATORCH_GATEWAY_URL)")
    status.set_defaults(command=_status)

    result = commands.add_parser("result", help="wait for a backtest's result (gateway)")
    result.add_argument("id", metavar="ID")
    result.add_argument("--gateway", metavar="URL", help="the gateway (STRATORCH_GATEWAY_URL)")
    _result_options(result)
    result.set_defaults(command=_result_of)


def _result_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, metavar="RESULT.json", help="write the BacktestResult")
    parser.add_argument("--report", type=Path, metavar="FILE.html", help="write an HTML report")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    if (args.out or args.report) and not args.wait:
        print("stratorch submit: --out and --report need --wait", file=sys.stderr)
        return 2
    try:
        raw = args.request.read_bytes()
    except OSError as exc:
        print(f"stratorch submit: cannot read the request {args.request}: {exc}", file=sys.stderr)
        return 2
    url = args.gateway or args.amqp or _gateway(settings) or settings.amqp_url.get_secret_value()

    async def submit(client: AsyncClient) -> Backtest | None:
        backtest_id = await client.submit_json(raw)
        print(backtest_id, flush=True)
        return await _follow(client, backtest_id, args.quiet) if args.wait else None

    return _on_stack(url, submit, args)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    async def status(client: AsyncClient) -> None:
        s = await client.status(args.id)
        if s.unit_count:
            progress = f"{s.units_done}/{s.unit_count} units"
        elif s.result is not None and s.result.cache_hit:
            progress = "from the result cache"
        else:
            progress = "not planned yet"
        print(f"{s.id}: {s.status} ({progress})")

    return _on_stack(_gateway(settings, args.gateway), status, args)


def _result_of(args: argparse.Namespace, settings: Settings) -> int:
    async def result(client: AsyncClient) -> Backtest:
        return await _follow(client, args.id, args.quiet)

    return _on_stack(_gateway(settings, args.gateway), result, args)


def _gateway(settings: Settings, given: str | None = None) -> str | None:
    return given or settings.gateway_url


async def _follow(client: AsyncClient, backtest_id: str, quiet: bool) -> Backtest:
    """Wait for its end, with the progress bar of ``stratorch run``."""
    with _progress(Console(stderr=True), quiet) as on_event:
        return await client.wait(backtest_id, on_event=on_event)


def _on_stack(
    url: str | None, work: Callable[[AsyncClient], Awaitable[Backtest | None]], args: Any
) -> int:
    """Run ``work`` with a client of ``url``; print its backtest as ``stratorch run`` does
    (writing ``--out`` and ``--report``); the exit code, naming what went wrong on stderr."""
    from stratorch.api import BacktestRejected
    from stratorch.remote import (
        StackError,
        StackRefused,
        StackUnreachable,
        UnknownBacktest,
        connect_async,
    )

    errors = Console(stderr=True, soft_wrap=True)
    # The error is said below, in words: aio-pika's own log line of a failed connect is noise.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
    if url is None:
        errors.print(
            "[red]no gateway:[/] give --gateway URL or set STRATORCH_GATEWAY_URL (status and"
            " result ask the gateway: the broker keeps no backtests to look up)"
        )
        return 2

    async def run() -> Backtest | None:
        async with await connect_async(url) as client:
            return await work(client)

    try:
        done = run_to_end(run())
    except KeyboardInterrupt:
        errors.print("stopped waiting: the backtest goes on; `stratorch result ID` follows it")
        return 130
    except BacktestRejected as exc:
        _summary(errors, exc.backtest.result, None)
        return EXIT_CODES["rejected"]
    except StackError as exc:
        said = {
            UnknownBacktest: "unknown backtest",
            StackUnreachable: "unreachable",
            StackRefused: "refused",
        }
        errors.print(f"[red]{said.get(type(exc), 'error')}:[/] ", end="")
        errors.print(str(exc), markup=False)
        return UNKNOWN_ID if isinstance(exc, UnknownBacktest) else UNREACHABLE
    except ValueError as exc:  # not a stack's URL
        errors.print(f"[red]error:[/] {exc}", markup=False)
        return 2
    if done is None:
        return 0
    if getattr(args, "out", None):
        args.out.write_text(done.result.model_dump_json(indent=2))
    if getattr(args, "report", None):
        done.report(args.report)
    if not getattr(args, "quiet", False):
        _summary(Console(), done.result, done.candles_from)
    return EXIT_CODES[done.status]


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
    """Write parsed klines to MongoDB, in the columnar layout."""
    from shared import mongo

    client = await mongo.connect(url, retries=2)
    try:
        return await mongo.write_chunks(
            client[database], parsed.symbol, parsed.interval, parsed.frame
        )
    finally:
        await client.close()


def _convert(args: argparse.Namespace, settings: Settings) -> int:
    """``stratorch ingest mongo --from-collection NAME``: the per-bar layout to the columnar."""
    from shared import mongo

    async def convert() -> list[tuple[str, str, Written]]:
        client = await mongo.connect(args.mongo, retries=2)
        try:
            return await mongo.convert_collection(client[database], args.from_collection)
        finally:
            await client.close()

    database = args.mongo_db or settings.mongo_db
    try:
        converted = asyncio.run(convert())
    except mongo.MongoError as exc:
        Console(stderr=True).print(f"[red]ingest failed:[/] {exc}")
        return 1
    for symbol, interval, written in converted:
        print(
            f"{symbol} {interval}: {written.new} new bars, {written.replaced} stored bars "
            f"replaced (other values), store {mongo.redact(args.mongo)} database {database}"
        )
    if not converted:
        print(f"{database}.{args.from_collection} holds no candles: nothing converted")
    return 0


@contextmanager
def _state_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="stratorch-") as tmp:
        yield Path(tmp)


@contextmanager
def _progress(console: Console, quiet: bool) -> Iterator[EventCallback | None]:
    """A progress bar of units done (a sweep's: its backtests), on a terminal only (scripts
    get clean stderr)."""
    if quiet or not console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("[bold]backtest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counted]}"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("planning", total=None, counted="units")

        def on_event(event: BacktestEvent) -> None:
            if event.type != "unit_done":
                what = ""
            elif event.unit_id is not None and parent_of(event.unit_id) == event.backtest_id:
                what = event.unit_id  # a sweep's backtest ended
                bar.update(task, counted="backtests")
            else:
                what = ",".join(event.symbols[:3])
            bar.update(task, total=event.unit_count, completed=event.units_done, description=what)

        yield on_event


def _summary(console: Console, result: BacktestResult, candles: Path | str | None) -> None:
    """The result as ``stratorch run`` prints it; ``candles`` says where the prices came
    from (a local store, or the stack's)."""
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
    if candles is not None:
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
