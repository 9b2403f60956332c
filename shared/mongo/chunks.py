"""Candles in MongoDB, columnar: a series' bars in one document per period, named by a manifest.

A manifest per series in ``candle_series``, and the series' chunks in a collection of its own,
``candle_chunks.<SYMBOL>.<interval>`` (database ``STRATORCH_MONGO_DB``)::

    candle_series               {_id: "BTCUSDT/1m", symbol, interval, revision: <int>, count,
                                 first, last, chunks: [{id, period, count, first, last, hash}]}
    candle_chunks.BTCUSDT.1m    {_id: "BTCUSDT/1m/2024-03/<hash[:16]>", symbol, interval,
                                 period, count, first, last, hash, codec: "shuffle-zlib",
                                 columns: {open_time: <binary>, open: <binary>, ...},
                                 decimals: {open: 2, ...}}

``first``/``last`` are open times (ms), ``count`` bars, ``hash`` the sha256 of the chunk's
columns (:func:`content_hash`). A period is a UTC calendar day for ``1s`` bars (86,400 bars), a
month for ``1m`` to ``30m`` (at most 44,640 bars: ~2 MB stored, ~3.9 MB decoded), a year from
``1h`` on: chunks of some thousands to tens of thousands of bars, where the test server's
per-document cost (a few ms) is small beside its per-byte cost (~50 MB/s).

Each column is the frame's column as packed little-endian int64/float64, its bytes shuffled
(all first bytes, then all second bytes, ...: blosc's trick, which puts the nearly constant
high bytes of neighbouring values together) and deflated; ``open_time`` and ``close_time``
are stored as differences to the previous bar, which deflate to almost nothing. A float column
whose every value is ``integer / 10**k`` bit for bit (``k`` ≤ 8: Binance's prices and
quantities) is stored as those integers, as differences, and named in ``decimals``. A month of
1m bars is then ~26 bytes a bar (~53 for random 53-bit mantissas) instead of 88; the reader
decodes 3 to 9M bars/s.

Why a collection per series, read with one ``$in`` query: FerretDB v1 (the test server) finds
even an ``_id`` by scanning the collection, up to the document for a ``find_one``; one ``$in``
over the series' own collection scans it once, whatever else the database holds. On MongoDB
both are ``_id`` index lookups.

Why chunks are immutable, named by their content: writing a period again inserts a new chunk
and then points the manifest at it, so a reader that fetched the manifest finds every chunk it
names, or (deleted meanwhile) finds one missing and reads the manifest again; it never sees half
of a write. Writes are inserts, never updates of megabyte documents (which FerretDB v1 does by
scanning the collection). Superseded chunks are deleted after the manifest moved on. Concurrent
writers of one series take turns through the manifest's ``revision`` (compare and swap); one
that lost a race leaves the chunks it inserted, which its next attempt most likely reuses
(same content, same ``_id``).
"""

from __future__ import annotations

import asyncio
import hashlib
import zlib
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from bson.binary import Binary
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from shared.candles.frame import CANDLE_COLUMNS, Span, Written, merge_frames, validate_frame
from shared.candles.store import normalize_symbol
from shared.intervals import interval_ms
from shared.mongo._client import MongoDataError, MongoError, mapped
from shared.mongo._schema import CANDLE_CHUNKS, CANDLE_SERIES

__all__ = [
    "CODEC",
    "Columns",
    "chunk_collection",
    "chunks_for",
    "content_hash",
    "decode",
    "encode",
    "read_chunks",
    "series_id",
    "window_frame",
    "write_chunks",
]

Document = dict[str, Any]
#: A chunk's bars, column by column (the names and dtypes of ``CANDLE_COLUMNS``).
Columns = dict[str, npt.NDArray[Any]]

CODEC = "shuffle-zlib"
#: Columns stored as differences to the previous bar.
_DELTA = frozenset({"open_time", "close_time"})
#: deflate's default level: ~11 % smaller than level 1 on Binance-like candles (26 against 30
#: bytes a bar), which reads on FerretDB gain, for ~4 µs a bar more at write; inflating is as
#: fast. Level 9 saves 1.5 % more at 25 times the write time.
_LEVEL = 6
_LITTLE = {name: dtype.newbyteorder("<") for name, dtype in CANDLE_COLUMNS.items()}
#: The most decimal places a price or volume column is stored with as integers: Binance's
#: prices and quantities have at most 8.
_MAX_DECIMALS = 8
#: Chunk documents per reply batch: a few MB each, under the 48 MB reply limit.
_CHUNKS_PER_BATCH = 4
#: How often a writer re-reads the manifest when another writer of the series got in first.
_WRITE_ATTEMPTS = 5


def series_id(symbol: str, interval: str) -> str:
    """The manifest's ``_id``, e.g. ``"BTCUSDT/1m"``."""
    return f"{symbol}/{interval}"


def _unit(interval: str) -> str:
    """The numpy datetime unit of a chunk's period: a day, a month or a year (see above)."""
    length = interval_ms(interval)
    return "D" if length < 60_000 else "M" if length < 3_600_000 else "Y"


def encode(columns: Columns) -> tuple[dict[str, Binary], dict[str, int]]:
    """The stored form of each column, and the decimals of those stored as decimals (see the
    module docstring)."""
    stored, decimals = {}, {}
    for name, dtype in _LITTLE.items():
        values = np.ascontiguousarray(columns[name], dtype=dtype)
        if dtype.kind == "f" and (places := _decimals(values)) is not None:
            values, decimals[name] = np.round(values * 10**places).astype("<i8"), places
        if name in _DELTA or name in decimals:
            values = np.diff(values, prepend=values.dtype.type(0))
        shuffled = values.view(np.uint8).reshape(-1, dtype.itemsize).T.tobytes()
        stored[name] = Binary(zlib.compress(shuffled, _LEVEL))
    return stored, decimals


def _decimals(values: npt.NDArray[np.float64]) -> int | None:
    """The fewest decimal places (up to :data:`_MAX_DECIMALS`) that give back every value bit
    for bit as ``integer / 10**places``; None if there are none (or a value is NaN, -0.0 or
    beyond 2**53 units)."""
    exact = values.view(np.int64)
    for places in range(_MAX_DECIMALS + 1):
        units = np.round(values * 10**places)
        if not np.all(np.abs(units) < 2**53):
            return None
        if np.array_equal((units / 10**places).view(np.int64), exact):
            return places
    return None


def decode(doc: Mapping[str, Any], label: str) -> Columns:
    """The columns of a chunk document; :class:`MongoDataError` naming it when malformed."""
    count = doc.get("count")
    stored = doc.get("columns")
    decimals = doc.get("decimals", {})
    if (
        doc.get("codec") != CODEC
        or type(count) is not int
        or not isinstance(stored, Mapping)
        or not isinstance(decimals, Mapping)
    ):
        raise MongoDataError(
            f"the candle chunk {doc.get('_id')!r} in {label} is not a {CODEC} chunk with a "
            f"count and columns; write the series again with `stratorch ingest`"
        )
    columns: Columns = {}
    for name, dtype in _LITTLE.items():
        try:
            raw = zlib.decompress(stored[name])
            shuffled = np.frombuffer(raw, np.uint8).reshape(dtype.itemsize, count)
        except (KeyError, TypeError, ValueError, zlib.error) as exc:
            raise MongoDataError(
                f"the candle chunk {doc.get('_id')!r} in {label} has no readable column "
                f"{name!r} of {count} values ({exc}); write the series again with "
                f"`stratorch ingest`"
            ) from None
        contiguous = np.ascontiguousarray(shuffled.T)
        places = decimals.get(name) if dtype.kind == "f" else None
        if places is not None:
            if type(places) is not int or not 0 <= places <= _MAX_DECIMALS:
                raise MongoDataError(
                    f"the candle chunk {doc.get('_id')!r} in {label} gives {name!r} "
                    f"{places!r} decimals; write the series again with `stratorch ingest`"
                )
            values = np.cumsum(contiguous.view("<i8").reshape(count)) / 10**places
        else:
            values = contiguous.view(dtype).reshape(count)
            if name in _DELTA:
                values = np.cumsum(values)
        values.flags.writeable = False  # shared through the chunk cache
        columns[name] = values
    return columns


def content_hash(columns: Columns) -> str:
    """sha256 of the columns' little-endian bytes, in frame order: what the manifest, the
    fingerprint and the chunk cache know a chunk by."""
    digest = hashlib.sha256()
    for name, dtype in _LITTLE.items():
        digest.update(np.ascontiguousarray(columns[name], dtype=dtype).tobytes())
    return digest.hexdigest()


def chunks_for(manifest: Mapping[str, Any], window: Span) -> list[Document]:
    """The manifest entries of the chunks a load of ``window`` reads: those overlapping
    ``[start_ms, end_ms)``, and enough earlier ones to hold ``lookback`` bars; none if no
    chunk overlaps the window (no bars there).

    The bars of the first overlapping chunk before ``start_ms`` are not counted towards the
    lookback (the manifest does not know how many there are), so one chunk more than needed
    may be read, and fingerprinted: a cache miss when it changes, never a stale hit.
    """
    _, start_ms, end_ms, lookback = window
    entries: list[Document] = manifest["chunks"]
    first = bisect_left([e["last"] for e in entries], start_ms)
    end = bisect_left([e["first"] for e in entries], end_ms)
    if first >= end:
        return []
    begin, wanted = first, lookback
    while wanted > 0 and begin > 0:
        begin -= 1
        wanted -= entries[begin]["count"]
    return entries[begin:end]


def window_frame(chunks: Sequence[Columns], window: Span) -> pd.DataFrame | None:
    """The canonical frame of ``window``'s bars (after up to ``lookback`` earlier ones) out of
    consecutive chunks; None if none of their bars is in ``[start_ms, end_ms)``."""
    _, start_ms, end_ms, lookback = window
    times = np.concatenate([chunk["open_time"] for chunk in chunks])
    start, end = np.searchsorted(times, [start_ms, end_ms])
    if start == end:
        return None
    begin = max(0, int(start) - lookback)
    columns = {
        name: np.concatenate([c[name] for c in chunks])[begin:end] for name in CANDLE_COLUMNS
    }
    return pd.DataFrame(columns, copy=False)  # the arrays are new: no second copy


def chunk_collection(symbol: str, interval: str) -> str:
    """The collection of a series' chunks, e.g. ``candle_chunks.BTCUSDT.1m``."""
    return f"{CANDLE_CHUNKS}.{symbol}.{interval}"


async def read_chunks(
    chunks: AsyncCollection[Document], entries: Sequence[Mapping[str, Any]]
) -> list[Columns] | None:
    """The columns of the chunks ``entries`` name, in one query by ``_id`` (decoded in a
    worker thread); None if one is gone (a writer replaced it after the manifest was read).

    One ``$in`` query rather than one ``find`` per chunk: MongoDB answers either from the
    ``_id`` index, FerretDB v1 by scanning the series' collection, once for ``$in`` but up to
    the chunk for each ``find``.
    """
    ids = [entry["id"] for entry in entries]
    cursor = chunks.find({"_id": {"$in": ids}}, batch_size=_CHUNKS_PER_BATCH)
    docs = {doc["_id"]: doc for doc in await cursor.to_list()}
    if len(docs) < len(set(ids)):
        return None
    label = f"{chunks.database.name}.{chunks.name}"
    return await asyncio.to_thread(lambda: [decode(docs[_id], label) for _id in ids])


async def write_chunks(
    db: AsyncDatabase[Document], symbol: str, interval: str, frame: pd.DataFrame
) -> Written:
    """Merge the bars of ``frame`` into the columnar layout; how many bars are new, how many
    stored ones were replaced (other values), counted as the Parquet store counts them.

    Only the periods ``frame`` touches are read and, where their bars change, written again
    (a new chunk each, then the manifest); ingesting the same bars again writes nothing, so
    fingerprints stay as they were.

    :param db: the database, on a client that may write (the primary).
    :raises ValueError: a bad symbol, interval or frame.
    :raises shared.mongo.MongoError: the database failed, refused the write, or other writers
        of the series kept getting in first.
    """
    symbol = normalize_symbol(symbol)
    unit = _unit(interval)  # ValueError naming the known intervals
    validate_frame(frame)
    if frame.empty:
        return Written(0, 0)
    key = series_id(symbol, interval)
    series, chunks = db[CANDLE_SERIES], db[chunk_collection(symbol, interval)]
    periods = frame["open_time"].to_numpy().astype("datetime64[ms]").astype(f"datetime64[{unit}]")
    starts = np.flatnonzero(np.r_[True, periods[1:] != periods[:-1]]).tolist()
    pieces = [
        (str(periods[at]), frame.iloc[at:until])
        for at, until in zip(starts, [*starts[1:], len(frame)], strict=True)
    ]
    with mapped(f"writing {key} candles to {db.name}", needs=f"the readWrite role on {db.name}"):
        for _ in range(_WRITE_ATTEMPTS):
            manifest = await series.find_one({"_id": key})
            merge = await _merge(chunks, manifest, symbol, interval, pieces)
            if merge is None:
                continue
            entries, written = merge
            if entries == _entries(manifest):
                return Written(0, 0)
            if await _swap_manifest(series, manifest, symbol, interval, entries):
                gone = {e["id"] for e in _entries(manifest).values()}
                gone -= {e["id"] for e in entries.values()}
                if gone:
                    await chunks.delete_many({"_id": {"$in": sorted(gone)}})
                return written
            # Lost the race: the chunks inserted stay, for the next attempt (most likely the
            # same content, so the same _id) rather than be deleted under a writer that
            # found them stored.
    raise MongoError(
        f"writing {key} candles to {db.name}: other writers of the series changed it "
        f"{_WRITE_ATTEMPTS} times while this one merged; try again"
    )


def _entries(manifest: Mapping[str, Any] | None) -> dict[str, Document]:
    return {e["period"]: e for e in (manifest or {}).get("chunks", [])}


async def _merge(
    chunks: AsyncCollection[Document],
    manifest: Mapping[str, Any] | None,
    symbol: str,
    interval: str,
    pieces: Sequence[tuple[str, pd.DataFrame]],
) -> tuple[dict[str, Document], Written] | None:
    """Merge each period's bars into its stored chunk and insert the chunks that changed:
    the manifest's new entries, and the bars written.
    None if a chunk the manifest names is gone (another writer replaced it)."""
    entries = _entries(manifest)
    touched = [entries[period] for period, _ in pieces if period in entries]
    found = await read_chunks(chunks, touched) if touched else []
    if found is None:
        return None
    olds = {entry["period"]: columns for entry, columns in zip(touched, found, strict=True)}
    new = replaced = 0
    for period, piece in pieces:
        old, stored = entries.get(period), olds.get(period)
        merged = merge_frames([pd.DataFrame(stored), piece] if stored is not None else [piece])
        columns = {name: merged.frame[name].to_numpy() for name in CANDLE_COLUMNS}
        digest = content_hash(columns)
        if old is not None and old["hash"] == digest:
            continue
        doc = _chunk_doc(symbol, interval, period, columns, digest)
        with suppress(DuplicateKeyError):  # this very content is stored already (its _id)
            await chunks.insert_one(doc)
        entries[period] = {
            "id": doc["_id"],
            **{k: doc[k] for k in ("period", "count", "first", "last", "hash")},
        }
        new += len(merged.frame) - (0 if stored is None else len(stored["open_time"]))
        replaced += merged.conflicts
    return entries, Written(new, replaced)


def _chunk_doc(symbol: str, interval: str, period: str, columns: Columns, digest: str) -> Document:
    times = columns["open_time"]
    stored, decimals = encode(columns)
    return {
        "_id": f"{series_id(symbol, interval)}/{period}/{digest[:16]}",
        "symbol": symbol,
        "interval": interval,
        "period": period,
        "count": len(times),
        "first": int(times[0]),
        "last": int(times[-1]),
        "hash": digest,
        "codec": CODEC,
        "columns": stored,
        "decimals": decimals,
    }


async def _swap_manifest(
    series: AsyncCollection[Document],
    manifest: Document | None,
    symbol: str,
    interval: str,
    entries: Mapping[str, Document],
) -> bool:
    """Replace ``manifest`` by one naming ``entries``, unless another writer replaced it since
    it was read (then False)."""
    chunks = sorted(entries.values(), key=lambda e: e["first"])
    revision = 0 if manifest is None else manifest["revision"]
    doc = {
        "_id": series_id(symbol, interval),
        "symbol": symbol,
        "interval": interval,
        "revision": revision + 1,
        "count": sum(e["count"] for e in chunks),
        "first": chunks[0]["first"],
        "last": chunks[-1]["last"],
        "chunks": chunks,
        "updated_at": datetime.now(UTC),
    }
    if manifest is None:
        try:
            await series.insert_one(doc)
        except DuplicateKeyError:
            return False
        return True
    done = await series.replace_one({"_id": doc["_id"], "revision": revision}, doc)
    return done.matched_count == 1
