"""The local candle store: one Parquet file per symbol and interval.

This is the embedded "candle source" port (MongoDB is the other), so ``stratorch run`` works on a
fresh machine with no database. Layout::

    <root>/<interval>/<SYMBOL>.parquet        e.g. stratorch/sample/1h/BTCUSDT.parquet

Each file holds a canonical candle frame (:mod:`shared.candles.frame`) sorted by ``open_time``,
zstd-compressed, in row groups of :data:`_ROW_GROUP_ROWS` rows: a read of a narrow range decodes
the ``open_time`` column plus only the row groups it needs, so a year of one-minute bars costs
little more to query than a day of them.

Each file's Parquet metadata holds the SHA-256 of every row group's bars (key
:data:`_GROUP_HASHES`), written with it: a fingerprint (part of the result cache key) reads
the file's footer — those hashes and each row group's first and last ``open_time`` — and no
candle at all.

A write replaces the whole file atomically (temporary file, then ``os.replace``): a concurrent
reader sees the old file or the new one, never half of either. Writes to one file are not
serialized: run one writer per symbol and interval at a time, or the last of two concurrent
writes drops the other's new rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shared.candles.frame import (
    CANDLE_COLUMNS,
    Span,
    Written,
    merge_frames,
    utc_text,
    validate_frame,
)
from shared.errors import NoDataError
from shared.intervals import INTERVAL_MS, interval_ms

__all__ = ["ParquetCandleStore", "normalize_symbol"]

_SYMBOL = re.compile(r"[A-Z0-9]{2,20}")
_SCHEMA = pa.schema([(name, pa.from_numpy_dtype(dtype)) for name, dtype in CANDLE_COLUMNS.items()])
#: Rows per Parquet row group: about six weeks of 1m bars. Small enough that a narrow read
#: decodes little, large enough for zstd to compress well.
_ROW_GROUP_ROWS = 65_536
#: How many symbols a "no data" message lists before it just counts the rest.
_LISTED_SYMBOLS = 30
#: The file metadata key of the row groups' content hashes: a JSON list of hex SHA-256s,
#: each over its row group's columns' bytes. Files written before it have none.
_GROUP_HASHES = b"stratorch.row_group_sha256"


def normalize_symbol(symbol: str) -> str:
    """``symbol`` upper-cased, or ``ValueError`` unless it looks like a Binance symbol.

    The check also keeps a symbol from naming a path outside the store.
    """
    upper = symbol.upper()
    if not _SYMBOL.fullmatch(upper):
        raise ValueError(
            f"symbol {symbol!r} is not a Binance symbol: expected 2 to 20 letters or digits "
            f"such as BTCUSDT (no '/', '-' or spaces)"
        )
    return upper


class ParquetCandleStore:
    """Candles in Parquet files under ``root``; see the module docstring for the layout.

    Usable as an async context manager like the other ports; it holds no open resources, so
    :meth:`aclose` has nothing to release.

    :param root: the store's directory; created on the first write.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ParquetCandleStore(root={str(self.root)!r})"

    def symbols(self, interval: str) -> list[str]:
        """Symbols stored at ``interval``, sorted."""
        folder = self.root / _checked_interval(interval)
        if not folder.is_dir():
            return []
        return sorted(
            path.stem for path in folder.glob("*.parquet") if _SYMBOL.fullmatch(path.stem)
        )

    def read(
        self, symbol: str, interval: str, *, start_ms: int, end_ms: int, lookback: int = 0
    ) -> pd.DataFrame:
        """The bars with ``start_ms <= open_time < end_ms``, after up to ``lookback`` earlier ones.

        :param symbol: e.g. ``BTCUSDT`` (case-insensitive).
        :param interval: e.g. ``"1h"``.
        :param start_ms: first ``open_time`` wanted, inclusive, ms since the epoch (UTC).
        :param end_ms: ``open_time`` bound, exclusive.
        :param lookback: rows (not time) before ``start_ms`` to prepend as indicator warm-up;
            fewer if the store starts later.
        :returns: a canonical candle frame.
        :raises NoDataError: the store has no file for ``symbol`` at ``interval`` (the message
            lists what it has), or no bar in ``[start_ms, end_ms)`` (the message gives the
            range it does have).
        """
        if lookback < 0:
            raise ValueError(f"lookback must be a number of rows >= 0, got {lookback}")
        try:
            symbol = normalize_symbol(symbol)
            path = self._path(symbol, interval)
        except ValueError as exc:
            raise NoDataError(str(exc), symbol=symbol) from None
        if not path.is_file():
            raise NoDataError(self._missing_message(symbol, interval), symbol=symbol)
        # Mapped, and read page by page rather than prefetched: the column chunks are decoded
        # straight from the file's pages, which leaves ~60 MB less on the heap at 1M bars.
        with pq.ParquetFile(path, memory_map=True, pre_buffer=False) as parquet:
            times = parquet.read(columns=["open_time"]).column(0).to_numpy()
            begin, end = (int(i) for i in np.searchsorted(times, [start_ms, end_ms]))
            if begin >= end:
                raise NoDataError(
                    _empty_range_message(self.root, symbol, interval, start_ms, end_ms, times),
                    symbol=symbol,
                )
            first = max(begin - lookback, 0)
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
            group_starts = np.cumsum([0, *sizes])
            groups = range(
                int(np.searchsorted(group_starts, first, side="right")) - 1,
                int(np.searchsorted(group_starts, end - 1, side="right")),
            )
            table = parquet.read_row_groups(groups)
        offset = first - int(group_starts[groups[0]])
        # A block per column, each converted once, and the table's buffers freed as it goes:
        # no copy to consolidate the float columns into one block (0.2 s and 88 MB at 1M bars).
        frame: pd.DataFrame = table.slice(offset, end - first).to_pandas(
            split_blocks=True, self_destruct=True
        )
        return frame

    def write(self, symbol: str, interval: str, frame: pd.DataFrame) -> Written:
        """Merge ``frame`` into the stored bars; how many bars are new, how many replaced.

        Where ``frame`` repeats a stored ``open_time``, its row replaces the stored one
        (counted as replaced when its values differ).

        :param frame: a canonical candle frame (see :func:`~shared.candles.frame.validate_frame`).
        """
        symbol = normalize_symbol(symbol)
        path = self._path(symbol, interval)
        validate_frame(frame)
        if frame.empty:
            return Written(0, 0)
        stored = pq.read_table(path).to_pandas() if path.is_file() else frame.iloc[:0]
        merged = merge_frames([stored, frame] if len(stored) else [frame])
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace(path, merged.frame)
        return Written(new=len(merged.frame) - len(stored), replaced=merged.conflicts)

    async def load(self, symbol: str, window: Span) -> pd.DataFrame:
        """:meth:`read` in a worker thread, so the event loop keeps serving broker heartbeats."""
        interval, start_ms, end_ms, lookback = window
        return await asyncio.to_thread(
            self.read, symbol, interval, start_ms=start_ms, end_ms=end_ms, lookback=lookback
        )

    async def fingerprint(self, symbol: str, window: Span) -> str:
        """Identifies the bars :meth:`load` would return ("no_data" if none).

        Part of the result cache key: re-ingested or corrected candles change it, so a
        cached result is never served for data it was not computed on. It is the digest of
        ``window`` and the content hashes of the row groups that hold its bars and warm-up,
        read from the file's footer: no candle is read, and bars written outside those row
        groups (a newer month appended) leave it as it was. A file written before content
        hashes is read and its window's bars hashed instead.
        """
        return await asyncio.to_thread(self._fingerprint, symbol, window)

    def _fingerprint(self, symbol: str, window: Span) -> str:
        interval, start_ms, end_ms, lookback = window
        try:
            path = self._path(normalize_symbol(symbol), interval)
        except ValueError:
            return "no_data"
        if not path.is_file():
            return "no_data"
        meta = pq.read_metadata(path)
        stored = (meta.metadata or {}).get(_GROUP_HASHES)
        hashes = json.loads(stored) if stored is not None else []
        groups = _window_groups(meta, start_ms, end_ms, lookback)
        if groups is None or len(hashes) != meta.num_row_groups:  # written without hashes
            try:
                frame = self.read(
                    symbol, interval, start_ms=start_ms, end_ms=end_ms, lookback=lookback
                )
            except NoDataError:
                return "no_data"
            return _content_hash(frame, range(len(frame)))
        if not groups:
            return "no_data"
        covered = [hashes[i] for i in groups]
        return hashlib.sha256(json.dumps([*window, covered]).encode()).hexdigest()

    async def aclose(self) -> None:
        """Nothing to release; here so the store is interchangeable with the MongoDB source."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _path(self, symbol: str, interval: str) -> Path:
        return self.root / _checked_interval(interval) / f"{symbol}.parquet"

    def _missing_message(self, symbol: str, interval: str) -> str:
        here = self.symbols(interval)
        elsewhere = [
            other
            for other in INTERVAL_MS
            if other != interval and (self.root / other / f"{symbol}.parquet").is_file()
        ]
        return missing_symbol_message(
            symbol,
            interval,
            where=f"the candle store at {self.root}",
            here=here,
            elsewhere=elsewhere,
            ingest=_ingest_command(self.root),
        )


def missing_symbol_message(
    symbol: str,
    interval: str,
    *,
    where: str,
    here: list[str],
    elsewhere: list[str],
    ingest: str,
) -> str:
    """What a candle source (Parquet or MongoDB) says when it has no ``symbol`` at ``interval``:
    which symbols it does have at that interval, which intervals it has for the symbol, and
    the command that loads candles into it."""
    lines = [f"no {interval} candles for {symbol} in {where}."]
    if here:
        listed = ", ".join(here[:_LISTED_SYMBOLS])
        if len(here) > _LISTED_SYMBOLS:
            listed += f" and {len(here) - _LISTED_SYMBOLS} more"
        lines.append(f"It has {interval} candles for {listed}.")
    else:
        lines.append(f"It has no {interval} candles for any symbol.")
    if elsewhere:
        lines.append(f"{symbol} is stored at {', '.join(elsewhere)}.")
    lines.append(f"Load Binance kline files into it with `{ingest}`.")
    return " ".join(lines)


def _checked_interval(interval: str) -> str:
    interval_ms(interval)  # raises ValueError naming the known intervals
    return interval


def _ingest_command(root: Path, symbol: str = "SYMBOL", interval: str = "INTERVAL") -> str:
    return (
        f"stratorch ingest binance FILE... --symbol {symbol} --interval {interval} --candles {root}"
    )


def _empty_range_message(
    root: Path, symbol: str, interval: str, start_ms: int, end_ms: int, times: npt.NDArray[np.int64]
) -> str:
    wanted = (
        f"no {symbol} {interval} candles from {utc_text(start_ms)} to {utc_text(end_ms)} "
        f"(end exclusive)"
    )
    if not len(times):
        return f"{wanted}; its file in the candle store holds no bars at all."
    return (
        f"{wanted}; the candle store has {len(times)} bars from {utc_text(int(times[0]))} to "
        f"{utc_text(int(times[-1]))} (open times). Choose a range inside that, or load the "
        f"missing candles with `{_ingest_command(root, symbol, interval)}`."
    )


def _content_hash(frame: pd.DataFrame, rows: range) -> str:
    """The SHA-256 of ``frame``'s ``rows``, column after column, as raw bytes."""
    h = hashlib.sha256()
    for column in frame.columns:
        h.update(np.ascontiguousarray(frame[column].to_numpy()[rows.start : rows.stop]).data)
    return h.hexdigest()


def _window_groups(
    meta: pq.FileMetaData, start_ms: int, end_ms: int, lookback: int
) -> range | None:
    """The row groups that hold the bars of ``[start_ms, end_ms)`` and at least ``lookback``
    rows before them, from the footer's ``open_time`` statistics; empty when no row group
    can hold such a bar, ``None`` when a row group has no statistics."""
    bounds = []
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(0).statistics  # open_time
        if stats is None or not stats.has_min_max:
            return None
        bounds.append((stats.min, stats.max))
    inside = [i for i, (low, high) in enumerate(bounds) if low < end_ms and high >= start_ms]
    if not inside:
        return range(0)
    first, before = inside[0], 0
    while first > 0 and before < lookback:
        first -= 1
        before += meta.row_group(first).num_rows
    return range(first, inside[-1] + 1)


def _replace(path: Path, frame: pd.DataFrame) -> None:
    """Write ``frame`` to ``path`` atomically: a temporary file in the same folder, then rename."""
    # No pandas metadata: the file then depends only on the data (and the pyarrow version).
    # The row groups' content hashes are the data's too.
    table = pa.Table.from_pandas(frame, schema=_SCHEMA, preserve_index=False)
    groups = range(0, len(frame), _ROW_GROUP_ROWS)
    hashes = [_content_hash(frame, range(i, i + _ROW_GROUP_ROWS)) for i in groups]
    table = table.replace_schema_metadata({_GROUP_HASHES: json.dumps(hashes)})
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("xb") as file:
            pq.write_table(
                table,
                file,
                compression="zstd",
                # Prices rarely repeat exactly, so dictionaries only get in zstd's way: without
                # them files are 25-45% smaller and written twice as fast.
                use_dictionary=False,
                row_group_size=_ROW_GROUP_ROWS,
            )
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
