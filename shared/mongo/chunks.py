"""Candles in MongoDB, columnar: a series' bars in one document per period, named by a manifest.

A manifest per series in ``candle_series``, and the series' chunks in collections of its own,
one per year (``candle_chunks.<SYMBOL>.<interval>.<year>``; per month for ``1s`` bars, one for
the whole series from ``1h`` on; database ``STRATORCH_MONGO_DB``)::

    candle_series                    {_id: "BTCUSDT/1m", symbol, interval, revision: <int>,
                                      count, first, last,
                                      chunks: [{id, collection, period, count, first, last,
                                                hash}]}
    candle_chunks.BTCUSDT.1m.2024    {_id: "BTCUSDT/1m/2024-03/<hash[:16]>", symbol, interval,
                                      period, count, first, last, hash,
                                      codec: "predict-shuffle-zstd", decimals: {open: 2, ...},
                                      predictors: {open: "previous close", ...},
                                      open_time: <binary>, open: <binary>, ...}

``first``/``last`` are open times (ms), ``count`` bars, ``hash`` the sha256 of the chunk's
columns (:func:`content_hash`). A period is a UTC calendar day for ``1s`` bars (86,400 bars), a
month for ``1m`` to ``30m`` (at most 44,640 bars: ~1.4 MB stored, ~3.9 MB decoded), a year from
``1h`` on: chunks of some thousands to tens of thousands of bars, where the test server's
per-document cost (a few ms) is small beside its per-byte cost (~40-50 MB/s).

How a column is stored (:func:`encode`). First as int64 "units": a float column whose every
value is ``integer / 10**k`` bit for bit (``k`` ≤ 8: Binance's prices and quantities) as those
integers, named in ``decimals``; any other float column as its IEEE bits; integer columns as
they are. Then, if it compresses smaller, as its difference to a prediction, named in
``predictors``: the previous bar's value (times, prices on a random walk), or a neighbouring
column in the same units: ``open`` the previous ``close`` (a bar opens where the last closed:
on Binance nearly always), ``high`` and ``low`` the higher and lower of ``open`` and ``close``
(the wick is what is left), ``taker_buy_base`` and ``taker_buy_quote`` the volume they are part
of. Each choice is made per chunk on its first bars, so data without that shape costs nothing.
The differences are zigzagged (small either side of zero have all high bytes zero), their bytes
shuffled (all first bytes, then all second bytes, ...: blosc's trick, which puts the nearly
constant high bytes of neighbouring values together) and compressed with zstd (see
:data:`_LEVEL`). A month of 1m bars is then ~19 bytes a bar on Binance's grid (~33 for random
53-bit mantissas) instead of 88; the reader decodes ~15M bars/s, in worker threads while the
next chunks arrive. Chunks of the first codec, ``shuffle-zlib`` (only times and decimal columns
as differences to the previous bar, nothing zigzagged, deflated, under a sub-document
``columns``: ~26 and ~53 bytes a bar), still read; a period is written in the new codec when
its bars change (ingesting the same bars again writes nothing). The columns are fields of the
chunk itself rather than of a sub-document because FerretDB v1 parses the JSON it stores
documents in once more for each level of nesting: a chunk reads ~30 % faster there. On MongoDB
it is one BSON document either way, and a projection can still pick columns.

Why collections per series and year, each read with one ``$in`` query, the queries at once:
FerretDB v1 (the test server) finds even an ``_id`` by scanning the collection (decoding every
document, at ~40-50 MB/s, on one core per query), up to the document for a ``find_one``; one
``$in`` scans the collection once, whatever else the database holds, and a window of a few
months scans a year, not the series' whole history; a read of several years keeps both cores
of the test machine busy (2M full-precision 1m bars: ~1.2 s instead of ~2). On MongoDB these
are ``_id`` index lookups either way, and the partitions are few (one a year; a month of ``1s``
bars is ~2.6M of them). A manifest entry without ``collection`` (written before) names a chunk
in the series' collection, ``candle_chunks.<SYMBOL>.<interval>``.

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
import zstandard
from bson.binary import Binary
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from shared.candles.frame import CANDLE_COLUMNS, Span, Written, merge_frames, validate_frame
from shared.candles.store import normalize_symbol
from shared.intervals import interval_ms
from shared.mongo._client import MongoDataError, MongoError, gather_all, mapped
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

CODEC = "predict-shuffle-zstd"
#: The first codec: times and decimal columns as plain differences to the previous bar, every
#: other column as it is, deflated. Its chunks are still read; ``stratorch ingest`` writes
#: :data:`CODEC`.
_CODEC_1 = "shuffle-zlib"
#: zstd's default level. On candles' shuffled bytes (mostly entropy-coded literals, few
#: matches) every level from 1 to 12 gives the same size, ~1-2 % more than deflate's level 6,
#: and zstd packs 30 times as fast and unpacks 10 times as fast (~15 ns a bar instead of ~150:
#: CPU a read on a 2-core machine takes from the database server).
_LEVEL = 3
_LITTLE = {name: dtype.newbyteorder("<") for name, dtype in CANDLE_COLUMNS.items()}
#: The most decimal places a price or volume column is stored with as integers: Binance's
#: prices and quantities have at most 8.
_MAX_DECIMALS = 8
#: What a column may be predicted from besides its previous value, and the columns each
#: prediction reads: a bar opens at the previous close (on Binance nearly always), its high and
#: low are the higher and lower of open and close plus a wick, and taker buys are part of the
#: volume.
_PREDICTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "previous close": ("open", ("close",)),
    "max(open, close)": ("high", ("open", "close")),
    "min(open, close)": ("low", ("open", "close")),
    "volume": ("taker_buy_base", ("volume",)),
    "quote_volume": ("taker_buy_quote", ("quote_volume",)),
}
#: The order columns are encoded and decoded in: each after those it may be predicted from.
_ORDER = (
    "open_time",
    "close_time",
    "close",
    "open",
    "high",
    "low",
    "volume",
    "quote_volume",
    "taker_buy_base",
    "taker_buy_quote",
    "trades",
)
#: Bars of a chunk packed per candidate to choose each column's predictor.
_SAMPLE = 4096
#: How many leading characters of a chunk's period name its collection, by the unit of the
#: period (see :func:`_unit`): daily chunks a month's, monthly ones a year's, yearly ones none
#: (the series' collection).
_PARTITION = {"D": 7, "M": 4, "Y": 0}
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


def encode(columns: Columns) -> Document:
    """The fields of a chunk document that hold its bars (see the module docstring): ``codec``,
    ``count``, each stored column by its name, the ``decimals`` of those stored as decimal
    integers and the ``predictors`` of those stored as differences to a prediction."""
    values, units, decimals = {}, {}, {}
    for name, dtype in _LITTLE.items():
        values[name] = np.ascontiguousarray(columns[name], dtype=dtype)
        places = _decimals(values[name]) if dtype.kind == "f" else None
        if places is None:
            units[name] = values[name].view("<i8")
        else:
            units[name], decimals[name] = np.round(values[name] * 10**places).astype("<i8"), places
    stored, predictors = {}, {}
    for name in _ORDER:
        candidates = {"": units[name], "previous": np.diff(units[name], prepend=np.int64(0))}
        for predictor, (column, reads) in _PREDICTORS.items():
            if column == name and all(decimals.get(r) == decimals.get(name) for r in reads):
                candidates[predictor] = units[name] - _prediction(predictor, values, units)
        best = min(candidates, key=lambda p: len(_pack(candidates[p][:_SAMPLE])))
        stored[name] = Binary(_pack(candidates[best]))
        if best:
            predictors[name] = best
    return {
        "codec": CODEC,
        "count": len(units["open_time"]),
        **stored,
        "decimals": decimals,
        "predictors": predictors,
    }


def _pack(differences: npt.NDArray[np.int64]) -> bytes:
    """Differences zigzagged (0, -1, 1, -2, ... to 0, 1, 2, 3, ...: small either side of zero
    have all high bytes zero), their bytes shuffled, compressed."""
    zigzag = (differences.view(np.uint64) << np.uint64(1)) ^ (differences >> 63).view(np.uint64)
    return zstandard.compress(zigzag.view(np.uint8).reshape(-1, 8).T.tobytes(), _LEVEL)


def _unpack(data: bytes, count: int, codec: str) -> npt.NDArray[np.int64]:
    """What :func:`_pack` packed; or :data:`_CODEC_1`'s deflated, not zigzagged, column."""
    if codec == _CODEC_1:
        unpacked = zlib.decompress(data)
    else:
        unpacked = zstandard.decompress(data, max_output_size=8 * count)
    shuffled = np.frombuffer(unpacked, np.uint8).reshape(8, count)
    raw = np.ascontiguousarray(shuffled.T).view(np.uint64).reshape(count)
    if codec == _CODEC_1:
        return raw.view(np.int64)
    return ((raw >> np.uint64(1)) ^ (np.uint64(0) - (raw & np.uint64(1)))).view(np.int64)


def _prediction(
    predictor: str, values: Mapping[str, npt.NDArray[Any]], units: Mapping[str, npt.NDArray[Any]]
) -> npt.NDArray[np.int64]:
    """What ``predictor`` predicts, in the stored units of the columns it reads (its column's:
    the same decimals, or all stored as float bits)."""
    if predictor == "previous close":
        return np.concatenate(([np.int64(0)], units["close"][:-1]))
    if predictor == "max(open, close)":
        return np.where(values["open"] >= values["close"], units["open"], units["close"])
    if predictor == "min(open, close)":
        return np.where(values["open"] <= values["close"], units["open"], units["close"])
    return np.asarray(units[predictor], dtype=np.int64)  # a volume: part of it


def _decimals(values: npt.NDArray[np.float64]) -> int | None:
    """The fewest decimal places (up to :data:`_MAX_DECIMALS`) that give back every value bit
    for bit as ``integer / 10**places``; None if there are none (or a value is NaN, -0.0 or
    beyond 2**53 units)."""
    exact = values.view(np.int64)
    for places in range(_MAX_DECIMALS + 1):
        units = np.round(values * 10**places)
        if not np.all(np.abs(units) < 2**53):
            return None
        if np.array_equal((units.astype(np.int64) / 10**places).view(np.int64), exact):
            return places
    return None


def decode(doc: Mapping[str, Any], label: str) -> Columns:
    """The columns of a chunk document (either codec); :class:`MongoDataError` naming it when
    malformed."""
    codec, count = doc.get("codec"), doc.get("count")
    stored = doc.get("columns") if codec == _CODEC_1 else doc
    decimals = doc.get("decimals", {})
    predictors = doc.get("predictors", {})
    if (
        codec not in (CODEC, _CODEC_1)
        or type(count) is not int
        or not isinstance(stored, Mapping)
        or not isinstance(decimals, Mapping)
        or not isinstance(predictors, Mapping)
    ):
        raise MongoDataError(
            f"the candle chunk {doc.get('_id')!r} in {label} is not a {CODEC} chunk with a "
            f"count and columns; write the series again with `stratorch ingest`"
        )
    if codec == _CODEC_1:
        predictors = dict.fromkeys(["open_time", "close_time", *decimals], "previous")

    def malformed(what: str) -> MongoDataError:
        return MongoDataError(
            f"the candle chunk {doc.get('_id')!r} in {label} has {what}; write the series "
            f"again with `stratorch ingest`"
        )

    values: Columns = {}
    units: dict[str, npt.NDArray[np.int64]] = {}
    for name in _ORDER:
        dtype = _LITTLE[name]
        try:
            differences = _unpack(stored[name], count, codec)
        except (KeyError, TypeError, ValueError, zlib.error, zstandard.ZstdError) as exc:
            raise malformed(f"no readable column {name!r} of {count} values ({exc})") from None
        places = decimals.get(name) if dtype.kind == "f" else None
        if places is not None and (type(places) is not int or not 0 <= places <= _MAX_DECIMALS):
            raise malformed(f"{places!r} decimals for {name!r}")
        predictor = predictors.get(name)
        if predictor is None:
            units[name] = differences
        elif predictor == "previous":
            units[name] = np.cumsum(differences)
        elif _PREDICTORS.get(predictor, ("",))[0] == name:
            units[name] = differences + _prediction(predictor, values, units)
        else:
            raise malformed(f"the unknown predictor {predictor!r} for {name!r}")
        column = units[name] / 10**places if places is not None else units[name].view(dtype)
        column.flags.writeable = False  # shared through the chunk cache
        values[name] = column
    return {name: values[name] for name in _LITTLE}


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


def chunk_collection(symbol: str, interval: str, period: str | None = None) -> str:
    """The collection of a series' chunks of ``period``: a year's, or a month's for daily
    chunks, e.g. ``candle_chunks.BTCUSDT.1m.2024``, ``candle_chunks.BTCUSDT.1s.2024-03``;
    the series' own, e.g. ``candle_chunks.BTCUSDT.1h``, for yearly chunks and (no ``period``)
    chunks written before the manifest named their collection."""
    series = f"{CANDLE_CHUNKS}.{symbol}.{interval}"
    part = _PARTITION[_unit(interval)]
    return f"{series}.{period[:part]}" if period is not None and part else series


def _collection(entry: Mapping[str, Any], symbol: str, interval: str) -> str:
    """The collection of the chunk a manifest entry names."""
    name: str = entry.get("collection") or chunk_collection(symbol, interval)
    return name


async def read_chunks(
    db: AsyncDatabase[Document], symbol: str, interval: str, entries: Sequence[Mapping[str, Any]]
) -> list[Columns] | None:
    """The columns of the chunks ``entries`` name, by ``_id``: one query per collection, the
    queries at once; None if one is gone (a writer replaced it after the manifest was read).
    Each chunk is decoded in a worker thread as soon as it arrives, while the next reply is
    fetched (zstd and numpy release the GIL).

    One ``$in`` query per collection rather than one ``find`` per chunk: MongoDB answers either
    from the ``_id`` index, FerretDB v1 by scanning the collection, once for ``$in`` but up to
    the chunk for each ``find``; FerretDB answers each query on one core, so the collections'
    queries keep both of the test machine's busy.
    """
    wanted: dict[str, list[str]] = {}
    for entry in entries:
        wanted.setdefault(_collection(entry, symbol, interval), []).append(entry["id"])
    parts = await gather_all(*(_read(db[name], ids) for name, ids in wanted.items()))
    found = {_id: columns for part in parts for _id, columns in part.items()}
    if len(found) < len({entry["id"] for entry in entries}):
        return None
    return [found[entry["id"]] for entry in entries]


async def _read(chunks: AsyncCollection[Document], ids: list[str]) -> dict[str, Columns]:
    """Those of the chunks ``ids`` that ``chunks`` holds, by ``_id``."""
    label = f"{chunks.database.name}.{chunks.name}"
    decoding: dict[str, asyncio.Future[Columns]] = {}
    try:
        async for doc in chunks.find({"_id": {"$in": ids}}, batch_size=_CHUNKS_PER_BATCH):
            decoding[doc["_id"]] = asyncio.ensure_future(asyncio.to_thread(decode, doc, label))
    finally:
        decoded = await gather_all(*decoding.values())
    return dict(zip(decoding, decoded, strict=True))


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
    series = db[CANDLE_SERIES]
    periods = frame["open_time"].to_numpy().astype("datetime64[ms]").astype(f"datetime64[{unit}]")
    starts = np.flatnonzero(np.r_[True, periods[1:] != periods[:-1]]).tolist()
    pieces = [
        (str(periods[at]), frame.iloc[at:until])
        for at, until in zip(starts, [*starts[1:], len(frame)], strict=True)
    ]
    with mapped(f"writing {key} candles to {db.name}", needs=f"the readWrite role on {db.name}"):
        for _ in range(_WRITE_ATTEMPTS):
            manifest = await series.find_one({"_id": key})
            merge = await _merge(db, manifest, symbol, interval, pieces)
            if merge is None:
                continue
            entries, written = merge
            if entries == _entries(manifest):
                return Written(0, 0)
            if await _swap_manifest(series, manifest, symbol, interval, entries):
                gone: dict[str, list[str]] = {}
                kept = {e["id"] for e in entries.values()}
                for entry in _entries(manifest).values():
                    if entry["id"] not in kept:
                        where = _collection(entry, symbol, interval)
                        gone.setdefault(where, []).append(entry["id"])
                for where, ids in gone.items():
                    await db[where].delete_many({"_id": {"$in": ids}})
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
    db: AsyncDatabase[Document],
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
    found = await read_chunks(db, symbol, interval, touched) if touched else []
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
        collection = chunk_collection(symbol, interval, period)
        with suppress(DuplicateKeyError):  # this very content is stored already (its _id)
            await db[collection].insert_one(doc)
        entries[period] = {
            "id": doc["_id"],
            "collection": collection,
            **{k: doc[k] for k in ("period", "count", "first", "last", "hash")},
        }
        new += len(merged.frame) - (0 if stored is None else len(stored["open_time"]))
        replaced += merged.conflicts
    return entries, Written(new, replaced)


def _chunk_doc(symbol: str, interval: str, period: str, columns: Columns, digest: str) -> Document:
    times = columns["open_time"]
    return {
        "_id": f"{series_id(symbol, interval)}/{period}/{digest[:16]}",
        "symbol": symbol,
        "interval": interval,
        "period": period,
        "first": int(times[0]),
        "last": int(times[-1]),
        "hash": digest,
        **encode(columns),
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
