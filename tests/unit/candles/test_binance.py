"""Reading and ingesting Binance kline files, as a user running `stratorch ingest` sees it."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from shared.candles import (
    CANDLE_COLUMNS,
    IngestReport,
    ParquetCandleStore,
    ingest_binance,
    read_binance_klines,
    validate_frame,
)
from shared.errors import IngestError

from ._klines import ADABTC_1M, rows, to_micros, write_csv


@pytest.fixture
def candles(tmp_path: Path) -> ParquetCandleStore:
    return ParquetCandleStore(tmp_path / "candles")


@pytest.fixture
def reference(tmp_path: Path) -> pd.DataFrame:
    """The ADABTC rows parsed from a plain, header-less CSV."""
    return read_binance_klines(write_csv(tmp_path / "ref.csv", rows()), interval="1m")


# --- well-formed files ---------------------------------------------------------------------


def test_csv_without_header_gives_the_canonical_frame(reference: pd.DataFrame) -> None:
    validate_frame(reference)
    assert dict(reference.dtypes) == dict(CANDLE_COLUMNS)
    assert len(reference) == 10
    first = reference.iloc[0]
    assert first["open_time"] == 1637971200000
    assert first["close_time"] == 1637971259999
    assert first["open"] == float("0.00002853")
    assert first["volume"] == float("36304.20000000")
    assert first["quote_volume"] == float("1.03547608")
    assert first["trades"] == 79
    assert first["taker_buy_base"] == float("19523.00000000")
    assert first["taker_buy_quote"] == float("0.55694227")


def test_floats_equal_pythons_own_parsing(reference: pd.DataFrame) -> None:
    """The values are what float() gives, so any other reader of the same file agrees."""
    for line, (_, bar) in zip(ADABTC_1M.splitlines(), reference.iterrows(), strict=True):
        fields = line.split(",")
        assert bar["high"] == float(fields[2])
        assert bar["taker_buy_quote"] == float(fields[10])


def test_header_row_is_detected_and_skipped(tmp_path: Path, reference: pd.DataFrame) -> None:
    path = write_csv(tmp_path / "with-header.csv", rows(), header=True)
    pd.testing.assert_frame_equal(read_binance_klines(path, interval="1m"), reference)


def test_zip_archive_is_read(tmp_path: Path, reference: pd.DataFrame) -> None:
    archive = tmp_path / "ADABTC-1m-2021-11-27.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ADABTC-1m-2021-11-27.csv", ADABTC_1M)
    pd.testing.assert_frame_equal(read_binance_klines(archive, interval="1m"), reference)


def test_microsecond_file_gives_the_same_frame_as_millisecond_file(
    tmp_path: Path, reference: pd.DataFrame
) -> None:
    path = write_csv(tmp_path / "micros.csv", [to_micros(fields) for fields in rows()])
    assert path.read_text().startswith("1637971200000000,")
    pd.testing.assert_frame_equal(read_binance_klines(path, interval="1m"), reference)


def test_crlf_line_endings_and_blank_lines_are_fine(
    tmp_path: Path, reference: pd.DataFrame
) -> None:
    path = tmp_path / "windows.csv"
    lines = ADABTC_1M.splitlines()
    path.write_bytes(("\r\n".join([*lines[:5], "", *lines[5:]]) + "\r\n").encode())
    pd.testing.assert_frame_equal(read_binance_klines(path, interval="1m"), reference)


# --- malformed rows ------------------------------------------------------------------------

Mutation = Callable[[list[list[str]]], None]


def _set(row: int, column: int, value: str) -> Mutation:
    def mutate(table: list[list[str]]) -> None:
        table[row][column] = value

    return mutate


def _drop_last_column(table: list[list[str]]) -> None:
    table[2].pop()


def _micros_row(table: list[list[str]]) -> None:
    table[2] = to_micros(table[2])


MALFORMED = {
    "columns": (_drop_last_column, 3, "expected 12 comma-separated columns, found 11"),
    "text": (_set(2, 4, "abc"), 3, "close 'abc' is not a finite decimal number"),
    "empty": (_set(2, 4, ""), 3, "close '' is not a finite decimal number"),
    "float-time": (
        _set(2, 0, "1637971320000.5"),
        3,
        "open_time '1637971320000.5' is not an integer",
    ),
    "int": (_set(3, 8, "many"), 4, "trades 'many' is not an integer"),
    "nan": (_set(2, 4, "NaN"), 3, "close 'NaN' is not a finite decimal number"),
    "inf": (_set(2, 2, "inf"), 3, "high 'inf' is not a finite decimal number"),
    "high<close": (_set(2, 2, "0.00002858"), 3, "high 0.00002858 is below close 0.00002859"),
    "high<open": (_set(3, 2, "0.00002857"), 4, "high 0.00002857 is below open 0.00002858"),
    "low>open": (_set(0, 3, "0.00002854"), 1, "low 0.00002854 is above open 0.00002853"),
    "volume<0": (_set(2, 5, "-1.5"), 3, "volume -1.5 is negative"),
    "taker<0": (_set(2, 9, "-2"), 3, "taker_buy_base -2 is negative"),
    "misaligned": (
        _set(2, 0, "1637971330000"),
        3,
        "open_time 1637971330000 (2021-11-27 00:02:10 UTC) is not on a 1m boundary",
    ),
    "mixed-close-time": (
        _set(2, 6, "1637971379999999"),
        3,
        "close_time 1637971379999999 is in microseconds but the file's first row is in milli",
    ),
    "mixed-units": (
        _micros_row,
        3,
        "open_time 1637971320000000 is in microseconds but the file's first row is in milliseconds",
    ),
}


@pytest.mark.parametrize(("mutate", "line", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_row_is_reported_with_file_line_and_value(
    tmp_path: Path, mutate: Mutation, line: int, message: str
) -> None:
    table = rows()
    mutate(table)
    path = write_csv(tmp_path / "ADABTC-1m-2021-11-27.csv", table)
    with pytest.raises(IngestError) as caught:
        read_binance_klines(path, interval="1m")
    assert f"{path} line {line}: {message}" in caught.value.message
    assert caught.value.kind == "rejected"


def test_line_numbers_count_the_header_and_blank_lines(tmp_path: Path) -> None:
    table = rows()
    table[6][5] = "-1"
    path = write_csv(tmp_path / "header.csv", table, header=True)
    text = path.read_text().splitlines()
    path.write_text("\n".join([*text[:3], "", *text[3:]]) + "\n")  # blank line 4
    with pytest.raises(IngestError, match=rf"{path} line 9: volume -1 is negative"):
        read_binance_klines(path, interval="1m")


def test_up_to_five_bad_lines_are_listed_and_the_rest_counted(tmp_path: Path) -> None:
    table = rows()
    for row in (1, 2, 4, 5, 6, 8, 9):
        table[row][5] = "-1"
    path = write_csv(tmp_path / "bad.csv", table)
    with pytest.raises(IngestError) as caught:
        read_binance_klines(path, interval="1m")
    listed = [line for line in caught.value.message.splitlines() if " line " in line]
    assert [line.split(":")[0] for line in listed] == [f"{path} line {n}" for n in (2, 3, 5, 6, 7)]
    assert "2 more malformed rows" in caught.value.message


def test_structural_and_value_problems_name_their_lines(tmp_path: Path) -> None:
    table = rows()
    table[1][1] = "x"
    table[7].append("extra")
    path = write_csv(tmp_path / "two.csv", table)
    with pytest.raises(IngestError) as caught:
        read_binance_klines(path, interval="1m")
    assert f"{path} line 2: open 'x' is not a finite decimal number" in caught.value.message
    assert f"{path} line 8: expected 12 comma-separated columns, found 13" in caught.value.message


def test_bad_row_inside_a_zip_names_archive_and_member(tmp_path: Path) -> None:
    table = rows()
    table[4][3] = "0.00002900"
    archive = tmp_path / "ADABTC-1m-2021-11.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ADABTC-1m-2021-11-27.csv", ADABTC_1M)
        zf.writestr("ADABTC-1m-2021-11-28.csv", "\n".join(",".join(r) for r in table))
    with pytest.raises(IngestError, match=rf"{archive}:ADABTC-1m-2021-11-28.csv line 5: low"):
        read_binance_klines(archive, interval="1m")


def test_a_file_of_another_interval_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "ADABTC-1m.csv", rows())
    with pytest.raises(IngestError, match=r"line 2: open_time .* is not on a 1h boundary"):
        read_binance_klines(path, interval="1h")


def test_empty_and_unreadable_files_are_reported(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(IngestError, match=rf"{empty} is empty"):
        read_binance_klines(empty, interval="1m")
    header_only = write_csv(tmp_path / "header-only.csv", [], header=True)
    with pytest.raises(IngestError, match="has a header but no rows"):
        read_binance_klines(header_only, interval="1m")
    missing = tmp_path / "missing.csv"
    with pytest.raises(IngestError, match=rf"cannot read {missing}"):
        read_binance_klines(missing, interval="1m")
    not_zip = tmp_path / "broken.zip"
    not_zip.write_text(ADABTC_1M)
    with pytest.raises(IngestError, match="is not a readable zip archive"):
        read_binance_klines(not_zip, interval="1m")


def test_unknown_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="unknown interval '7m'"):
        read_binance_klines(write_csv(tmp_path / "a.csv", rows()), interval="7m")


# --- ingest ----------------------------------------------------------------------------------


def test_ingest_writes_the_bars_and_reports(tmp_path: Path, candles: ParquetCandleStore) -> None:
    path = write_csv(tmp_path / "a.csv", rows())
    report = ingest_binance([path], symbol="adabtc", interval="1m", candles=candles)
    assert report == IngestReport(
        files=1,
        rows_read=10,
        rows_written=10,
        rows_replaced=0,
        duplicates=0,
        conflicts=0,
        first_open_time=1637971200000,
        last_open_time=1637971740000,
    )
    assert candles.symbols("1m") == ["ADABTC"]


def test_overlapping_files_are_deduplicated_and_the_later_file_wins(
    tmp_path: Path, candles: ParquetCandleStore
) -> None:
    table = rows()
    older = write_csv(tmp_path / "older.csv", table[:6])
    table[4][5] = "5000.00000000"  # a corrected volume for the fifth bar
    newer = write_csv(tmp_path / "newer.csv", table[3:])  # rows 4-6 overlap
    report = ingest_binance([older, newer], symbol="ADABTC", interval="1m", candles=candles)
    assert (report.rows_read, report.rows_written) == (13, 10)
    assert (report.duplicates, report.conflicts) == (3, 1)
    stored = candles.read("ADABTC", "1m", start_ms=0, end_ms=2**62)
    assert stored["volume"].iloc[4] == 5000.0
    assert len(stored) == 10


def test_ingest_again_adds_only_new_bars(tmp_path: Path, candles: ParquetCandleStore) -> None:
    first = write_csv(tmp_path / "a.csv", rows()[:6])
    ingest_binance([first], symbol="ADABTC", interval="1m", candles=candles)
    second = write_csv(tmp_path / "b.csv", rows())
    report = ingest_binance([second], symbol="ADABTC", interval="1m", candles=candles)
    assert (report.rows_read, report.rows_written, report.duplicates) == (10, 4, 0)


def test_nothing_is_written_when_any_file_is_bad(
    tmp_path: Path, candles: ParquetCandleStore
) -> None:
    good = write_csv(tmp_path / "good.csv", rows()[:5])
    ingest_binance([good], symbol="ADABTC", interval="1m", candles=candles)
    stored = (candles.root / "1m" / "ADABTC.parquet").read_bytes()
    table = rows()
    table[8][2] = "0"
    bad = write_csv(tmp_path / "bad.csv", table)
    with pytest.raises(IngestError, match=r"bad\.csv line 9"):
        ingest_binance([good, bad], symbol="ADABTC", interval="1m", candles=candles)
    assert (candles.root / "1m" / "ADABTC.parquet").read_bytes() == stored
    with pytest.raises(IngestError):
        ingest_binance([bad], symbol="ETHBTC", interval="1m", candles=candles)
    assert candles.symbols("1m") == ["ADABTC"]


@pytest.mark.parametrize("symbol", ["BTC/USDT", "BTC-USDT", "B", "../etc", "A" * 21])
def test_ingest_refuses_a_symbol_that_is_not_a_binance_symbol(
    tmp_path: Path, candles: ParquetCandleStore, symbol: str
) -> None:
    with pytest.raises(IngestError, match="is not a Binance symbol"):
        ingest_binance(
            [write_csv(tmp_path / "a.csv", rows())], symbol=symbol, interval="1m", candles=candles
        )
    assert not candles.root.exists()


def test_ingest_refuses_an_unknown_interval_or_no_files(candles: ParquetCandleStore) -> None:
    with pytest.raises(IngestError, match="unknown interval"):
        ingest_binance([Path("x.csv")], symbol="ADABTC", interval="60m", candles=candles)
    with pytest.raises(IngestError, match="no files to ingest"):
        ingest_binance([], symbol="ADABTC", interval="1m", candles=candles)


def test_hourly_bars_given_as_minutes_are_refused(
    tmp_path: Path, candles: ParquetCandleStore
) -> None:
    # 1h open times are on the 1m grid too: each row's close_time says how long its bar is.
    hourly = [
        [
            str(1637971200000 + i * 3_600_000),
            *row[1:6],
            str(1637971200000 + (i + 1) * 3_600_000 - 1),
            *row[7:],
        ]
        for i, row in enumerate(rows())
    ]
    path = write_csv(tmp_path / "a.csv", hourly)
    with pytest.raises(IngestError) as caught:
        ingest_binance([path], symbol="ADABTC", interval="1m", candles=candles)
    assert "line 1: " in str(caught.value) and "these are 1h bars" in str(caught.value)
    assert candles.symbols("1m") == []
    assert (
        ingest_binance([path], symbol="ADABTC", interval="1h", candles=candles).rows_written == 10
    )


def test_replaced_bars_are_reported(tmp_path: Path, candles: ParquetCandleStore) -> None:
    table = rows()
    ingest_binance(
        [write_csv(tmp_path / "a.csv", table)], symbol="ADABTC", interval="1m", candles=candles
    )
    table[2][5] = "7777.00000000"  # a corrected volume, ingested again
    report = ingest_binance(
        [write_csv(tmp_path / "b.csv", table)], symbol="ADABTC", interval="1m", candles=candles
    )
    assert (report.rows_written, report.rows_replaced, report.duplicates) == (0, 1, 0)
