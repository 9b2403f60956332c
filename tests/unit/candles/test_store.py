"""The local Parquet candle store: what a backtest reads and what an ingest writes."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import shared.candles.store as store_module
from shared.candles import ParquetCandleStore, Span, validate_frame
from shared.errors import NoDataError

from ._klines import candles

HOUR = 3_600_000
T0 = 1_606_780_800_000  # 2020-12-01 00:00 UTC
TIMES = T0 + HOUR * np.arange(48)


@pytest.fixture
def store(tmp_path: Path) -> ParquetCandleStore:
    store = ParquetCandleStore(tmp_path / "store")
    store.write("BTCUSDT", "1h", candles(TIMES))
    return store


def test_files_live_at_interval_slash_symbol(store: ParquetCandleStore) -> None:
    assert (store.root / "1h" / "BTCUSDT.parquet").is_file()
    assert list((store.root / "1h").iterdir()) == [store.root / "1h" / "BTCUSDT.parquet"]


def test_read_gives_back_exactly_what_was_written(store: ParquetCandleStore) -> None:
    frame = store.read("btcusdt", "1h", start_ms=0, end_ms=2**62)
    validate_frame(frame)
    pd.testing.assert_frame_equal(frame, candles(TIMES))


def test_start_is_inclusive_and_end_exclusive(store: ParquetCandleStore) -> None:
    frame = store.read("BTCUSDT", "1h", start_ms=int(TIMES[10]), end_ms=int(TIMES[20]))
    assert frame["open_time"].tolist() == TIMES[10:20].tolist()
    between = store.read("BTCUSDT", "1h", start_ms=int(TIMES[10]) + 1, end_ms=int(TIMES[20]) + 1)
    assert between["open_time"].tolist() == TIMES[11:21].tolist()


def test_lookback_prepends_exactly_that_many_earlier_rows(store: ParquetCandleStore) -> None:
    frame = store.read("BTCUSDT", "1h", start_ms=int(TIMES[10]), end_ms=int(TIMES[20]), lookback=4)
    assert frame["open_time"].tolist() == TIMES[6:20].tolist()
    assert frame.index.equals(pd.RangeIndex(14))


def test_lookback_is_cut_at_the_first_stored_bar(store: ParquetCandleStore) -> None:
    frame = store.read("BTCUSDT", "1h", start_ms=int(TIMES[3]), end_ms=int(TIMES[5]), lookback=50)
    assert frame["open_time"].tolist() == TIMES[:5].tolist()


def test_lookback_counts_rows_not_time_across_gaps(tmp_path: Path) -> None:
    store = ParquetCandleStore(tmp_path)
    gappy = np.delete(TIMES, [7, 8, 9])
    store.write("ETHUSDT", "1h", candles(gappy))
    frame = store.read("ETHUSDT", "1h", start_ms=int(TIMES[10]), end_ms=int(TIMES[12]), lookback=3)
    assert frame["open_time"].tolist() == [*TIMES[4:7], *TIMES[10:12]]


def _hundred_bars(
    root: Path, monkeypatch: pytest.MonkeyPatch, *, rows_per_group: int
) -> tuple[ParquetCandleStore, pd.DataFrame]:
    """A store of 100 BTCUSDT 1h bars in row groups of ``rows_per_group``, and the bars."""
    monkeypatch.setattr(store_module, "_ROW_GROUP_ROWS", rows_per_group)
    store = ParquetCandleStore(root)
    everything = candles(T0 + HOUR * np.arange(100))
    store.write("BTCUSDT", "1h", everything)
    return store, everything


def test_reads_across_many_row_groups_match_plain_slicing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, everything = _hundred_bars(tmp_path, monkeypatch, rows_per_group=7)
    times = everything["open_time"].to_numpy()
    rng = np.random.default_rng(7)
    for _ in range(200):
        start, end = sorted(int(x) for x in rng.integers(0, 101, size=2))
        if start == end:
            continue
        lookback = int(rng.integers(0, 30))
        frame = store.read(
            "BTCUSDT",
            "1h",
            start_ms=int(times[start]),
            end_ms=int(times[end]) if end < 100 else 2**62,
            lookback=lookback,
        )
        expected = everything.iloc[max(start - lookback, 0) : end].reset_index(drop=True)
        pd.testing.assert_frame_equal(frame, expected)


def test_write_merges_and_counts_only_new_bars(store: ParquetCandleStore) -> None:
    update = candles(T0 + HOUR * np.arange(40, 56), close_offset=0.25)  # 8 overlap, 8 new
    assert store.write("BTCUSDT", "1h", update) == (8, 8)  # 8 new, 8 replaced (other closes)
    frame = store.read("BTCUSDT", "1h", start_ms=0, end_ms=2**62)
    assert len(frame) == 56
    assert frame["close"].iloc[47] == update["close"].iloc[7]  # the new rows win
    assert frame["close"].iloc[39] == candles(TIMES)["close"].iloc[39]
    assert store.write("BTCUSDT", "1h", update) == (0, 0)  # the same values: nothing changes
    assert [p.name for p in (store.root / "1h").iterdir()] == ["BTCUSDT.parquet"]  # no temp files


def test_write_refuses_a_frame_that_is_not_canonical(store: ParquetCandleStore) -> None:
    with pytest.raises(ValueError, match="column 'trades' is float64, expected int64"):
        store.write("BTCUSDT", "1h", candles(TIMES).astype({"trades": "float64"}))
    with pytest.raises(ValueError, match="open_time is not strictly increasing"):
        store.write("BTCUSDT", "1h", candles(TIMES[::-1]))


def test_missing_symbol_lists_what_the_store_has(store: ParquetCandleStore) -> None:
    store.write("ETHUSDT", "1h", candles(TIMES))
    store.write("SOLUSDT", "4h", candles(TIMES[::4]))
    with pytest.raises(NoDataError) as caught:
        store.read("SOLUSDT", "1h", start_ms=0, end_ms=2**62)
    error = caught.value
    assert (error.kind, error.symbol) == ("no_data", "SOLUSDT")
    assert "no 1h candles for SOLUSDT" in error.message
    assert "It has 1h candles for BTCUSDT, ETHUSDT." in error.message
    assert "SOLUSDT is stored at 4h." in error.message
    assert "stratorch ingest binance" in error.message


def test_missing_interval_says_so(store: ParquetCandleStore) -> None:
    with pytest.raises(
        NoDataError, match=r"It has no 1d candles for any symbol\. BTCUSDT is stored at 1h\."
    ):
        store.read("BTCUSDT", "1d", start_ms=0, end_ms=2**62)


def test_empty_range_gives_the_range_the_store_has(store: ParquetCandleStore) -> None:
    with pytest.raises(NoDataError) as caught:
        store.read("BTCUSDT", "1h", start_ms=T0 - 10 * HOUR, end_ms=T0)
    assert caught.value.symbol == "BTCUSDT"
    assert (
        "no BTCUSDT 1h candles from 2020-11-30 14:00:00 UTC to 2020-12-01 00:00:00 UTC "
        "(end exclusive); the candle store has 48 bars from 2020-12-01 00:00:00 UTC to "
        "2020-12-02 23:00:00 UTC"
    ) in caught.value.message


def test_a_symbol_that_cannot_exist_is_no_data(store: ParquetCandleStore) -> None:
    with pytest.raises(NoDataError, match=r"'\.\./1h/BTCUSDT' is not a Binance symbol"):
        store.read("../1h/BTCUSDT", "1h", start_ms=0, end_ms=2**62)


def test_symbols_lists_the_stored_symbols_of_an_interval(store: ParquetCandleStore) -> None:
    store.write("ethusdt", "1h", candles(TIMES))
    assert store.symbols("1h") == ["BTCUSDT", "ETHUSDT"]
    assert store.symbols("4h") == []
    with pytest.raises(ValueError, match="unknown interval '1H'"):
        store.symbols("1H")


async def test_load_reads_in_a_worker_thread_so_the_event_loop_keeps_running(
    store: ParquetCandleStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread, read = threading.current_thread(), store.read
    reading: list[threading.Thread] = []
    release = threading.Event()

    def slow_read(*args: Any, **kwargs: Any) -> pd.DataFrame:
        reading.append(threading.current_thread())
        assert release.wait(timeout=10), "the event loop was blocked while the read ran"
        return read(*args, **kwargs)

    monkeypatch.setattr(store, "read", slow_read)
    loading = asyncio.create_task(
        store.load("BTCUSDT", Span("1h", int(TIMES[5]), int(TIMES[9]), lookback=2))
    )
    async with asyncio.timeout(10):
        while not reading:  # the loop keeps running while the read waits
            await asyncio.sleep(0.01)
    assert not loading.done()
    release.set()
    frame = await loading
    assert frame["open_time"].tolist() == TIMES[3:9].tolist()
    assert reading[0] is not loop_thread


async def test_as_a_port_it_opens_and_closes_with_nothing_to_release(
    store: ParquetCandleStore,
) -> None:
    async with store as source:
        assert source is store
        inside = await source.load("BTCUSDT", Span("1h", int(TIMES[5]), int(TIMES[9])))
    await store.aclose()  # closing again is harmless
    after = await store.load("BTCUSDT", Span("1h", int(TIMES[5]), int(TIMES[9])))
    pd.testing.assert_frame_equal(inside, after)  # and it still reads: nothing was released
    assert after["open_time"].tolist() == TIMES[5:9].tolist()
    with pytest.raises(NoDataError):
        await store.load("XRPUSDT", Span("1h", start_ms=0, end_ms=1))


async def test_the_fingerprint_changes_exactly_with_the_window_s_bars_and_reads_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, everything = _hundred_bars(tmp_path, monkeypatch, rows_per_group=10)
    window = Span("1h", int(everything["open_time"][40]), int(everything["open_time"][60]), 5)

    def reading(*args: Any, **kwargs: Any) -> pd.DataFrame:
        raise AssertionError("the fingerprint read candles")

    async def fingerprint(w: Span = window) -> str:
        with monkeypatch.context() as patch:
            patch.setattr(ParquetCandleStore, "read", reading)
            return await store.fingerprint("BTCUSDT", w)

    before = await fingerprint()
    assert before == await fingerprint() != "no_data"
    assert await fingerprint(window._replace(lookback=6)) != before
    store.write("BTCUSDT", "1h", candles(T0 + HOUR * np.arange(100, 130)))  # appended
    store.write("BTCUSDT", "1h", candles(T0 + HOUR * np.arange(5, 7), close_offset=1.0))
    assert await fingerprint() == before  # bars far outside the window changed
    store.write("BTCUSDT", "1h", candles(T0 + HOUR * np.arange(36, 37), close_offset=1.0))
    in_warm_up = await fingerprint()
    assert in_warm_up != before
    store.write("BTCUSDT", "1h", candles(T0 + HOUR * np.arange(59, 60), close_offset=1.0))
    assert await fingerprint() not in (before, in_warm_up)
    assert await fingerprint(Span("1h", 0, T0)) == "no_data"
    assert await fingerprint(Span("1h", T0 + HOUR * 500, T0 + HOUR * 600)) == "no_data"
    assert await fingerprint(window._replace(interval="4h")) == "no_data"


async def test_a_file_written_without_content_hashes_is_fingerprinted_by_its_bars(
    tmp_path: Path,
) -> None:
    store = ParquetCandleStore(tmp_path)
    store.write("BTCUSDT", "1h", candles(TIMES))
    path = tmp_path / "1h" / "BTCUSDT.parquet"
    pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)  # as before them
    window = Span("1h", int(TIMES[10]), int(TIMES[20]), 3)

    before = await store.fingerprint("BTCUSDT", window)
    bars = store.read("BTCUSDT", "1h", start_ms=window.start_ms, end_ms=window.end_ms, lookback=3)
    digest = hashlib.sha256(b"".join(bars[c].to_numpy().tobytes() for c in bars.columns))
    assert before == digest.hexdigest()
    assert await store.fingerprint("BTCUSDT", window._replace(end_ms=int(TIMES[0]))) == "no_data"
