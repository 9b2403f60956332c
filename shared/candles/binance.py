"""Read Binance public kline files (data.binance.vision) into canonical candle frames.

This is the only parser of Binance kline rows: the local Parquet store and MongoDB are both
loaded through it, so both hold the same float64 values, bit for bit. Arrow parses the floats
and its parser is correctly rounded, i.e. it yields the double Python's ``float()`` yields.

The layout, with or without one header row::

    open_time, open, high, low, close, volume, close_time, quote_asset_volume,
    number_of_trades, taker_buy_base_asset_volume, taker_buy_quote_asset_volume, ignore

Times are epoch milliseconds, except in Binance spot files from 2025 on, which use
microseconds; the unit is detected per file and converted to milliseconds.

Speed comes from Arrow's multi-threaded CSV reader and vectorized checks. Only when a file is
bad do we walk its lines in Python, to name the offending lines in the error message.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

from shared.candles.frame import CANDLE_COLUMNS, Written, merge_frames, utc_text
from shared.candles.store import ParquetCandleStore, normalize_symbol
from shared.errors import IngestError
from shared.intervals import ALIGNED_INTERVALS, INTERVAL_MS, interval_ms

__all__ = ["IngestReport", "ParsedKlines", "ingest_binance", "parse_binance", "read_binance_klines"]

#: The CSV's 12 columns under their canonical names; the last one is unused by Binance.
_CSV_COLUMNS = (*CANDLE_COLUMNS, "ignore")
_ARROW_TYPES = {name: pa.from_numpy_dtype(dtype) for name, dtype in CANDLE_COLUMNS.items()}
_EXPECTED_LAYOUT = (
    "Expected Binance kline rows of 12 comma-separated columns: open_time, open, high, low, "
    "close, volume, close_time, quote_asset_volume, number_of_trades, "
    "taker_buy_base_asset_volume, taker_buy_quote_asset_volume, ignore"
)
#: Timestamps at or above this are microseconds. As milliseconds it would be the year 5138,
#: as microseconds it is 1973, before any exchange existed, so the two ranges never meet.
_MICROS_FROM = 10**14
#: Bad rows quoted in one error message; the rest are counted.
_MAX_REPORTED = 5

_INTEGER = re.compile(r"-?\d+")  # what Arrow accepts as int64 ("+5" it does not)
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
#: A plainly well-formed row, matched in one go so that locating the bad lines of a big file
#: stays fast; rows that miss it are looked at field by field.
_PLAIN_ROW = re.compile(
    ",".join(
        (_INTEGER if dtype.kind == "i" else _DECIMAL).pattern for dtype in CANDLE_COLUMNS.values()
    )
    + ",[^,]*"
)
_BOM = b"\xef\xbb\xbf"

_Opener = Callable[[], IO[bytes]]
_Describe = Callable[[Mapping[str, str]], str]


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What :func:`ingest_binance` did.

    :param files: files given (a zip archive counts once, whatever it holds).
    :param rows_read: candle rows parsed from all files, duplicates included.
    :param rows_written: bars the store did not have before.
    :param rows_replaced: bars the store had, with other values, now replaced.
    :param duplicates: rows dropped because a later row of the given files had the same
        ``open_time`` (rows already in the store are not counted here).
    :param conflicts: of those, rows whose values differed from the one that replaced them
        (the later file wins); non-zero means overlapping files disagree.
    :param first_open_time: earliest ``open_time`` ingested, ms since the epoch (UTC).
    :param last_open_time: latest ``open_time`` ingested, ms since the epoch (UTC).
    """

    files: int
    rows_read: int
    rows_written: int
    rows_replaced: int
    duplicates: int
    conflicts: int
    first_open_time: int
    last_open_time: int


def read_binance_klines(path: Path, *, interval: str) -> pd.DataFrame:
    """Parse one Binance kline ``.csv``, or a ``.zip`` of them, into a canonical candle frame.

    :param path: a CSV file, or a zip archive whose ``.csv`` members are all read (later
        members win where they repeat an ``open_time``).
    :param interval: the files' kline interval, e.g. ``"1m"``; ``open_time`` must lie on its
        boundaries (not checked for ``1w`` and ``1M``).
    :raises IngestError: naming the file, line and value of up to five malformed rows.
    """
    _check_interval(interval)
    return merge_frames(_read_file(Path(path), interval)).frame


@dataclass(frozen=True, slots=True)
class ParsedKlines:
    """Binance kline files parsed and merged, not yet written: what :func:`parse_binance` gives.

    :param symbol: the normalized (upper-case) symbol.
    :param interval: the files' kline interval.
    :param frame: the merged canonical candle frame, sorted by ``open_time``, never empty.
    :param files: files given.
    :param rows_read: rows parsed, duplicates included.
    :param duplicates: rows dropped for a later row with the same ``open_time``.
    :param conflicts: of those, rows whose values differed from the row that replaced them.
    """

    symbol: str
    interval: str
    frame: pd.DataFrame
    files: int
    rows_read: int
    duplicates: int
    conflicts: int

    def report(self, written: Written) -> IngestReport:
        """The :class:`IngestReport` of writing :attr:`frame` somewhere."""
        open_times = self.frame["open_time"]
        return IngestReport(
            files=self.files,
            rows_read=self.rows_read,
            rows_written=written.new,
            rows_replaced=written.replaced,
            duplicates=self.duplicates,
            conflicts=self.conflicts,
            first_open_time=int(open_times.iloc[0]),
            last_open_time=int(open_times.iloc[-1]),
        )


def parse_binance(paths: Sequence[Path], *, symbol: str, interval: str) -> ParsedKlines:
    """Parse and merge Binance kline files for one symbol and interval, writing nothing.

    The part of :func:`ingest_binance` before the write, for any destination (the Parquet
    store, or MongoDB via :func:`shared.mongo.write_candles`). Where files overlap, rows from
    later files replace earlier ones.

    :param paths: ``.csv`` files or ``.zip`` archives of them, oldest first.
    :param symbol: Binance symbol such as ``BTCUSDT`` (upper-cased).
    :param interval: kline interval of every file, e.g. ``"1h"``.
    :raises IngestError: a bad symbol or interval, an unreadable file, or malformed rows.
    """
    try:
        symbol = normalize_symbol(symbol)
    except ValueError as exc:
        raise IngestError(str(exc)) from None
    _check_interval(interval)
    if not paths:
        raise IngestError(f"no files to ingest for {symbol}; pass Binance kline .csv or .zip files")
    parts = [frame for path in paths for frame in _read_file(Path(path), interval)]
    merged = merge_frames(parts)
    return ParsedKlines(
        symbol=symbol,
        interval=interval,
        frame=merged.frame,
        files=len(paths),
        rows_read=sum(len(part) for part in parts),
        duplicates=merged.duplicates,
        conflicts=merged.conflicts,
    )


def ingest_binance(
    paths: Sequence[Path], *, symbol: str, interval: str, candles: ParquetCandleStore
) -> IngestReport:
    """Parse Binance kline files and merge them into ``candles`` as ``symbol`` at ``interval``.

    Every file is parsed before anything is written, so one malformed row anywhere leaves the
    store untouched. Where files overlap, rows from later files replace earlier ones (and the
    report counts those that differed); rows already in the store are replaced the same way.

    :param paths: ``.csv`` files or ``.zip`` archives of them, oldest first.
    :param symbol: Binance symbol such as ``BTCUSDT`` (upper-cased).
    :param interval: kline interval of every file, e.g. ``"1h"``.
    :param candles: the local candle store they go to.
    :raises IngestError: a bad symbol or interval, an unreadable file, or malformed rows.
    """
    parsed = parse_binance(paths, symbol=symbol, interval=interval)
    return parsed.report(candles.write(parsed.symbol, parsed.interval, parsed.frame))


def _check_interval(interval: str) -> None:
    try:
        interval_ms(interval)
    except ValueError as exc:
        raise IngestError(str(exc)) from None


def _read_file(path: Path, interval: str) -> list[pd.DataFrame]:
    """One frame per CSV in ``path`` (a zip may hold several), in file order."""
    try:
        if path.suffix.lower() != ".zip":
            return [_read_csv(str(path), lambda: path.open("rb"), interval)]
        with zipfile.ZipFile(path) as archive:
            members = [
                name
                for name in archive.namelist()
                if name.lower().endswith(".csv") and not name.startswith("__MACOSX/")
            ]
            if not members:
                raise IngestError(
                    f"{path} holds no .csv file; expected a data.binance.vision kline archive"
                )
            return [
                _read_csv(f"{path}:{name}", partial(archive.open, name), interval)
                for name in members
            ]
    except zipfile.BadZipFile as exc:
        raise IngestError(
            f"{path} is not a readable zip archive ({exc}); download it again."
        ) from exc
    except OSError as exc:
        raise IngestError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_csv(label: str, open_: _Opener, interval: str) -> pd.DataFrame:
    """Parse one CSV; ``label`` names it in errors, ``open_`` opens it for (re)reading."""
    with open_() as file:
        first_line = file.readline()
    if not first_line.strip():
        raise IngestError(f"{label} is empty or starts with a blank line. {_EXPECTED_LAYOUT}.")
    header = _is_header(first_line)
    try:
        with open_() as file:
            table = pa_csv.read_csv(
                file,
                read_options=pa_csv.ReadOptions(column_names=_CSV_COLUMNS, skip_rows=int(header)),
                convert_options=pa_csv.ConvertOptions(
                    column_types=_ARROW_TYPES,
                    include_columns=list(CANDLE_COLUMNS),
                    null_values=[],  # an empty field is malformed, not a missing value
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
    except pa.ArrowInvalid as exc:
        problems, total = _structure_problems(open_, header)
        if not problems:  # Arrow rejected something our line check accepts
            raise IngestError(f"{label} is not a Binance kline CSV: {exc}") from exc
        raise _malformed(label, problems, total) from exc
    if table.num_rows == 0:
        raise IngestError(f"{label} has a header but no rows. {_EXPECTED_LAYOUT}.")
    return _checked(label, open_, header, table.to_pandas(), interval)


def _is_header(first_line: bytes) -> bool:
    field = first_line.removeprefix(_BOM).split(b",", 1)[0].strip().strip(b'"')
    return _INTEGER.fullmatch(field.decode("utf-8", "replace")) is None


def _checked(
    label: str, open_: _Opener, header: bool, frame: pd.DataFrame, interval: str
) -> pd.DataFrame:
    """Validate every row at once, convert microseconds to ms; raise naming the bad lines."""
    open_time = frame["open_time"].to_numpy()
    close_time = frame["close_time"].to_numpy()
    in_micros = bool(open_time[0] >= _MICROS_FROM)
    if in_micros:
        frame["open_time"] = open_time // 1000
        frame["close_time"] = close_time // 1000
    prices = {name: frame[name].to_numpy() for name in ("open", "high", "low", "close")}
    body_top = np.maximum(prices["open"], prices["close"])
    body_bottom = np.minimum(prices["open"], prices["close"])

    # In reporting order: a row failing several checks is reported under the first.
    checks: list[tuple[npt.NDArray[np.bool_], _Describe]] = [
        (~np.isfinite(frame[name].to_numpy()), partial(_not_a_number, name))
        for name, dtype in CANDLE_COLUMNS.items()
        if dtype.kind == "f"
    ]
    unit = "microseconds" if in_micros else "milliseconds"
    mixed = ((open_time >= _MICROS_FROM) != in_micros) | ((close_time >= _MICROS_FROM) != in_micros)
    checks.append((mixed, partial(_mixed_units, unit)))
    if interval in ALIGNED_INTERVALS:
        misaligned = frame["open_time"].to_numpy() % interval_ms(interval) != 0
        checks.append((misaligned, partial(_misaligned, interval)))
    # A bar's close_time is its open_time + its length - 1 ms: a file of another interval
    # (1h bars given as --interval 1m) is caught on its first row. A month is 28 to 31 days.
    span = frame["close_time"].to_numpy() - frame["open_time"].to_numpy() + 1
    lengths = (
        (28 * 86_400_000, 31 * 86_400_000) if interval == "1M" else (interval_ms(interval),) * 2
    )
    checks.append(((span < lengths[0]) | (span > lengths[1]), partial(_other_length, interval)))
    checks += [
        (frame[name].to_numpy() < 0, partial(_negative, name))
        for name in ("volume", "quote_volume", "trades", "taker_buy_base", "taker_buy_quote")
    ]
    checks.append((prices["high"] < body_top, _high_below_body))
    checks.append((prices["low"] > body_bottom, _low_above_body))

    bad_rows = np.flatnonzero(np.logical_or.reduce([mask for mask, _ in checks]))
    if len(bad_rows):
        reported = [int(row) for row in bad_rows[:_MAX_REPORTED]]
        lines = _lines_of_rows(open_, header, reported)
        problems = []
        for row in reported:
            describe = next(describe for mask, describe in checks if mask[row])
            number, fields = lines[row]
            problems.append((number, describe(dict(zip(_CSV_COLUMNS, fields, strict=True)))))
        raise _malformed(label, problems, len(bad_rows))
    return frame


def _not_a_number(name: str, fields: Mapping[str, str]) -> str:
    return f"{name} {fields[name]!r} is not a finite decimal number"


def _mixed_units(unit: str, fields: Mapping[str, str]) -> str:
    def unit_of(name: str) -> str:
        return "microseconds" if int(fields[name]) >= _MICROS_FROM else "milliseconds"

    name = "open_time" if unit_of("open_time") != unit else "close_time"
    return (
        f"{name} {fields[name]} is in {unit_of(name)} but the file's first row is in {unit}; "
        f"one file must use one unit"
    )


def _misaligned(interval: str, fields: Mapping[str, str]) -> str:
    ms = int(fields["open_time"])
    ms = ms // 1000 if ms >= _MICROS_FROM else ms
    return (
        f"open_time {fields['open_time']} ({utc_text(ms)}) is not on a {interval} boundary; "
        f"is this a file of another interval?"
    )


def _other_length(interval: str, fields: Mapping[str, str]) -> str:
    try:
        length = int(fields["close_time"]) - int(fields["open_time"]) + 1
    except ValueError:
        length = 0
    unit = 1000 if int(fields["open_time"]) >= _MICROS_FROM else 1
    seen = next(
        (name for name, ms in INTERVAL_MS.items() if ms * unit == length), f"{length} units"
    )
    return (
        f"close_time {fields['close_time']} is not open_time {fields['open_time']} plus one "
        f"{interval} bar (minus 1): these are {seen} bars; give the files' own --interval"
    )


def _negative(name: str, fields: Mapping[str, str]) -> str:
    return f"{name} {fields[name]} is negative"


def _high_below_body(fields: Mapping[str, str]) -> str:
    other = "close" if float(fields["close"]) >= float(fields["open"]) else "open"
    return f"high {fields['high']} is below {other} {fields[other]}"


def _low_above_body(fields: Mapping[str, str]) -> str:
    other = "close" if float(fields["close"]) <= float(fields["open"]) else "open"
    return f"low {fields['low']} is above {other} {fields[other]}"


def _structure_problems(open_: _Opener, header: bool) -> tuple[list[tuple[int, str]], int]:
    """The first few (line, problem) pairs of rows Arrow cannot convert, and their count."""
    problems: list[tuple[int, str]] = []
    total = 0
    for number, line in _data_lines(open_, header):
        if _PLAIN_ROW.fullmatch(line):
            continue
        problem = _structure_problem(_fields(line))
        if problem is not None:
            total += 1
            if len(problems) < _MAX_REPORTED:
                problems.append((number, problem))
    return problems, total


def _structure_problem(fields: list[str]) -> str | None:
    if len(fields) != len(_CSV_COLUMNS):
        return f"expected {len(_CSV_COLUMNS)} comma-separated columns, found {len(fields)}"
    for (name, dtype), text in zip(CANDLE_COLUMNS.items(), fields, strict=False):
        if dtype.kind == "i" and not _INTEGER.fullmatch(text):
            return f"{name} {text!r} is not an integer"
        if dtype.kind == "f" and not _DECIMAL.fullmatch(text):
            return _not_a_number(name, {name: text})
    return None


def _lines_of_rows(
    open_: _Opener, header: bool, rows: Iterable[int]
) -> dict[int, tuple[int, list[str]]]:
    """Map data-row indices (as Arrow counted them) to their line number and raw fields."""
    wanted = set(rows)
    found: dict[int, tuple[int, list[str]]] = {}
    for row, (number, line) in enumerate(_data_lines(open_, header)):
        if row in wanted:
            found[row] = (number, _fields(line))
            if len(found) == len(wanted):
                break
    return found


def _data_lines(open_: _Opener, header: bool) -> Iterator[tuple[int, str]]:
    """``(1-based line number, text)`` per data row, skipping blank lines as Arrow does."""
    with open_() as file:
        for number, raw in enumerate(file, start=1):
            if number == 1:
                if header:
                    continue
                raw = raw.removeprefix(_BOM)
            text = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if text:
                yield number, text


def _fields(line: str) -> list[str]:
    return [field.strip().strip('"') for field in line.split(",")]


def _malformed(label: str, problems: list[tuple[int, str]], total: int) -> IngestError:
    lines = [f"{label} line {number}: {problem}" for number, problem in problems]
    if total > len(problems):
        lines.append(f"... and {total - len(problems)} more malformed rows in {label}")
    lines.append(
        f"No rows were loaded. {_EXPECTED_LAYOUT}, with high >= max(open, close), "
        f"low <= min(open, close) and no negative volume. Fix or remove the rows above, "
        f"or download the file again from data.binance.vision."
    )
    return IngestError("\n".join(lines))
