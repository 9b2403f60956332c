"""shared.mongo on a real Mongo wire-protocol server: candles, ingest, the state store, indexes.

The server is FerretDB here (see ``scripts/start-mongo.sh``) and MongoDB in production; these
tests use only what both do. FerretDB scans a whole collection for any query not on ``_id``, so
each test keeps its database small.
"""

from __future__ import annotations

import asyncio
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import structlog.testing
from bson import ObjectId
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.runtime import lifespan
from shared import mongo
from shared.candles import CANDLE_COLUMNS, ParquetCandleStore, Span
from shared.errors import IdTaken, NoDataError, OverQuota
from shared.messages import (
    BacktestRequest,
    BacktestResult,
    ErrorInfo,
    Metrics,
    Proposal,
    ProposalBatch,
    SymbolBars,
    Trade,
)
from shared.outcome import finish
from shared.sandbox.port import StrategyInfo
from shared.settings import Settings
from shared.store import Owner, admit_request
from shared.sweep.expand import expand
from shared.tenancy import ANONYMOUS, STALE_AFTER_S, Admission, Quota
from stratorch.cli import main
from stratorch.paths import SAMPLE_STORE
from tests import store_contract
from tests.integration.mongo_fixtures import (
    fresh_db,
    fresh_db_name,
    mongo_server_url,
    with_option,
)
from tests.unit.candles._klines import ADABTC_1M

pytestmark = pytest.mark.integration
__all__ = ["fresh_db", "fresh_db_name", "mongo_server_url"]  # fixtures, used by name

Db = AsyncDatabase[dict[str, Any]]
SAMPLE = ParquetCandleStore(SAMPLE_STORE)
SYMBOLS = SAMPLE.symbols("1h")
EVERYTHING = {"start_ms": 0, "end_ms": 2**62}
HOUR = 3_600_000


def sample(symbol: str, rows: slice = slice(None)) -> pd.DataFrame:
    """The sample's 1h bars of ``symbol`` (those at ``rows``) as a canonical frame."""
    return SAMPLE.read(symbol, "1h", **EVERYTHING).iloc[rows].reset_index(drop=True)


def assert_identical(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same columns in the same order, dtypes, index and values, bit for bit."""
    assert list(got.columns) == list(want.columns) == list(CANDLE_COLUMNS)
    assert got.columns.dtype == want.columns.dtype
    assert list(got.dtypes) == list(want.dtypes)
    assert isinstance(got.index, pd.RangeIndex)
    assert got.index.equals(want.index)
    for name in CANDLE_COLUMNS:
        assert got[name].to_numpy().tobytes() == want[name].to_numpy().tobytes(), name
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def source(url: str, database: str) -> mongo.MongoCandleSource:
    return mongo.MongoCandleSource(url, database)


# -- candles: load ----------------------------------------------------------------------------


@pytest.mark.parametrize("symbol", SYMBOLS)
async def test_load_is_bit_identical_to_parquet(
    fresh_db: Db, mongo_server_url: str, symbol: str
) -> None:
    frame = sample(symbol)
    assert await mongo.write_candles(fresh_db, symbol, "1h", frame) == (len(frame), 0)
    times = frame["open_time"].to_numpy()
    middle = {"start_ms": int(times[1000]), "end_ms": int(times[2000]), "lookback": 50}
    async with source(mongo_server_url, fresh_db.name) as candles:
        assert_identical(await candles.load(symbol, Span("1h", **EVERYTHING)), frame)
        want = SAMPLE.read(symbol, "1h", **middle)
        assert len(want) == 1050
        assert_identical(await candles.load(symbol.lower(), Span("1h", **middle)), want)


async def test_load_at_the_edges_matches_parquet(fresh_db: Db, mongo_server_url: str) -> None:
    frame = sample("BTCUSDT")
    await mongo.write_candles(fresh_db, "BTCUSDT", "1h", frame)
    # Another series of the same symbol, and one of another symbol, must never leak in.
    await mongo.write_candles(fresh_db, "BTCUSDT", "2h", sample("ETHUSDT", slice(None, 300)))
    await mongo.write_candles(fresh_db, "ETHUSDT", "1h", sample("ETHUSDT", slice(None, 300)))
    t = frame["open_time"].to_numpy()
    cases = [
        {"start_ms": int(t[10]), "end_ms": int(t[20]), "lookback": 100},  # short warm-up
        {"start_ms": int(t[0]), "end_ms": int(t[5]), "lookback": 5},  # none at all
        {"start_ms": int(t[100]) + 1, "end_ms": int(t[200]) - 1, "lookback": 3},  # unaligned
        {"start_ms": int(t[-10]), "end_ms": int(t[-1]), "lookback": 0},  # end is exclusive
        {"start_ms": int(t[-10]), "end_ms": int(t[-1]) + 1, "lookback": 1},  # last bar in
        {"start_ms": int(t[-3]), "end_ms": int(t[-1]) + 100 * HOUR, "lookback": 2},  # past end
        {"start_ms": int(t[5]), "end_ms": int(t[5]) + 1, "lookback": 0},  # a single bar
        {"start_ms": int(t[0]) - 100 * HOUR, "end_ms": int(t[3]), "lookback": 7},  # before
    ]
    async with source(mongo_server_url, fresh_db.name) as candles:
        for case in cases:
            want = SAMPLE.read("BTCUSDT", "1h", **case)
            assert_identical(await candles.load("BTCUSDT", Span("1h", **case)), want)


async def test_no_data_messages_say_what_is_stored(fresh_db: Db, mongo_server_url: str) -> None:
    async with source(mongo_server_url, fresh_db.name) as candles:
        with pytest.raises(NoDataError, match="no 1h candles for any symbol") as empty:
            await candles.load("BTCUSDT", Span("1h", **EVERYTHING))
        assert "--mongo MONGO_URL" in empty.value.message
        assert ErrorInfo.from_error(empty.value).kind == "no_data"

        await mongo.write_candles(fresh_db, "BTCUSDT", "1h", sample("BTCUSDT", slice(-50, None)))
        await mongo.write_candles(fresh_db, "ADAUSDT", "1h", sample("ADAUSDT", slice(None, 10)))
        with pytest.raises(NoDataError) as other_symbol:
            await candles.load("DOGEUSDT", Span("1h", **EVERYTHING))
        assert other_symbol.value.symbol == "DOGEUSDT"
        assert "It has 1h candles for ADAUSDT, BTCUSDT." in other_symbol.value.message
        with pytest.raises(NoDataError, match=r"BTCUSDT is stored at 1h\."):
            await candles.load("BTCUSDT", Span("4h", **EVERYTHING))
        with pytest.raises(NoDataError) as out_of_range:
            await candles.load("BTCUSDT", Span("1h", start_ms=0, end_ms=HOUR, lookback=10))
        assert (
            "the candle database (" + fresh_db.name + ".candles) has 50 bars from "
            "2021-07-15 19:00:00 UTC to 2021-07-17 20:00:00 UTC" in out_of_range.value.message
        )
        assert "--symbol BTCUSDT --interval 1h" in out_of_range.value.message
        with pytest.raises(NoDataError, match="not a Binance symbol"):
            await candles.load("BTC/USDT", Span("1h", **EVERYTHING))
        with pytest.raises(NoDataError, match="unknown interval '7m'"):
            await candles.load("BTCUSDT", Span("7m", **EVERYTHING))
        with pytest.raises(ValueError, match="lookback"):
            await candles.load("BTCUSDT", Span("1h", **EVERYTHING, lookback=-1))


async def test_malformed_candle_document_is_named(fresh_db: Db, mongo_server_url: str) -> None:
    await mongo.write_candles(fresh_db, "BTCUSDT", "1h", sample("BTCUSDT", slice(None, 5)))
    t = int(sample("BTCUSDT")["open_time"].iloc[2])
    await fresh_db.candles.update_one({"open_time": t}, {"$set": {"close": "41000.5"}})
    async with source(mongo_server_url, fresh_db.name) as candles:
        with pytest.raises(mongo.MongoDataError, match=rf"open_time {t} .* close = '41000.5'"):
            await candles.load("BTCUSDT", Span("1h", **EVERYTHING))


async def test_read_preference_is_the_urls_or_secondary_preferred(mongo_server_url: str) -> None:
    async with source(mongo_server_url, "x") as default:
        assert default.read_preference == "secondaryPreferred"
        await default.ping()
    async with source(with_option(mongo_server_url, "readPreference=nearest"), "x") as nearest:
        assert nearest.read_preference == "nearest"
    async with source(with_option(mongo_server_url, "readpreference=primary"), "x") as primary:
        assert primary.read_preference == "primary"


# -- candles: fingerprint and writes ----------------------------------------------------------


async def test_fingerprint_changes_exactly_when_the_loaded_bars_do(
    fresh_db: Db, mongo_server_url: str
) -> None:
    frame = sample("BTCUSDT", slice(None, 400))
    await mongo.write_candles(fresh_db, "BTCUSDT", "1h", frame)
    t = frame["open_time"].to_numpy()
    window = {"start_ms": int(t[100]), "end_ms": int(t[200]), "lookback": 20}

    def changed(row: int) -> pd.DataFrame:
        bar = frame.iloc[[row]].reset_index(drop=True)
        bar["close"] = np.nextafter(bar["close"], np.inf)  # the smallest change there is
        bar["high"] = np.maximum(bar["high"], bar["close"])
        return bar

    async with source(mongo_server_url, fresh_db.name) as candles:

        async def fingerprint() -> str:
            return await candles.fingerprint("BTCUSDT", Span("1h", **window))

        before = await fingerprint()
        assert before == await fingerprint()
        assert before.startswith("mongo:20+100:")
        # The same data again: nothing is written, nothing changes.
        assert await mongo.write_candles(fresh_db, "BTCUSDT", "1h", frame) == (0, 0)
        assert await fingerprint() == before
        # Bars load would not return: before the warm-up, after the range.
        await mongo.write_candles(fresh_db, "BTCUSDT", "1h", changed(50))
        await mongo.write_candles(fresh_db, "BTCUSDT", "1h", changed(300))
        assert await fingerprint() == before
        # A bar in the range, then one in the warm-up.
        await mongo.write_candles(fresh_db, "BTCUSDT", "1h", changed(150))
        in_range = await fingerprint()
        assert in_range != before
        await mongo.write_candles(fresh_db, "BTCUSDT", "1h", changed(85))
        in_warm_up = await fingerprint()
        assert in_warm_up not in (before, in_range)
        # A bar removed from the range.
        await fresh_db.candles.delete_one({"symbol": "BTCUSDT", "open_time": int(t[199])})
        assert await fingerprint() not in (before, in_range, in_warm_up)

        assert (
            await candles.fingerprint("BTCUSDT", Span("1h", start_ms=0, end_ms=HOUR)) == "no_data"
        )
        assert await candles.fingerprint("DOGEUSDT", Span("1h", **window)) == "no_data"
        assert await candles.fingerprint("BTC/USDT", Span("1h", **window)) == "no_data"


async def test_write_candles_inserts_new_updates_changed_keeps_the_rest(
    fresh_db: Db, mongo_server_url: str
) -> None:
    frame = sample("LINKUSDT")
    assert await mongo.write_candles(
        fresh_db, "linkusdt", "1h", frame.iloc[:3000].reset_index(drop=True)
    ) == (3000, 0)
    counter = await fresh_db.counters.find_one({"_id": "candles"})
    assert counter is not None and counter["version"] == 1
    # Overlapping: 1000 known bars (one of them corrected) and 2482 new ones.
    newer = frame.iloc[2000:].reset_index(drop=True)
    newer.loc[10, "volume"] = newer.loc[10, "volume"] + 1.0
    written = await mongo.write_candles(fresh_db, "LINKUSDT", "1h", newer, batch_size=700)
    assert written == (2482, 1)  # new bars, and the one corrected
    assert await fresh_db.candles.count_documents({"symbol": "LINKUSDT"}) == len(frame)
    corrected = await fresh_db.candles.find_one({"open_time": int(newer.loc[10, "open_time"])})
    untouched = await fresh_db.candles.find_one({"open_time": int(newer.loc[11, "open_time"])})
    assert corrected is not None and untouched is not None
    assert corrected["version"] == 2 and corrected["volume"] == newer.loc[10, "volume"]
    assert untouched["version"] == 1
    assert isinstance(corrected["open_time"], int) and isinstance(corrected["close"], float)
    want = frame.copy()
    want.loc[2010, "volume"] = newer.loc[10, "volume"]
    async with source(mongo_server_url, fresh_db.name) as candles:
        assert_identical(await candles.load("LINKUSDT", Span("1h", **EVERYTHING)), want)

    with pytest.raises(ValueError, match="not a Binance symbol"):
        await mongo.write_candles(fresh_db, "LINK-USDT", "1h", frame)
    with pytest.raises(ValueError, match="unknown interval"):
        await mongo.write_candles(fresh_db, "LINKUSDT", "60m", frame)
    with pytest.raises(ValueError, match="not a canonical candle frame"):
        await mongo.write_candles(
            fresh_db, "LINKUSDT", "1h", frame.iloc[::-1].reset_index(drop=True)
        )
    assert await mongo.write_candles(
        fresh_db, "LINKUSDT", "1h", frame.iloc[:0].reset_index(drop=True)
    ) == (0, 0)


# -- stratorch ingest binance --mongo ---------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_global_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """``main`` configures structlog for the process, caching loggers that write to the
    stderr pytest captured for one test; later tests' log lines would hit a closed file."""
    monkeypatch.setattr("stratorch.cli.configure", lambda level: None)


def _load(url: str, database: str, symbol: str, interval: str) -> pd.DataFrame:
    async def load() -> pd.DataFrame:
        async with source(url, database) as candles:
            return await candles.load(symbol, Span(interval, **EVERYTHING))

    return asyncio.run(load())


def _report(capsys: pytest.CaptureFixture[str]) -> str:
    """The report line ingest printed (log lines, unconfigured here, go to stdout too)."""
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ADABTC")]
    return line


def test_cli_ingests_csv_and_zip_into_mongo(
    tmp_path: Path, mongo_server_url: str, fresh_db_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "ADABTC-1m-2021-11-27.csv"
    csv.write_text(ADABTC_1M)
    lines = ADABTC_1M.splitlines(keepends=True)
    archive = tmp_path / "ADABTC-1m-2021-11.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("part1.csv", "".join(lines[:6]))
        zf.writestr("part2.csv", "".join(lines[4:]))  # overlaps by two identical rows
    to_mongo = ["--mongo", mongo_server_url, "--mongo-db", fresh_db_name]
    ingest = ["ingest", "binance", "--symbol", "adabtc", "--interval", "1m"]

    assert main([*ingest, str(csv), *to_mongo]) == 0
    report = _report(capsys)
    assert report.startswith(
        "ADABTC 1m: 10 rows read from 1 file(s), 10 new bars, 0 stored bars replaced"
        " (other values), 0 duplicates in the files"
    )
    assert report.endswith(f"store {mongo_server_url} database {fresh_db_name}")
    assert main([*ingest, str(archive), *to_mongo]) == 0
    assert "12 rows read from 1 file(s), 0 new bars, 0 stored bars replaced (other values)" in (
        _report(capsys)
    )
    # The same file through the same parser into the Parquet store: the same bits.
    assert main([*ingest, str(csv), "--candles", str(tmp_path / "candles")]) == 0
    want = ParquetCandleStore(tmp_path / "candles").read("ADABTC", "1m", **EVERYTHING)
    assert_identical(_load(mongo_server_url, fresh_db_name, "ADABTC", "1m"), want)


def test_cli_needs_exactly_one_destination(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["ingest", "binance", "x.csv", "--symbol", "ADABTC", "--interval", "1m"]
    with pytest.raises(SystemExit) as neither:
        main(base)
    assert neither.value.code == 2
    assert "one of the arguments --candles --mongo is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as both:
        main([*base, "--candles", str(tmp_path), "--mongo", "mongodb://127.0.0.1/"])
    assert both.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_reports_a_bad_file_before_touching_mongo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("1637971200000,oops\n")
    # No server at this address: the parse fails first, so it is never contacted.
    url = "mongodb://127.0.0.1:9/"
    code = main(
        ["ingest", "binance", str(bad), "--symbol", "X1", "--interval", "1m", "--mongo", url]
    )
    assert code == 2
    assert "bad.csv line 1" in capsys.readouterr().err


# -- the state store --------------------------------------------------------------------------


def _batch(backtest_id: str, unit_id: str, *, proposals: int = 3, bars: int = 10) -> ProposalBatch:
    t0 = 1_600_000_000_000
    return ProposalBatch(
        backtest_id=backtest_id,
        unit_id=unit_id,
        unit_count=2,
        symbols=["BTCUSDT"],
        proposals=[
            Proposal(
                id=f"BTCUSDT:{t0 + i * 60_000}:{i}",
                symbol="BTCUSDT",
                signal_time=t0 + i * 60_000,
                entry_time=t0 + (i + 1) * 60_000,
                entry_price=20_000.0 + i * 0.123456789,
                exit_time=t0 + (i + 5) * 60_000,
                exit_price=20_100.0 + i * 0.987654321,
                exit_phase=2,
                exit_reason="take_profit",
                tp_price=20_100.0 + i,
                sl_price=19_900.0 - i,
            )
            for i in range(proposals)
        ],
        bars={
            "BTCUSDT": SymbolBars(
                time=[t0 + i * 60_000 for i in range(bars)],
                close=[20_000.0 + (i * 7919 % 1000) / 3 for i in range(bars)],
            )
        },
        elapsed_s=1.5,
    )


def _result(backtest_id: str, trades: int) -> BacktestResult:
    t0 = 1_600_000_000_000
    return BacktestResult(
        backtest_id=backtest_id,
        status="completed",
        metrics=Metrics(
            initial_cash=10_000.0,
            final_equity=12_345.678,
            total_return=0.2345678,
            cagr=None,
            sharpe=1.5,
            sortino=None,
            max_drawdown=0.1,
            calmar=None,
            win_rate=0.5,
            profit_factor=1.2,
            expectancy=3.4,
            exposure=0.6,
            trade_count=trades,
            fees_paid=12.5,
            rejected_entries=0,
        ),
        trades=[
            Trade(
                symbol="BTCUSDT",
                side="long",
                entry_time=t0 + i * 60_000,
                entry_price=20_000.0 + i / 7,
                exit_time=t0 + (i + 1) * 60_000,
                exit_price=20_010.0 + i / 9,
                quantity=0.01 + i / 1e7,
                fees=0.4 + i / 1e9,
                pnl=(i % 13 - 6) / 3,
                exit_reason="signal",
            )
            for i in range(trades)
        ],
        equity_curve=[(t0 + i * 60_000, 10_000.0 + i / 3) for i in range(1000)],
        timings={"replay_s": 1.25},
    )


async def test_store_sources_and_plans(fresh_db: Db) -> None:
    store = mongo.MongoStore(fresh_db)
    sha = "ab" * 32
    assert await store.get_source(sha) is None
    await store.put_source(sha, "class S: pass\n", tenant="alice")
    await store.put_source(sha, "class S: pass\n", tenant="alice")
    assert await store.get_source(sha) == "class S: pass\n"
    assert await fresh_db.sources.count_documents({}) == 1
    assert await store.has_source(sha, tenant="alice")
    assert not await store.has_source(sha, tenant="bob")  # stored, but not bob's
    await store.put_source(sha, "class S: pass\n", tenant="bob")
    assert await store.has_source(sha, tenant="bob")
    assert await fresh_db.sources.count_documents({}) == 1

    await store_contract.plan_is_read_back_as_stored_and_replaced(store)
    assert await fresh_db["plans.chunks"].count_documents({}) == 1  # the replaced one is gone
    await store_contract.description_is_read_back(store)
    await store_contract.sweep_children_are_counted_once(store)
    async with store:
        pass
    await store.aclose()  # idempotent


async def test_store_counts_a_sweeps_children_ending_at_once(fresh_db: Db) -> None:
    # Children of a sweep end at the same moment on several portfolio_sim deliveries; each
    # is counted once, none is lost (the last one to end builds the sweep's result).
    store = mongo.MongoStore(fresh_db)
    children = [f"sw:c{i:04d}" for i in range(12)]
    counts = await asyncio.gather(*(store.sweep_child_done("sw", c) for c in children * 2))
    assert max(counts) == 12
    assert await store.sweep_child_done("sw", children[0]) == 12
    assert await store.sweep_child_done("other", "other:c0000") == 1


async def test_store_batches_are_idempotent(fresh_db: Db) -> None:
    store = mongo.MongoStore(fresh_db)
    first = _batch("bt1", "u0001")
    assert await store.units_done("bt1") == 0
    assert await store.batches("bt1") == []
    assert await store.add_batch(first) == 1
    # Redelivered, even with different content (a unit re-run): the first one stays.
    assert await store.add_batch(first) == 1
    assert await store.add_batch(first.model_copy(update={"elapsed_s": 9.0})) == 1
    failed = ProposalBatch(
        backtest_id="bt1",
        unit_id="u0000",
        unit_count=2,
        symbols=["ETHUSDT"],
        error=ErrorInfo(kind="no_data", symbol="ETHUSDT", message="no data"),
    )
    assert await store.add_batch(failed) == 2
    assert await store.add_batch(_batch("bt2", "u0001")) == 1
    assert await store.units_done("bt1") == 2
    assert await store.batches("bt1") == [failed, first]
    assert await fresh_db["batches.chunks"].count_documents({}) == 3


async def test_store_batches_of_a_plan_are_found_by_id_and_old_ones_still_read(
    fresh_db: Db,
) -> None:
    store = mongo.MongoStore(fresh_db)
    await store.put_plan(store_contract.plan("bt1"))  # units u0000 and u0001
    second = _batch("bt1", "u0001")
    assert await store.add_batch(second) == 1
    assert await store.add_batch(second) == 1  # redelivered
    assert await store.add_batch(_batch("bt2", "u0000")) == 1  # another backtest's
    first = _batch("bt1", "u0000")
    assert await store.add_batch(first) == 2
    # Each batch is its plan's unit, by ``_id``: no query over every batch ever stored.
    assert await fresh_db.batches.find_one({"_id": "bt1/u0000"}) is not None
    assert await store.batches("bt1") == [first, second]
    assert await store.units_done("bt1") == 2

    # As stored before: a plan listing no unit ids, batches under ``ObjectId``s.
    await store.put_plan(store_contract.plan("old"))
    await fresh_db.plans.update_one({"_id": "old"}, {"$unset": {"unit_ids": ""}})
    old = _batch("old", "u0001")
    await store.add_batch(old)
    doc = await fresh_db.batches.find_one({"_id": "old/u0001"})
    assert doc is not None
    await fresh_db.batches.delete_one({"_id": "old/u0001"})
    await fresh_db.batches.insert_one({**doc, "_id": ObjectId()})
    assert await store.units_done("old") == 1
    assert await store.add_batch(old) == 1  # stored already, in the old layout
    assert await store.batches("old") == [old]


async def test_store_a_lease_is_taken_by_exactly_one_client(
    fresh_db: Db, mongo_server_url: str
) -> None:
    clients = [await mongo.connect(mongo_server_url, retries=0) for _ in range(4)]
    try:
        stores = [mongo.MongoStore(c[fresh_db.name], lease_s=3.0) for c in clients]
        await store_contract.lease_is_taken_by_exactly_one(stores)
    finally:
        for client in clients:
            await client.close()
    # The lapsed lease has the crashed owner's generation and the takers' after it.
    ids = set(await fresh_db.claims.distinct("_id"))
    assert {"free/0", "lapsed/0", "lapsed/1"} <= ids


async def test_store_a_lease_is_renewed_by_its_owner_and_taken_over_once_it_lapses(
    fresh_db: Db, mongo_server_url: str
) -> None:
    client = await mongo.connect(mongo_server_url, retries=0)
    try:
        stores = [mongo.MongoStore(db, lease_s=3.0) for db in (fresh_db, client[fresh_db.name])]
        await store_contract.lease_is_renewed_by_its_owner_and_lost_after_it_lapses(stores)
    finally:
        await client.close()


async def test_store_a_50_mb_batch_round_trips(fresh_db: Db) -> None:
    big = _batch("bt1", "u0000", proposals=150_000, bars=600_000)
    size = len(big.model_dump_json())
    assert size > 50_000_000
    store = mongo.MongoStore(fresh_db)
    assert await store.add_batch(big) == 1
    assert await store.add_batch(big) == 1
    doc = await fresh_db.batches.find_one({"backtest_id": "bt1"})
    assert doc is not None and doc["body"]["size"] == size and len(doc["body"]["chunks"]) > 1
    assert await store.batches("bt1") == [big]


async def test_store_results_and_cache_with_100k_trades(fresh_db: Db) -> None:
    store = mongo.MongoStore(fresh_db)
    big = _result("bt1", 100_000)
    assert await store.get_result("bt1") is None
    assert await store.get_cached("k1") is None
    assert await store.finish(big) == big
    await store.put_cached("k1", big)
    assert await store.get_result("bt1") == big
    assert await store.get_cached("k1") == big
    doc = await fresh_db.results.find_one({"_id": "bt1"})
    assert doc is not None and doc["status"] == "completed" and doc["trade_count"] == 100_000
    # Replacing a cached record swaps its body and deletes the old chunks.
    small = big.model_copy(update={"trades": big.trades[:3], "cache_hit": True})
    await store.put_cached("k1", small)
    assert await store.get_cached("k1") == small
    assert await fresh_db["cache.chunks"].count_documents({}) == 1


async def test_store_a_backtest_ends_once_and_the_first_outcome_stands(fresh_db: Db) -> None:
    store = mongo.MongoStore(fresh_db)
    outcomes = [
        _result("bt1", 10),
        BacktestResult(backtest_id="bt1", status="cancelled"),
        BacktestResult(backtest_id="bt1", status="failed"),
    ]
    stood = await asyncio.gather(*(store.finish(o) for o in outcomes))
    assert stood[0] == stood[1] == stood[2] and stood[0] in outcomes
    assert await store.get_result("bt1") == stood[0]
    assert await fresh_db["results.chunks"].count_documents({}) == 1  # losers' bodies dropped


async def test_store_a_completed_backtest_keeps_its_result_only(fresh_db: Db) -> None:
    # What only a running backtest reads goes with its outcome, so a lookup by ``_id`` (a
    # scan of the collection on FerretDB) does not cost more with every backtest stored.
    store = mongo.MongoStore(fresh_db)
    for backtest_id in ("done", "running", "cancelled"):
        await store.put_plan(store_contract.plan(backtest_id))  # units u0000 and u0001
        await store.add_batch(_batch(backtest_id, "u0000"))
        await store.add_batch(_batch(backtest_id, "u0001"))
        await store.claim(backtest_id, "host:1:0")
        await store.put_wal(backtest_id, [{"seq": i} for i in range(7_000)])  # two blocks
    result = _result("done", trades=3)
    assert await store.finish(result) == result
    await store.finish(BacktestResult(backtest_id="cancelled", status="cancelled"))
    assert await store.add_batch(_batch("done", "u0000")) == 2  # run again: not stored

    async def ids(collection: str) -> set[str]:
        return {d["_id"].split("/")[0] for d in await fresh_db[collection].find().to_list()}

    for collection in ("plans", "batches", "wal", "claims"):
        assert await ids(collection) == {"running", "cancelled"}, collection
    assert await fresh_db["batches.chunks"].count_documents({}) == 4
    assert await fresh_db["plans.chunks"].count_documents({}) == 2
    assert await store.get_result("done") == result
    assert await store.get_plan("done") is None
    # Its request stays, for its report; the others' come from their plans.
    for backtest_id in ("done", "running", "cancelled"):
        want = store_contract.plan(backtest_id).request
        assert await store.get_request(backtest_id) == want, backtest_id
    assert await ids("requests") == {"done"}
    assert await store.get_request("never-planned") is None
    assert await store.get_wal("done") == []
    assert await store.units_done("done") == 2  # its progress: every unit, as its result says
    # Ending it again (a redelivered message) gives the outcome back and changes nothing.
    assert await store.finish(BacktestResult(backtest_id="done", status="failed")) == result
    assert await store.units_done("done") == 2
    assert await store.units_done("cancelled") == 2  # its late batches still count
    assert len(await store.get_wal("running")) == 7_000


async def test_store_tells_whether_a_backtest_ended(fresh_db: Db) -> None:
    store = mongo.MongoStore(fresh_db)
    assert await store.ended("bt1") is None
    await store.finish(BacktestResult(backtest_id="bt1", status="cancelled"))
    assert await store.ended("bt1") == "cancelled"
    assert await store.ended("bt2") is None


async def test_a_backtest_in_flight_is_not_ended_without_a_look_at_every_result(
    fresh_db: Db,
) -> None:
    """The question every unit asks is answered from the backtests in flight, not from the
    results of all time (on FerretDB a lookup reads its whole collection)."""
    store = mongo.MongoStore(fresh_db)
    for backtest_id in ("bt1", "bt2"):
        assert await store.admit(ANONYMOUS, backtest_id, 2, Quota()) is Admission.ADMITTED
    assert await store.ended("bt1") is None
    await finish(store, BacktestResult(backtest_id="bt1", status="cancelled"))
    assert await store.ended("bt1") == "cancelled"  # stored, then released: ended for good
    # In flight, its results are not read: an outcome stored but not yet released (the
    # moment between the two in shared.outcome.finish) is not seen yet.
    await store.finish(BacktestResult(backtest_id="bt2", status="failed"))
    assert await store.ended("bt2") is None
    await store.release("bt2")
    assert await store.ended("bt2") == "failed"


async def test_store_replacing_while_reading_never_gives_a_broken_record(fresh_db: Db) -> None:
    store = mongo.MongoStore(fresh_db)
    versions = [_result("bt1", n) for n in (2_000, 3_000, 4_000)]
    await store.put_cached("k1", versions[0])
    writes = [store.put_cached("k1", versions[i % 3]) for i in range(6)]
    reads = [store.get_cached("k1") for _ in range(6)]
    done = await asyncio.gather(*writes, *reads)
    assert all(result in versions for result in done[6:])
    assert await store.get_cached("k1") in versions
    # On MongoDB exactly one body's chunks are left. FerretDB's findAndModify is not atomic
    # (two writers may both replace the same document), which can leave a replaced body's
    # chunks behind: garbage, never a broken record.
    assert await fresh_db["cache.chunks"].count_documents({}) >= 1


async def test_store_wal_is_appended_in_order_and_kept(fresh_db: Db) -> None:
    store = mongo.MongoStore(fresh_db)
    await store_contract.wal_is_appended_in_order_and_kept(store)
    # Blocks of up to 5,000 records, each by its first seq: 12,000 records are three documents.
    blocks = await fresh_db.wal.find({"backtest_id": "bt1"}).sort("seq", 1).to_list()
    assert [(b["_id"], b["next"]) for b in blocks] == [
        ("bt1/0", 5000),
        ("bt1/5000", 7000),
        ("bt1/7000", 12_000),
    ]
    # A log stored one record per document (before blocks) is not mixed with blocks.
    await fresh_db.wal.insert_one({"backtest_id": "old", "seq": 0, "record": {"seq": 0}})
    with pytest.raises(mongo.MongoDataError, match="record 0 is stored as a record of its own"):
        await store.put_wal("old", [{"seq": 0}, {"seq": 1}])
    with pytest.raises(ValueError, match="integer 'seq'"):
        await store.put_wal("bt1", [{"event": "entry"}])


# -- indexes and connections ------------------------------------------------------------------


async def test_indexes_are_unique_and_ensured_idempotently(fresh_db: Db) -> None:
    await mongo.ensure_indexes(fresh_db)  # the fixture ran it once already
    for collection, keys in [
        ("candles", [("symbol", 1), ("interval", 1), ("open_time", 1)]),
        ("batches", [("backtest_id", 1), ("unit_id", 1)]),
        ("wal", [("backtest_id", 1), ("seq", 1)]),
    ]:
        info = await fresh_db[collection].index_information()
        [index] = [i for i in info.values() if [(k, int(d)) for k, d in i["key"]] == keys]
        assert index.get("unique") is True, collection
    bar = {"symbol": "BTCUSDT", "interval": "1h", "open_time": 0, "close": 1.0}
    await fresh_db.candles.insert_one(dict(bar))
    with pytest.raises(DuplicateKeyError):
        await fresh_db.candles.insert_one({**bar, "close": 2.0})
    await fresh_db.wal.insert_one({"backtest_id": "b", "seq": 1})
    with pytest.raises(DuplicateKeyError):
        await fresh_db.wal.insert_one({"backtest_id": "b", "seq": 1})


async def test_ensure_indexes_refuses_what_would_break_uniqueness(
    mongo_server_url: str, fresh_db_name: str
) -> None:
    client = await mongo.connect(mongo_server_url, retries=0)
    try:
        db = client[fresh_db_name]
        bar = {"symbol": "BTCUSDT", "interval": "1h", "open_time": 0}
        await db.candles.insert_many([dict(bar), dict(bar)])
        # MongoDB answers DuplicateKey (MongoDataError: "remove the duplicates"); FerretDB an
        # internal error. Either way the message says what was being done.
        with pytest.raises(mongo.MongoError, match=r"creating the indexes of .*\.candles"):
            await mongo.ensure_indexes(db)
        await db.candles.drop()
        await db.candles.create_index([("symbol", 1), ("interval", 1), ("open_time", 1)])
        with pytest.raises(mongo.MongoConfigError, match=r"not unique|other options"):
            await mongo.ensure_indexes(db)
    finally:
        await client.close()


async def test_every_expiring_document_carries_stored_at_and_chunks_share_their_records(
    fresh_db: Db,
) -> None:
    store = mongo.MongoStore(fresh_db)
    await store.put_plan(store_contract.plan("done"))  # completed: its request is kept
    await store.finish(_result("done", trades=1))
    await store.put_plan(store_contract.plan("bt1"))
    await store.add_batch(_batch("bt1", "u0"))
    await store.claim("bt1", "host:1:0")
    await store.put_wal("bt1", [{"seq": 0, "event": "entry"}])
    # Cancelled: a completed backtest's batches, WAL and lease are gone with its outcome.
    await store.finish(BacktestResult(backtest_id="bt1", status="cancelled"))
    await store.put_cached("key", _result("bt1", trades=3))
    await store.put_described("key", StrategyInfo(lookback=3, units=[["BTCUSDT"]]))
    sweep = store_contract.plan("sw").request.model_dump(mode="json")
    sweep_plan, children = expand(
        BacktestRequest.model_validate({**sweep, "sweep": {"grid": {"n": [1, 2]}}})
    )
    await store.put_sweep(sweep_plan)
    await store.sweep_child_done("sw", children[0].id)

    for collection in mongo.EXPIRING:
        docs = await fresh_db[collection].find().to_list()
        assert docs, collection
        for doc in docs:
            assert isinstance(doc["stored_at"], datetime), collection
            # A chunk expires a grace period after its record: never before it.
            for chunk_id in doc.get("body", {}).get("chunks", []):
                chunk = await fresh_db[f"{collection}.chunks"].find_one({"_id": chunk_id})
                assert chunk is not None and chunk["stored_at"] == doc["stored_at"], collection


async def ttl_indexes(db: Db) -> dict[str, int]:
    """``{collection: expireAfterSeconds}`` of the TTL indexes on ``stored_at``."""
    found = {}
    for collection in await db.list_collection_names():
        for index in (await db[collection].index_information()).values():
            if "expireAfterSeconds" in index and index["key"] == [("stored_at", 1)]:
                found[collection] = int(index["expireAfterSeconds"])
    return found


async def test_retention_is_a_ttl_index_per_collection_or_the_services_own_sweep(
    fresh_db: Db,
) -> None:
    day = 86_400
    with structlog.testing.capture_logs() as logs:
        by_ttl = await mongo.ensure_indexes(fresh_db, retention_days=3)
        assert await mongo.ensure_indexes(fresh_db, retention_days=3) is by_ttl  # idempotent
    unsupported = [e for e in logs if "no TTL indexes" in e["event"]]
    if unsupported:  # FerretDB v1: "not implemented"; the services then sweep (see below)
        assert not by_ttl
        assert unsupported[0]["log_level"] == "warning"
        assert await ttl_indexes(fresh_db) == {}
        return
    assert by_ttl
    records = {c: 3 * day for c in mongo.EXPIRING}
    chunks = {f"{c}.chunks": 4 * day for c in ("plans", "batches", "results", "cache")}
    assert await ttl_indexes(fresh_db) == records | chunks
    await mongo.ensure_indexes(fresh_db, retention_days=5)  # a changed setting replaces them
    assert set((await ttl_indexes(fresh_db)).values()) == {5 * day, 6 * day}
    await mongo.ensure_indexes(fresh_db)  # None (ingest): retention left as it is
    assert set((await ttl_indexes(fresh_db)).values()) == {5 * day, 6 * day}
    await mongo.ensure_indexes(fresh_db, retention_days=0)  # keep forever
    assert await ttl_indexes(fresh_db) == {}

    # MongoDB's TTL monitor runs once a minute: an old result goes, a fresh one stays.
    await mongo.ensure_indexes(fresh_db, retention_days=1)
    old = datetime.now(UTC) - timedelta(days=2)
    await fresh_db.results.insert_many([{"_id": "old", "stored_at": old}, {"_id": "new"}])
    await fresh_db.results.update_one({"_id": "new"}, {"$set": {"stored_at": datetime.now(UTC)}})
    async with asyncio.timeout(180):
        while await fresh_db.results.find_one({"_id": "old"}) is not None:
            await asyncio.sleep(5)
    assert await fresh_db.results.find_one({"_id": "new"}) is not None


#: The collections holding the bodies of expiring documents.
BODY_CHUNKS = [f"{c}.chunks" for c in ("plans", "batches", "results", "cache")]


async def stored(db: Db, age: timedelta) -> None:
    """A document in every expiring collection (and chunk collection), stored ``age`` ago."""
    when = datetime.now(UTC) - age
    for name in [*mongo.EXPIRING, *BODY_CHUNKS]:
        await db[name].insert_one({"_id": f"{name}-{age.days}d", "stored_at": when})


async def test_expire_deletes_what_a_ttl_monitor_would_and_keeps_the_rest(fresh_db: Db) -> None:
    """A server without TTL indexes (the tests' FerretDB) still forgets old state: what is
    past the retention goes, its chunks a grace day later; sources and candles never."""
    await stored(fresh_db, timedelta(days=3))  # past a 2-day retention, chunks too
    await stored(fresh_db, timedelta(days=2, hours=12))  # past it; its chunks not yet
    await stored(fresh_db, timedelta(hours=1))  # fresh
    await fresh_db.sources.insert_one({"_id": "src", "stored_at": datetime(2000, 1, 1, tzinfo=UTC)})

    assert await mongo.expire(fresh_db, 0) == 0  # 0: kept forever
    deleted = await mongo.expire(fresh_db, 2)

    records = [*mongo.EXPIRING]
    assert deleted == 2 * len(records) + len(BODY_CHUNKS)
    for name in records:
        assert [d["_id"] for d in await fresh_db[name].find().to_list()] == [f"{name}-0d"]
    for name in BODY_CHUNKS:
        left = sorted(d["_id"] for d in await fresh_db[name].find().to_list())
        assert left == [f"{name}-0d", f"{name}-2d"]
    assert await fresh_db.sources.find_one({"_id": "src"}) is not None


async def test_a_service_on_a_server_without_ttl_indexes_sweeps_at_start(
    mongo_server_url: str, fresh_db: Db, fresh_db_name: str
) -> None:
    if await mongo.ensure_indexes(fresh_db, retention_days=1):
        pytest.skip("this server has TTL indexes: it expires documents itself")
    await stored(fresh_db, timedelta(days=3))
    await stored(fresh_db, timedelta(hours=1))
    settings = Settings(mongo_url=mongo_server_url, mongo_db=fresh_db_name, retention_days=1)

    async with lifespan(settings, needs=("store",), name="retention-test"):
        async with asyncio.timeout(60):
            while await fresh_db.results.find_one({"_id": "results-3d"}) is not None:
                await asyncio.sleep(0.2)
    assert await fresh_db.results.find_one({"_id": "results-0d"}) is not None


async def test_connect_retries_then_says_what_to_check() -> None:
    with pytest.raises(mongo.MongoUnavailable) as unavailable:
        await mongo.connect(
            "mongodb://stratorch:s3cret@127.0.0.1:9/",
            retries=1,
            retry_delay_s=0.01,
            serverSelectionTimeoutMS=200,
        )
    message = str(unavailable.value)
    assert "connecting to MongoDB at mongodb://stratorch:***@127.0.0.1:9/" in message
    assert "STRATORCH_MONGO_URL" in message
    assert "s3cret" not in message
    assert unavailable.value.__cause__ is not None
    with pytest.raises(mongo.MongoConfigError, match="cannot use the MongoDB URL http://x"):
        await mongo.connect("http://x")
    assert mongo.redact("mongodb://u:p@h1,h2/db?x=1") == "mongodb://u:***@h1,h2/db?x=1"
    assert mongo.redact("mongodb://h/") == "mongodb://h/"


async def test_candle_source_without_a_server_raises_mongo_unavailable() -> None:
    candles = mongo.MongoCandleSource("mongodb://127.0.0.1:9/", "x", serverSelectionTimeoutMS=200)
    async with candles:
        with pytest.raises(mongo.MongoUnavailable, match="loading BTCUSDT 1h candles"):
            await candles.load("BTCUSDT", Span("1h", **EVERYTHING))


def a_request(backtest_id: str) -> BacktestRequest:
    return BacktestRequest.model_validate(
        {
            "id": backtest_id,
            "strategy": "sma_cross",
            "symbols": ["BTCUSDT", "ETHUSDT"],
            "interval": "1h",
            "start": "2021-01-01",
            "end": "2021-02-01",
        }
    )


async def test_quota_admissions_never_overshoot_are_idempotent_and_heal(fresh_db: Db) -> None:
    store = mongo.MongoStore(fresh_db)
    quota = Quota(running=1, units=10)

    async def counted() -> list[str]:
        return sorted(d["_id"] for d in await fresh_db.active.find({"tenant": "alice"}).to_list())

    # Five racing for one place: never more than one gets it (at the edge, maybe none).
    decided = await asyncio.gather(*(store.admit("alice", f"bt{i}", 2, quota) for i in range(5)))
    assert decided.count(Admission.ADMITTED) <= 1, decided
    if Admission.ADMITTED in decided:
        winner = f"bt{decided.index(Admission.ADMITTED)}"
    else:
        winner = "bt0"
        assert await store.admit("alice", winner, 2, quota) is Admission.ADMITTED
    assert await counted() == [winner]
    assert await store.admit("alice", winner, 2, quota) is Admission.ADMITTED  # again: no-op
    assert await store.admit("alice", "bt-other", 2, quota) is Admission.OVER_QUOTA
    # A request refused for its quota takes no id: it stays free.
    with pytest.raises(OverQuota, match="1 backtest running at once"):
        await admit_request(store, a_request("bt-other"), tenant="alice", quota=quota)
    assert await store.get_accepted("bt-other") is None
    # An id has one owner, a tenant's request: another's cannot take it, nor change it.
    mine = a_request(winner)
    owner = Owner(mine.fingerprint(), "alice")
    assert await store.accept(winner, mine.fingerprint(), tenant="alice") is None
    assert await store.accept(winner, "0" * 64, tenant="alice") == owner
    with pytest.raises(IdTaken) as taken:
        await admit_request(store, mine, tenant="bob", quota=quota)
    assert taken.value.of_another_tenant
    assert await store.get_accepted(winner) == owner
    assert await store.admit("bob", "bob-1", 2, quota) is Admission.ADMITTED  # not held up
    assert await counted() == [winner]

    # Its end releases it (once, however often).
    await finish(store, BacktestResult(backtest_id=winner, status="completed"))
    assert await counted() == []
    await store.release(winner)
    assert await store.admit("alice", "bt-other", 10, quota) is Admission.ADMITTED
    assert await store.admit("alice", "bt-big", 11, Quota(units=10)) is Admission.OVER_QUOTA

    # A backtest whose end was never seen: it has a result but was never released.
    await store.finish(BacktestResult(backtest_id="bt-other", status="failed"))
    assert await store.admit("alice", "bt-after", 1, quota) is Admission.ADMITTED
    # ... or it was admitted long ago and never ended.
    await fresh_db.active.update_one(
        {"_id": "bt-after"},
        {"$set": {"since": datetime.now(UTC) - timedelta(seconds=STALE_AFTER_S + 60)}},
    )
    assert await store.admit("alice", "bt-later", 1, quota) is Admission.ADMITTED
    assert await counted() == ["bt-later"]
