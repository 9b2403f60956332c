"""Columnar candles in MongoDB on a real Mongo wire-protocol server: round trips bit-identical
with the Parquet store, re-ingests, fingerprints, the conversion of the per-bar layout and the
worker's chunk cache. Each test has a database of its own (see ``mongo_fixtures``)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pymongo import monitoring

from shared import mongo
from shared.candles import ParquetCandleStore, Span
from shared.errors import NoDataError
from shared.mongo.chunks import content_hash
from stratorch.cli import main
from tests.integration.mongo_fixtures import fresh_db, fresh_db_name, mongo_server_url
from tests.integration.test_mongo import EVERYTHING, HOUR, SAMPLE, assert_identical, sample
from tests.unit.test_chunks import first_codec

pytestmark = pytest.mark.integration
__all__ = ["fresh_db", "fresh_db_name", "mongo_server_url"]  # fixtures, used by name

Db = Any
MINUTE = 60_000
CHUNKS_1H = "candle_chunks.BTCUSDT.1h"  # the collection of the series' chunks


def ms(text: str) -> int:
    return int(pd.Timestamp(text, tz="UTC").value // 1_000_000)


def minute_bars(*starts: tuple[str, int]) -> pd.DataFrame:
    """1m bars: for each ``(start, n)``, ``n`` bars from ``start`` (UTC), with the values of
    the sample's BTCUSDT bars, in order."""
    times = np.concatenate([ms(start) + MINUTE * np.arange(n) for start, n in starts])
    frame = sample("BTCUSDT", slice(None, len(times)))
    frame["open_time"] = times
    frame["close_time"] = times + MINUTE - 1
    return frame


def bumped(frame: pd.DataFrame, rows: list[int]) -> pd.DataFrame:
    """Those rows of ``frame`` with the smallest change there is to their close."""
    bars = frame.iloc[rows].reset_index(drop=True)
    bars["close"] = np.nextafter(bars["close"], np.inf)
    bars["high"] = np.maximum(bars["high"], bars["close"])
    return bars


class FindCounter(monitoring.CommandListener):
    """Counts the ``find`` commands a client sends, by collection: what the server is asked
    for, seen by the driver (no fake server in between)."""

    def __init__(self) -> None:
        self.finds: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find":
            self.finds[event.command["find"]] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def source(url: str, database: str, **options: Any) -> mongo.MongoCandleSource:
    return mongo.MongoCandleSource(url, database, **options)


async def test_round_trip_is_bit_identical_to_parquet(
    fresh_db: Db, mongo_server_url: str, tmp_path: Path
) -> None:
    frame = sample("BTCUSDT")  # 1h, 2020-12 to 2021-07: two yearly chunks
    assert await mongo.write_chunks(fresh_db, "btcusdt", "1h", frame) == (len(frame), 0)
    await mongo.write_chunks(fresh_db, "ETHUSDT", "1h", sample("ETHUSDT", slice(None, 300)))
    manifest = await fresh_db.candle_series.find_one({"_id": "BTCUSDT/1h"})
    assert [c["period"] for c in manifest["chunks"]] == ["2020", "2021"]
    for chunk in manifest["chunks"]:
        assert chunk["id"] == f"BTCUSDT/1h/{chunk['period']}/{chunk['hash'][:16]}"
    assert manifest["count"] == len(frame)
    t = frame["open_time"].to_numpy()
    new_year = int(np.searchsorted(t, ms("2021-01-01")))
    cases = [
        EVERYTHING,
        {"start_ms": ms("2020-12-31 20:00"), "end_ms": ms("2021-01-01 05:00")},  # across
        {"start_ms": ms("2021-01-01"), "end_ms": ms("2021-02-01"), "lookback": 50},  # warm-up
        {"start_ms": int(t[new_year + 3]), "end_ms": int(t[-1]), "lookback": 3},  # within 2021
        {"start_ms": int(t[10]), "end_ms": int(t[20]), "lookback": 100},  # short warm-up
        {"start_ms": int(t[100]) + 1, "end_ms": int(t[200]) - 1, "lookback": 3},  # unaligned
        {"start_ms": int(t[-3]), "end_ms": int(t[-1]) + 100 * HOUR, "lookback": 2},  # past end
        {"start_ms": int(t[0]) - 100 * HOUR, "end_ms": int(t[3]), "lookback": 7},  # before
    ]
    async with source(mongo_server_url, fresh_db.name) as candles:
        for case in cases:
            want = SAMPLE.read("BTCUSDT", "1h", **case)
            assert_identical(await candles.load("BTCUSDT", Span("1h", **case)), want)
        with pytest.raises(NoDataError, match="has 5482 bars from 2020-12-01 00:00:00 UTC") as none:
            await candles.load("BTCUSDT", Span("1h", start_ms=0, end_ms=HOUR))
        assert ".candle_series" in none.value.message
        with pytest.raises(NoDataError, match="It has 1h candles for BTCUSDT, ETHUSDT"):
            await candles.load("DOGEUSDT", Span("1h", **EVERYTHING))


async def test_partial_windows_across_month_chunks_with_lookback(
    fresh_db: Db, mongo_server_url: str, tmp_path: Path
) -> None:
    # Sparse 1m bars in four monthly chunks; January's holds just 30 bars, so a long warm-up
    # for a March window reaches back through February into it.
    frame = minute_bars(
        ("2024-01-31 23:30", 30),
        ("2024-02-29 23:00", 120),
        ("2024-03-31 23:50", 20),
        ("2024-04-01 00:20", 40),
    )
    parquet = ParquetCandleStore(tmp_path)
    parquet.write("BTCUSDT", "1m", frame)
    await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", frame)
    manifest = await fresh_db.candle_series.find_one({"_id": "BTCUSDT/1m"})
    assert [(c["period"], c["count"]) for c in manifest["chunks"]] == [
        ("2024-01", 30),
        ("2024-02", 60),
        ("2024-03", 70),
        ("2024-04", 50),
    ]
    cases = [
        {"start_ms": ms("2024-02-29 23:30"), "end_ms": ms("2024-03-01 00:30")},
        {"start_ms": ms("2024-03-01"), "end_ms": ms("2024-04-01 00:05"), "lookback": 70},
        {"start_ms": ms("2024-03-31 23:55"), "end_ms": ms("2024-04-01 00:30"), "lookback": 500},
        {"start_ms": ms("2024-04-01 00:10"), "end_ms": ms("2024-05-01"), "lookback": 1},
    ]
    async with source(mongo_server_url, fresh_db.name) as candles:
        for case in cases:
            want = parquet.read("BTCUSDT", "1m", **case)
            assert_identical(await candles.load("BTCUSDT", Span("1m", **case)), want)
        # A window in a gap of a chunk's bars: no data, as in the Parquet store.
        gap = Span("1m", ms("2024-04-01 00:10"), ms("2024-04-01 00:20"))
        with pytest.raises(NoDataError):
            parquet.read("BTCUSDT", "1m", start_ms=gap.start_ms, end_ms=gap.end_ms)
        with pytest.raises(NoDataError, match="has 210 bars from 2024-01-31 23:30:00"):
            await candles.load("BTCUSDT", gap)


async def test_reingesting_an_overlapping_range_rewrites_only_the_touched_chunks(
    fresh_db: Db, mongo_server_url: str, tmp_path: Path
) -> None:
    frame = minute_bars(("2024-01-31 23:00", 120), ("2024-03-15", 60))
    parquet = ParquetCandleStore(tmp_path)
    assert parquet.write("BTCUSDT", "1m", frame.iloc[:90].reset_index(drop=True)) == (90, 0)
    assert await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", frame.iloc[:90]) == (90, 0)
    before = await fresh_db.candle_series.find_one({"_id": "BTCUSDT/1m"})
    # Overlapping: two bars of February changed, 30 new ones after them, March new.
    again = pd.concat([bumped(frame, [70, 71]), frame.iloc[72:]], ignore_index=True)
    assert parquet.write("BTCUSDT", "1m", again) == (90, 2)
    assert await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", again) == (90, 2)
    after = await fresh_db.candle_series.find_one({"_id": "BTCUSDT/1m"})
    ids = {c["period"]: c["id"] for c in after["chunks"]}
    assert ids["2024-01"] == before["chunks"][0]["id"]  # not touched, not written
    assert ids["2024-02"] != before["chunks"][1]["id"]
    assert after["count"] == len(frame) and after["revision"] == before["revision"] + 1
    # The replaced chunk is gone; nothing but what the manifest names is left.
    stored = await fresh_db["candle_chunks.BTCUSDT.1m.2024"].find({}, {"_id": 1}).to_list()
    assert sorted(doc["_id"] for doc in stored) == sorted(ids.values())
    # The same bars again: nothing written.
    assert await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", again) == (0, 0)
    assert (await fresh_db.candle_series.find_one({"_id": "BTCUSDT/1m"}))["revision"] == (
        after["revision"]
    )
    async with source(mongo_server_url, fresh_db.name) as candles:
        want = parquet.read("BTCUSDT", "1m", **EVERYTHING)
        assert_identical(await candles.load("BTCUSDT", Span("1m", **EVERYTHING)), want)


async def test_fingerprint_changes_when_a_touched_chunk_does_and_not_otherwise(
    fresh_db: Db, mongo_server_url: str
) -> None:
    # January, February, March and April chunks; the window is in March, with a warm-up
    # longer than March's bars before it, so February is touched too, January and April not.
    frame = minute_bars(
        ("2024-01-15", 50), ("2024-02-15", 50), ("2024-03-15", 50), ("2024-04-15", 50)
    )
    await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", frame)
    window = Span("1m", ms("2024-03-15 00:20"), ms("2024-03-15 00:40"), lookback=30)
    listener = FindCounter()
    async with source(mongo_server_url, fresh_db.name, event_listeners=[listener]) as candles:

        async def fingerprint(w: Span = window) -> str:
            return await candles.fingerprint("BTCUSDT", w)

        before = await fingerprint()
        assert before.startswith("chunks:") and before == await fingerprint()
        assert listener.finds == {"candle_series": 2}  # the manifest, by _id, and nothing else
        assert await fingerprint(window._replace(lookback=31)) != before
        await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", frame)
        assert await fingerprint() == before
        for untouched in (10, 160):  # January, April
            await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", bumped(frame, [untouched]))
        assert await fingerprint() == before
        await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", bumped(frame, [60]))  # February
        in_warm_up = await fingerprint()
        assert in_warm_up != before
        await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", bumped(frame, [149]))  # March
        assert await fingerprint() not in (before, in_warm_up)
        assert await fingerprint(Span("1m", 0, ms("2024-01-01"))) == "no_data"
        assert await fingerprint(Span("1h", **EVERYTHING)) == "no_data"
        assert await candles.fingerprint("DOGEUSDT", window) == "no_data"


async def test_the_per_bar_collection_is_read_then_converted(
    fresh_db: Db, mongo_server_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.setattr("stratorch.cli.configure", lambda level: None)
    btc, eth = sample("BTCUSDT", slice(None, 1500)), sample("ETHUSDT", slice(None, 300))
    await mongo.write_candles(fresh_db, "BTCUSDT", "1h", btc)
    await mongo.write_candles(fresh_db, "ETHUSDT", "1h", eth)
    window = Span("1h", ms("2020-12-30"), ms("2021-01-03"), lookback=20)
    async with source(mongo_server_url, fresh_db.name) as candles:
        per_bar = await candles.fingerprint("BTCUSDT", window)
        assert per_bar.startswith("mongo:")  # no manifest: the per-bar layout
        assert_identical(
            await candles.load("BTCUSDT", window),
            SAMPLE.read(
                "BTCUSDT", "1h", start_ms=window.start_ms, end_ms=window.end_ms, lookback=20
            ),
        )

        convert = ["ingest", "mongo", "--from-collection", "candles", "--mongo", mongo_server_url]
        assert await asyncio.to_thread(main, [*convert, "--mongo-db", fresh_db.name]) == 0
        out = capsys.readouterr().out
        assert f"BTCUSDT 1h: {len(btc)} new bars, 0 stored bars replaced" in out
        assert f"ETHUSDT 1h: {len(eth)} new bars, 0 stored bars replaced" in out
        assert await fresh_db.candles.count_documents({}) == len(btc) + len(eth)  # left as is

        assert (await candles.fingerprint("BTCUSDT", window)).startswith("chunks:")
        assert_identical(await candles.load("BTCUSDT", Span("1h", **EVERYTHING)), btc)
        assert_identical(await candles.load("ETHUSDT", Span("1h", **EVERYTHING)), eth)
        # Converting again merges: nothing new.
        assert await asyncio.to_thread(main, [*convert, "--mongo-db", fresh_db.name]) == 0
        assert "BTCUSDT 1h: 0 new bars, 0 stored bars replaced" in capsys.readouterr().out
        # A series read in several batches is written in as many merges.
        ada = sample("ADAUSDT", slice(None, 1200))
        await mongo.write_candles(fresh_db, "ADAUSDT", "1h", ada)
        assert await mongo.convert_collection(fresh_db, batch=500) == [
            ("ADAUSDT", "1h", (len(ada), 0)),
            ("BTCUSDT", "1h", (0, 0)),
            ("ETHUSDT", "1h", (0, 0)),
        ]
        assert_identical(await candles.load("ADAUSDT", Span("1h", **EVERYTHING)), ada)


async def test_the_chunk_cache_serves_a_repeated_load_from_memory(
    fresh_db: Db, mongo_server_url: str
) -> None:
    frame = sample("BTCUSDT")
    await mongo.write_chunks(fresh_db, "BTCUSDT", "1h", frame)
    listener = FindCounter()
    cache = mongo.ChunkCache(64 * 2**20)
    options = {"cache": cache, "event_listeners": [listener]}
    async with source(mongo_server_url, fresh_db.name, **options) as candles:
        everything = Span("1h", **EVERYTHING)
        assert_identical(await candles.load("BTCUSDT", everything), frame)
        assert listener.finds == {"candle_series": 1, CHUNKS_1H: 1}
        for _ in range(3):  # the same, and a part of it: the manifest only
            assert_identical(await candles.load("BTCUSDT", everything), frame)
        part = {"start_ms": ms("2021-01-01"), "end_ms": ms("2021-03-01"), "lookback": 10}
        assert_identical(
            await candles.load("BTCUSDT", Span("1h", **part)),
            SAMPLE.read("BTCUSDT", "1h", **part),
        )
        assert listener.finds == {"candle_series": 5, CHUNKS_1H: 1}
        # A re-ingested chunk has another hash: read once, then cached in turn.
        await mongo.write_chunks(fresh_db, "BTCUSDT", "1h", bumped(frame, [len(frame) - 1]))
        for _ in range(2):
            await candles.load("BTCUSDT", everything)
        assert listener.finds == {"candle_series": 7, CHUNKS_1H: 2}


async def test_the_chunk_cache_stays_within_its_bound(fresh_db: Db, mongo_server_url: str) -> None:
    frame = minute_bars(("2024-01-10", 1000), ("2024-02-10", 1000), ("2024-03-10", 1000))
    await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", frame)
    chunk_bytes = 1000 * 88
    cache = mongo.ChunkCache(2 * chunk_bytes + chunk_bytes // 2)  # room for two chunks
    listener = FindCounter()
    options = {"cache": cache, "event_listeners": [listener]}
    months = [Span("1m", ms(f"2024-0{m}-01"), ms(f"2024-0{m + 1}-01")) for m in (1, 2, 3)]
    async with source(mongo_server_url, fresh_db.name, **options) as candles:
        for window in [*months, months[2], months[1], months[0]]:
            await candles.load("BTCUSDT", window)
            assert cache.bytes <= cache.max_bytes and len(cache) <= 2
        # January, February, March read; January (least recently used) dropped for March;
        # March and February then hits; January read again, dropping March.
        assert listener.finds["candle_chunks.BTCUSDT.1m.2024"] == 4
        assert (cache.hits, cache.misses) == (2, 4)


async def test_a_malformed_chunk_is_named(fresh_db: Db, mongo_server_url: str) -> None:
    await mongo.write_chunks(fresh_db, "BTCUSDT", "1h", sample("BTCUSDT", slice(None, 10)))
    [chunk] = await fresh_db[CHUNKS_1H].find({}, {"_id": 1}).to_list()
    await fresh_db[CHUNKS_1H].update_one({"_id": chunk["_id"]}, {"$set": {"close": b"x"}})
    async with source(mongo_server_url, fresh_db.name) as candles:
        with pytest.raises(mongo.MongoDataError, match=f"chunk '{chunk['_id']}'.*'close'"):
            await candles.load("BTCUSDT", Span("1h", **EVERYTHING))


async def test_years_are_collections_of_their_own_read_at_once(
    fresh_db: Db, mongo_server_url: str, tmp_path: Path
) -> None:
    frame = minute_bars(("2022-12-31 23:00", 90), ("2023-06-01", 30), ("2024-02-01", 40))
    parquet = ParquetCandleStore(tmp_path)
    parquet.write("BTCUSDT", "1m", frame)
    await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", frame)
    manifest = await fresh_db.candle_series.find_one({"_id": "BTCUSDT/1m"})
    assert [(c["period"], c["collection"]) for c in manifest["chunks"]] == [
        ("2022-12", "candle_chunks.BTCUSDT.1m.2022"),
        ("2023-01", "candle_chunks.BTCUSDT.1m.2023"),
        ("2023-06", "candle_chunks.BTCUSDT.1m.2023"),
        ("2024-02", "candle_chunks.BTCUSDT.1m.2024"),
    ]
    listener = FindCounter()
    async with source(mongo_server_url, fresh_db.name, event_listeners=[listener]) as candles:
        assert_identical(
            await candles.load("BTCUSDT", Span("1m", **EVERYTHING)),
            parquet.read("BTCUSDT", "1m", **EVERYTHING),
        )
        assert listener.finds == {
            "candle_series": 1,
            "candle_chunks.BTCUSDT.1m.2022": 1,
            "candle_chunks.BTCUSDT.1m.2023": 1,
            "candle_chunks.BTCUSDT.1m.2024": 1,
        }
        june = {"start_ms": ms("2023-06-01"), "end_ms": ms("2023-07-01"), "lookback": 5}
        assert_identical(
            await candles.load("BTCUSDT", Span("1m", **june)),
            parquet.read("BTCUSDT", "1m", **june),
        )
        assert listener.finds["candle_chunks.BTCUSDT.1m.2023"] == 2  # one year's collection
        assert listener.finds["candle_chunks.BTCUSDT.1m.2022"] == 1


async def test_a_series_written_before_codecs_and_years_still_reads_and_moves_on_rewrite(
    fresh_db: Db, mongo_server_url: str, tmp_path: Path
) -> None:
    """Chunks of the first codec in the series' collection, named by a manifest without
    collections: read as they are; a period written again goes to its year's collection."""
    frame = minute_bars(("2024-01-31 23:00", 120))
    parquet = ParquetCandleStore(tmp_path)
    parquet.write("BTCUSDT", "1m", frame)
    entries, legacy = [], fresh_db["candle_chunks.BTCUSDT.1m"]
    for period, bars in (("2024-01", frame.iloc[:60]), ("2024-02", frame.iloc[60:])):
        columns = {name: bars[name].to_numpy() for name in bars}
        digest = content_hash(columns)
        entry = {
            "id": f"BTCUSDT/1m/{period}/{digest[:16]}",
            "period": period,
            "count": len(bars),
            "first": int(bars["open_time"].iloc[0]),
            "last": int(bars["open_time"].iloc[-1]),
            "hash": digest,
        }
        doc = {"symbol": "BTCUSDT", "interval": "1m", **entry, **first_codec(columns, {})}
        await legacy.insert_one({"_id": doc.pop("id"), **doc})
        entries.append(entry)
    await fresh_db.candle_series.insert_one(
        {
            "_id": "BTCUSDT/1m",
            "symbol": "BTCUSDT",
            "interval": "1m",
            "revision": 1,
            "count": len(frame),
            "first": entries[0]["first"],
            "last": entries[-1]["last"],
            "chunks": entries,
        }
    )
    async with source(mongo_server_url, fresh_db.name) as candles:
        everything = Span("1m", **EVERYTHING)
        assert_identical(await candles.load("BTCUSDT", everything), frame)
        changed = bumped(frame, [100])
        assert await mongo.write_chunks(fresh_db, "BTCUSDT", "1m", changed) == (0, 1)
        manifest = await fresh_db.candle_series.find_one({"_id": "BTCUSDT/1m"})
        assert [c.get("collection") for c in manifest["chunks"]] == [
            None,
            "candle_chunks.BTCUSDT.1m.2024",
        ]
        assert [d["_id"] for d in await legacy.find({}, {"_id": 1}).to_list()] == [
            entries[0]["id"]  # February's old chunk deleted
        ]
        parquet.write("BTCUSDT", "1m", changed)
        want = parquet.read("BTCUSDT", "1m", **EVERYTHING)
        assert_identical(await candles.load("BTCUSDT", everything), want)
