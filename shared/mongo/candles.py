"""Candles in MongoDB: the services' candle source, and the per-bar layout's writer.

Two layouts. The columnar one (:mod:`shared.mongo.chunks`: a manifest per series naming its
chunks, each a period's columns packed in binary) is what ``stratorch ingest --mongo`` writes
and what :class:`MongoCandleSource` reads first. A series without a manifest is read from the
per-bar layout users already have (DESIGN.md "Data"), which :func:`convert_collection` turns
into the columnar one: collection ``candles``, one document per bar, unique on
(symbol, interval, open_time)::

    {symbol: "BTCUSDT", interval: "1h", open_time: <int64 ms>, open, high, low, close, volume,
     close_time, quote_volume, trades, taker_buy_base, taker_buy_quote,
     version: <int>, ingested_at: <date>}

Prices and volumes are doubles, times and ``trades`` integers, exactly the values of the
canonical candle frame (:mod:`shared.candles.frame`); ``version`` and ``ingested_at`` are set by
:func:`write_candles` on every bar it inserts or changes (see
:meth:`MongoCandleSource.fingerprint` for why). Since both stores are filled through the one
Binance parser and doubles round-trip through BSON exactly, :meth:`MongoCandleSource.load`
returns the frame :meth:`shared.candles.ParquetCandleStore.read` returns, bit for bit.

Speed of the per-bar layout. A load is two indexed range queries (the bars, and the warm-up
bars before them), run concurrently, projected on the eleven frame fields, in cursor batches of
:data:`_CURSOR_BATCH` documents; the frame is then built column by column with numpy, in a
worker thread. PyMongo's C extension decodes the BSON; then no Python bytecode runs per
document: per field, ``map`` applies ``itemgetter`` (and ``type``, to refuse strings and
``None`` that numpy would quietly convert) in C, and numpy converts the list.

FerretDB v1 (the Mongo wire-protocol server the integration tests run on) pushes no filter
down to its storage except ``_id`` equality in ``find``: every other query, and every update or
delete even by ``_id``, scans the whole collection. There a load's time grows with the
collection rather than with the bars returned (~12 s for 100k bars), and correcting ``n`` stored
bars costs ``n`` scans. Nothing here depends on it; on MongoDB every query below is an index
range scan, and inserting new bars (the usual ingest) is plain bulk inserts on both.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, NamedTuple, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
from bson.int64 import Int64
from pymongo import InsertOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from shared.candles.frame import CANDLE_COLUMNS, Span, Written, utc_text, validate_frame
from shared.candles.store import missing_symbol_message, normalize_symbol
from shared.errors import NoDataError
from shared.intervals import INTERVAL_MS, interval_ms
from shared.mongo._client import (
    MongoDataError,
    MongoError,
    gather_all,
    mapped,
    new_client,
    redact,
)
from shared.mongo._schema import CANDLE_SERIES, CANDLES, COUNTERS
from shared.mongo.chunk_cache import ChunkCache
from shared.mongo.chunks import (
    Columns,
    chunks_for,
    read_chunks,
    series_id,
    window_frame,
    write_chunks,
)

__all__ = [
    "DEFAULT_READ_PREFERENCE",
    "MongoCandleSource",
    "convert_collection",
    "write_candles",
]

Document = dict[str, Any]

#: Where the candle source reads when its URL does not say: a secondary if there is one, so
#: backtests never load the primary, else the primary (DESIGN.md "Ports").
DEFAULT_READ_PREFERENCE = "secondaryPreferred"
#: Documents per cursor batch (``getMore``): about 4 MB of candle BSON, a quarter of the 16 MB
#: reply limit. MongoDB's default first batch is 101 documents, i.e. a thousand round trips for
#: 100k bars; this makes it five.
_CURSOR_BATCH = 20_000
#: Operations per ``bulk_write`` call of :func:`write_candles`: a few MB per request, so one
#: failure never costs much work and progress stays even.
_WRITE_BATCH = 5_000
#: Bars :func:`convert_collection` holds before writing them: ~100 MB of documents.
_CONVERT_BATCH = 500_000
_FIELDS = tuple(CANDLE_COLUMNS)
_PROJECTION: Mapping[str, int] = {"_id": 0, **dict.fromkeys(_FIELDS, 1)}
#: Python types BSON numbers decode to that a column accepts without loss. ``bool`` is not
#: among them (``type(True) is bool``), nor strings or ``None``, which numpy would convert.
_INTEGERS = frozenset({int, Int64})
_NUMBERS = frozenset({int, Int64, float})
_READ_PREFERENCE = re.compile(r"[?&;]readpreference=", re.IGNORECASE)
_DUPLICATE_KEY = 11000
#: How often a load reads the manifest again when a chunk it names was replaced meanwhile.
_READ_ATTEMPTS = 5


class MongoCandleSource:
    """:class:`shared.ports.CandleSource` over MongoDB's ``candles`` collection.

    It has a client of its own, from its own URL: on the real stack that is
    ``STRATORCH_CANDLES_MONGO_URL``, a read-only user reading from secondaries. The URL's
    ``readPreference`` is kept; without one, :data:`DEFAULT_READ_PREFERENCE` applies. The
    client connects on first use; :meth:`ping` checks it at start. Use it as an async context
    manager, or call :meth:`aclose` (idempotent).

    A series with a manifest (``candle_series``) is read from its columnar chunks
    (:mod:`shared.mongo.chunks`); one without, from the per-bar ``candles`` collection.

    :param url: a MongoDB connection string (its password never appears in messages).
    :param database: the database holding the candles (``STRATORCH_MONGO_DB``).
    :param cache: decoded chunks kept between loads (by content hash); None: none kept.
    :param options: PyMongo client options; they override the URL's.
    :raises shared.mongo.MongoConfigError: the URL is malformed.
    """

    def __init__(
        self,
        url: str,
        database: str = "stratorch",
        *,
        cache: ChunkCache | None = None,
        **options: Any,
    ) -> None:
        if not _READ_PREFERENCE.search(url):
            options.setdefault("readPreference", DEFAULT_READ_PREFERENCE)
        self._client = new_client(url, **options)
        self._closed = False
        self._where = redact(url)
        self.database = database
        self.cache = cache
        db = self._client[database]
        self._candles: AsyncCollection[Document] = db[CANDLES]
        self._series: AsyncCollection[Document] = db[CANDLE_SERIES]

    def __repr__(self) -> str:
        return f"MongoCandleSource(url={self._where!r}, database={self.database!r})"

    @property
    def read_preference(self) -> str:
        """The read preference in force, by its URL name, e.g. ``"secondaryPreferred"``."""
        name: str = self._client.read_preference.mongos_mode
        return name

    async def ping(self) -> None:
        """Check that a server the read preference allows answers.

        :raises shared.mongo.MongoUnavailable: none does.
        """
        with self._mapped("pinging the candle database"):
            await self._client.admin.command("ping", read_preference=self._client.read_preference)

    async def load(self, symbol: str, window: Span) -> pd.DataFrame:
        """The bars with ``start_ms <= open_time < end_ms``, after up to ``lookback`` earlier ones.

        The same frame as :meth:`shared.candles.ParquetCandleStore.read` for the same bars:
        columns, dtypes, values (bit for bit) and a ``RangeIndex``.

        :param symbol: e.g. ``BTCUSDT`` (case-insensitive).
        :param window: the interval (e.g. ``"1h"``); the first ``open_time`` wanted
            (inclusive) and the bound (exclusive), ms since the epoch (UTC); and ``lookback``,
            rows (not time) before ``start_ms`` to prepend as indicator warm-up (fewer if the
            collection starts later).
        :raises NoDataError: no bar in ``[start_ms, end_ms)``; the message lists the symbols
            and intervals stored, or the range stored for this one.
        :raises shared.mongo.MongoError: the database failed, or holds a malformed bar.
        """
        interval, start_ms, end_ms, lookback = window
        _check_lookback(lookback)
        symbol = _series(symbol, interval)
        with self._mapped(f"loading {symbol} {interval} candles"):
            for _ in range(_READ_ATTEMPTS):
                manifest = await self._series.find_one({"_id": series_id(symbol, interval)})
                if manifest is None:
                    return await self._load_bars(symbol, window)
                entries = chunks_for(manifest, window)
                chunks = await self._read_chunks(symbol, interval, entries)
                if chunks is not None:
                    break
            else:
                raise MongoError(
                    f"loading {symbol} {interval} candles: the chunks kept being replaced "
                    f"while they were read (an ingest running); try again"
                )
        frame = await asyncio.to_thread(window_frame, chunks, window) if chunks else None
        if frame is None:
            raise NoDataError(
                _range_message(
                    symbol,
                    interval,
                    start_ms,
                    end_ms,
                    where=f"{self.database}.{CANDLE_SERIES}",
                    count=manifest["count"],
                    first=manifest["first"],
                    last=manifest["last"],
                    ingest=_ingest_command(self.database, symbol, interval),
                ),
                symbol=symbol,
            )
        return frame

    async def _load_bars(self, symbol: str, window: Span) -> pd.DataFrame:
        """:meth:`load` from the per-bar ``candles`` collection."""
        interval, start_ms, end_ms, lookback = window
        key = {"symbol": symbol, "interval": interval}
        with self._mapped(f"loading {symbol} {interval} candles"):
            bars, warm_up = await gather_all(
                self._find({**key, "open_time": {"$gte": start_ms, "$lt": end_ms}}, 1),
                self._find({**key, "open_time": {"$lt": start_ms}}, -1, lookback)
                if lookback
                else _nothing(),
            )
        if not bars:
            message = await self._empty_message(symbol, interval, start_ms, end_ms)
            raise NoDataError(message, symbol=symbol)
        warm_up.reverse()
        return await asyncio.to_thread(_frame, warm_up + bars, f"{self.database}.{CANDLES}")

    async def _read_chunks(
        self, symbol: str, interval: str, entries: list[Document]
    ) -> list[Columns] | None:
        """The chunks ``entries`` name: from the cache, the others in one query; None if one
        is gone (replaced since the manifest was read)."""
        cache = self.cache
        found: dict[str, Columns] = {}
        for entry in entries:
            if cache is not None and (hit := cache.get(entry["hash"])) is not None:
                found[entry["hash"]] = hit
        missing = [e for e in entries if e["hash"] not in found]
        if missing:
            db = self._client[self.database]
            read = await read_chunks(db, symbol, interval, missing)
            if read is None:
                return None
            for entry, columns in zip(missing, read, strict=True):
                found[entry["hash"]] = columns
                if cache is not None:
                    cache.put(entry["hash"], columns)
        return [found[e["hash"]] for e in entries]

    async def fingerprint(self, symbol: str, window: Span) -> str:
        """Identifies the bars :meth:`load` would return (``"no_data"`` if none).

        Part of the result cache key, so it must change whenever those bars do. Of a columnar
        series it is one ``_id`` lookup: the sha256 of the window and of the content hashes
        the manifest gives for the chunks :meth:`load` would read, which change exactly when
        their bars do (a window inside a gap between bars of one chunk gets a fingerprint,
        though :meth:`load` finds no bars: a cache key that is never used).
        """
        interval, lookback = window.interval, window.lookback
        _check_lookback(lookback)
        try:
            symbol = _series(symbol, interval)
        except NoDataError:
            return "no_data"
        with self._mapped(f"fingerprinting {symbol} {interval} candles"):
            manifest = await self._series.find_one({"_id": series_id(symbol, interval)})
        if manifest is None:
            return await self._fingerprint_bars(symbol, window)
        entries = chunks_for(manifest, window)
        if not entries:
            return "no_data"
        digest = hashlib.sha256(repr(tuple(window)).encode())
        for entry in entries:
            digest.update(entry["hash"].encode())
        return f"chunks:{digest.hexdigest()}"

    async def _fingerprint_bars(self, symbol: str, window: Span) -> str:
        """:meth:`fingerprint` of a series in the per-bar ``candles`` collection.

        Hashing the bars (as the Parquet store does) would mean reading 100k documents on
        every request; this is what the database answers from its indexes and a small read
        instead:

        - how many bars there are in ``[start_ms, end_ms)``, the first and last ``open_time``
          among them, and the ``open_time`` of the first warm-up bar: these change when a bar
          is added or removed;
        - the highest ``version`` among those bars: :func:`write_candles` stamps every bar it
          inserts or whose values it changes with a new version from a counter that only
          grows (``counters`` collection), and leaves identical bars alone, so this changes
          when any value changes and stays equal when the same data is ingested again.

        So writers other than :func:`write_candles` must stamp a higher ``version`` on every
        bar they change, or a cached result may be served for the old values. The queries
        are not one snapshot: a write landing between them can give a fingerprint of neither
        state, which costs a cache miss, or of the state just before the write, the same as
        a request that came a moment earlier. On MongoDB the count, first and last bar are
        index-only; the highest version reads the range's documents on the server (covered
        by an index on (symbol, interval, open_time, version), should that ever matter).
        """
        interval, start_ms, end_ms, lookback = window
        key = {"symbol": symbol, "interval": interval}
        in_range = {**key, "open_time": {"$gte": start_ms, "$lt": end_ms}}
        time_only = {"_id": 0, "open_time": 1}
        coll = self._candles
        with self._mapped(f"fingerprinting {symbol} {interval} candles"):
            count, first, last, newest, warm_up = await gather_all(
                coll.count_documents(in_range),
                coll.find_one(in_range, time_only, sort=[("open_time", 1)]),
                coll.find_one(in_range, time_only, sort=[("open_time", -1)]),
                coll.find_one(in_range, {"_id": 0, "version": 1}, sort=[("version", -1)]),
                coll.find(
                    {**key, "open_time": {"$lt": start_ms}},
                    {"_id": 0, "open_time": 1, "version": 1},
                    sort=[("open_time", -1)],
                    limit=lookback,
                ).to_list()
                if lookback
                else _nothing(),
            )
        if not count or first is None or last is None:
            return "no_data"
        stamps = [doc.get("version") for doc in [*warm_up, newest or {}]]
        version = max((v for v in stamps if type(v) in _INTEGERS), default=None)
        begin = warm_up[-1]["open_time"] if warm_up else first["open_time"]
        return (
            f"mongo:{len(warm_up)}+{count}:{begin}:{first['open_time']}-{last['open_time']}"
            f":v{version}"
        )

    async def aclose(self) -> None:
        """Close the client; idempotent."""
        if not self._closed:
            self._closed = True
            await self._client.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(
                f"{self!r} was not closed; use `async with` or `await source.aclose()`",
                ResourceWarning,
                stacklevel=2,
            )

    def _mapped(self, doing: str) -> AbstractContextManager[None]:
        return mapped(doing, where=self._where, needs=f"the read role on {self.database}")

    async def _find(self, query: Document, direction: int, limit: int = 0) -> list[Document]:
        cursor = self._candles.find(
            query,
            _PROJECTION,
            sort=[("open_time", direction)],
            limit=limit,
            batch_size=_CURSOR_BATCH,
        )
        return await cursor.to_list()

    async def _empty_message(self, symbol: str, interval: str, start_ms: int, end_ms: int) -> str:
        key = {"symbol": symbol, "interval": interval}
        coll = self._candles
        time_only = {"_id": 0, "open_time": 1}
        with self._mapped(f"looking up which {symbol} {interval} candles are stored"):
            first, last, count = await gather_all(
                coll.find_one(key, time_only, sort=[("open_time", 1)]),
                coll.find_one(key, time_only, sort=[("open_time", -1)]),
                coll.count_documents(key),
            )
        if first is None or last is None:
            return await self._missing_message(symbol, interval)
        return _range_message(
            symbol,
            interval,
            start_ms,
            end_ms,
            where=f"{self.database}.{CANDLES}",
            count=count,
            first=first["open_time"],
            last=last["open_time"],
            ingest=_ingest_command(self.database, symbol, interval),
        )

    async def _missing_message(self, symbol: str, interval: str) -> str:
        coll = self._candles
        with self._mapped(f"looking up which candles are stored besides {symbol} {interval}"):
            here, intervals, series = await gather_all(
                coll.distinct("symbol", {"interval": interval}),
                coll.distinct("interval", {"symbol": symbol}),
                self._series.find({}, {"symbol": 1, "interval": 1}).to_list(),
            )
        here = sorted(
            {str(s) for s in here} | {s["symbol"] for s in series if s["interval"] == interval}
        )
        intervals = {*intervals, *(s["interval"] for s in series if s["symbol"] == symbol)}
        elsewhere = [other for other in INTERVAL_MS if other in intervals and other != interval]
        return missing_symbol_message(
            symbol,
            interval,
            where=f"the candle database ({self.database}.{CANDLES})",
            here=here,
            elsewhere=elsewhere,
            ingest=_ingest_command(self.database),
        )


async def write_candles(
    db: AsyncDatabase[Document],
    symbol: str,
    interval: str,
    frame: pd.DataFrame,
    *,
    batch_size: int = _WRITE_BATCH,
) -> Written:
    """Merge the bars of ``frame`` into ``db.candles``; how many bars are new, how many
    stored ones were replaced.

    A bar of ``frame`` that is not stored is inserted; one that is stored with other values
    (compared bit for bit) is updated in place; one stored with the same values is left
    alone, so ingesting the same files again writes nothing and leaves
    :meth:`MongoCandleSource.fingerprint` as it was. Inserted and updated bars get the next
    ``version`` of the ``counters`` collection and ``ingested_at``. Fields other than the
    frame's (if a document has any) are kept.

    How: one read of the stored bars in the frame's time span, a vectorized comparison, then
    unordered bulk writes of ``batch_size`` operations: inserts, and updates by ``_id``. A bar
    another writer inserts meanwhile fails its insert with a duplicate key and is upserted by
    (symbol, interval, open_time) instead. Run :func:`shared.mongo.ensure_indexes` first: the
    unique index is what makes concurrent writers safe.

    :param db: the database, on a client that may write (the primary).
    :param symbol: e.g. ``BTCUSDT`` (upper-cased).
    :param interval: the bars' interval, e.g. ``"1h"``.
    :param frame: a canonical candle frame (:func:`shared.candles.validate_frame`).
    :param batch_size: operations per ``bulk_write`` call.
    :raises ValueError: a bad symbol, interval or frame.
    :raises shared.mongo.MongoError: the database failed or refused the write.
    """
    symbol = normalize_symbol(symbol)
    interval_ms(interval)  # ValueError naming the known intervals
    validate_frame(frame)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if frame.empty:
        return Written(0, 0)
    coll = db[CANDLES]
    key = {"symbol": symbol, "interval": interval}
    times = frame["open_time"].to_numpy()
    span = {"$gte": int(times[0]), "$lte": int(times[-1])}
    doing = f"writing {symbol} {interval} candles to {db.name}.{CANDLES}"
    with mapped(doing, needs=f"the readWrite role on {db.name}"):
        stored = await coll.find(
            {**key, "open_time": span},
            {**_PROJECTION, "_id": 1},
            sort=[("open_time", 1)],
            batch_size=_CURSOR_BATCH,
        ).to_list()
        plan = await asyncio.to_thread(_plan_write, frame, stored, f"{db.name}.{CANDLES}")
        if not len(plan.new) and not len(plan.changed):
            return Written(0, 0)
        stamp = {"version": await _next_version(db), "ingested_at": datetime.now(UTC)}
        new = 0
        for rows in _batched(_rows(frame, plan.new), batch_size):
            docs = [{**key, **row, **stamp} for row in rows]
            new += await _insert(coll, docs, key, stamp, doing)
        changed = zip(plan.ids, _rows(frame, plan.changed), strict=True)
        for pairs in _batched(changed, batch_size):
            ops = [UpdateOne({"_id": _id}, {"$set": {**row, **stamp}}) for _id, row in pairs]
            await coll.bulk_write(ops, ordered=False)
    return Written(new=new, replaced=len(plan.changed))


async def convert_collection(
    db: AsyncDatabase[Document], name: str = CANDLES, *, batch: int = _CONVERT_BATCH
) -> list[tuple[str, str, Written]]:
    """Write the bars of the per-bar collection ``name`` in the columnar layout (merged with
    what is there, as :func:`~shared.mongo.chunks.write_chunks` merges); each series written
    and what that changed. ``name`` is read once, in (symbol, interval, open_time) order, and
    left as it is; at most ``batch`` bars are held in memory at a time.

    :raises shared.mongo.MongoDataError: a malformed bar document (named).
    :raises shared.mongo.MongoError: the database failed or refused the write.
    """
    label = f"{db.name}.{name}"
    projection = {**_PROJECTION, "symbol": 1, "interval": 1}
    order = [("symbol", 1), ("interval", 1), ("open_time", 1)]
    written: dict[tuple[str, str], Written] = {}
    docs: list[Document] = []

    async def flush() -> None:
        symbol, interval = docs[0].get("symbol"), docs[0].get("interval")
        if not isinstance(symbol, str) or not isinstance(interval, str):
            raise MongoDataError(f"{_describe(docs[0], label)} has no symbol or interval")
        try:
            done = await write_chunks(db, symbol, interval, _frame(docs, label))
        except ValueError as exc:
            raise MongoDataError(f"{_describe(docs[0], label)}: {exc}") from None
        before = written.get((symbol, interval), Written(0, 0))
        written[symbol, interval] = Written(before.new + done.new, before.replaced + done.replaced)
        docs.clear()

    with mapped(f"converting {label} to columnar candles", needs=f"readWrite on {db.name}"):
        async for doc in db[name].find({}, projection, sort=order, batch_size=_CURSOR_BATCH):
            series = (doc.get("symbol"), doc.get("interval"))
            if docs and (
                len(docs) >= batch or series != (docs[0].get("symbol"), docs[0].get("interval"))
            ):
                await flush()
            docs.append(doc)
        if docs:
            await flush()
    return [(symbol, interval, done) for (symbol, interval), done in written.items()]


class _WritePlan(NamedTuple):
    #: Rows of the frame with no stored bar.
    new: npt.NDArray[np.intp]
    #: Rows of the frame whose stored bar differs, and that bar's ``_id`` (same order).
    changed: npt.NDArray[np.intp]
    ids: list[Any]


def _plan_write(frame: pd.DataFrame, stored: list[Document], label: str) -> _WritePlan:
    times = frame["open_time"].to_numpy()
    old = _frame(stored, label)
    old_times = old["open_time"].to_numpy()
    at = np.minimum(np.searchsorted(times, old_times), len(times) - 1)
    matched = np.flatnonzero(times[at] == old_times)  # stored bars the frame has too
    rows = at[matched]
    differs = np.zeros(len(matched), dtype=bool)
    for name, dtype in CANDLE_COLUMNS.items():
        ours, theirs = frame[name].to_numpy()[rows], old[name].to_numpy()[matched]
        if dtype.kind == "f":  # bit for bit: -0.0 differs from 0.0, as it does in a frame
            ours, theirs = ours.view(np.int64), theirs.view(np.int64)
        differs |= ours != theirs
    stored_rows = np.zeros(len(times), dtype=bool)
    stored_rows[rows] = True
    return _WritePlan(
        new=np.flatnonzero(~stored_rows),
        changed=rows[differs],
        ids=[stored[int(i)]["_id"] for i in matched[differs]],
    )


def _rows(frame: pd.DataFrame, index: npt.NDArray[np.intp]) -> Iterator[Document]:
    """The rows at ``index`` as dicts of Python numbers (BSON cannot encode numpy scalars)."""
    columns = [frame[name].to_numpy()[index].tolist() for name in _FIELDS]
    return (dict(zip(_FIELDS, values, strict=True)) for values in zip(*columns, strict=True))


async def _insert(
    coll: AsyncCollection[Document],
    docs: list[Document],
    key: Document,
    stamp: Document,
    doing: str,
) -> int:
    """Insert ``docs``; upsert by key the ones another writer inserted meanwhile. New bars."""
    try:
        result = await coll.bulk_write([InsertOne(doc) for doc in docs], ordered=False)
        return result.inserted_count
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        others = [error for error in errors if error.get("code") != _DUPLICATE_KEY]
        if others:
            raise MongoError(
                f"{doing}: {len(others)} of {len(docs)} bars were not inserted, the first "
                f"because {others[0].get('errmsg')}"
            ) from exc
        retry = [docs[error["index"]] for error in errors]
        upserts = [
            UpdateOne(
                {**key, "open_time": doc["open_time"]},
                {"$set": {name: doc[name] for name in (*_FIELDS, *stamp)}},
                upsert=True,
            )
            for doc in retry
        ]
        upserted = await coll.bulk_write(upserts, ordered=False)
        return int(exc.details.get("nInserted", 0)) + upserted.upserted_count


async def _next_version(db: AsyncDatabase[Document]) -> int:
    """The next candle version: an atomic increment, so versions only ever grow."""
    for _ in range(2):  # two first-ever upserts may race on the counter's _id
        try:
            doc = await db[COUNTERS].find_one_and_update(
                {"_id": CANDLES},
                {"$inc": {"version": 1}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            continue
        if doc is not None:
            return int(doc["version"])
    raise MongoError(f"could not take a version number from {db.name}.{COUNTERS}")


def _frame(docs: Sequence[Mapping[str, Any]], label: str) -> pd.DataFrame:
    """A canonical candle frame of candle documents, column by column."""
    columns: dict[str, npt.NDArray[Any]] = {}
    for name, dtype in CANDLE_COLUMNS.items():
        try:
            values = list(map(itemgetter(name), docs))
        except KeyError:
            bad = next(doc for doc in docs if name not in doc)
            raise MongoDataError(
                f"{_describe(bad, label)} has no field {name!r}; every candle document needs "
                f"{', '.join(_FIELDS)}"
            ) from None
        allowed = _INTEGERS if dtype.kind == "i" else _NUMBERS
        if not set(map(type, values)) <= allowed:
            bad = next(doc for doc in docs if type(doc[name]) not in allowed)
            expected = "an integer" if dtype.kind == "i" else "a number (double)"
            raise MongoDataError(
                f"{_describe(bad, label)} has {name} = {bad[name]!r} "
                f"({type(bad[name]).__name__}); expected {expected}"
            )
        try:
            columns[name] = np.array(values, dtype=dtype)
        except OverflowError as exc:
            raise MongoDataError(f"a candle document in {label} has {name} beyond int64") from exc
    return pd.DataFrame(columns)


def _describe(doc: Mapping[str, Any], label: str) -> str:
    where = " ".join(str(doc[k]) for k in ("symbol", "interval") if k in doc)
    when = doc.get("open_time")
    at = f" open_time {when}" if isinstance(when, int) else ""
    return f"the candle document{' of ' + where if where else ''}{at} in {label}"


def _series(symbol: str, interval: str) -> str:
    """``symbol`` normalized; :class:`NoDataError` for a bad symbol or an unknown interval."""
    try:
        interval_ms(interval)
        return normalize_symbol(symbol)
    except ValueError as exc:
        raise NoDataError(str(exc), symbol=symbol) from None


def _check_lookback(lookback: int) -> None:
    if lookback < 0:
        raise ValueError(f"lookback must be a number of rows >= 0, got {lookback}")


def _range_message(
    symbol: str,
    interval: str,
    start_ms: int,
    end_ms: int,
    *,
    where: str,
    count: int,
    first: int,
    last: int,
    ingest: str,
) -> str:
    return (
        f"no {symbol} {interval} candles from {utc_text(start_ms)} to {utc_text(end_ms)} "
        f"(end exclusive); the candle database ({where}) has {count} bars from "
        f"{utc_text(first)} to {utc_text(last)} (open times). Choose a range inside that, or "
        f"load the missing candles with `{ingest}`."
    )


def _ingest_command(database: str, symbol: str = "SYMBOL", interval: str = "INTERVAL") -> str:
    return (
        f"stratorch ingest binance FILE... --symbol {symbol} --interval {interval} "
        f"--mongo MONGO_URL --mongo-db {database}"
    )


async def _nothing() -> list[Document]:
    return []


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := [item for _, item in zip(range(size), iterator, strict=False)]:
        yield batch
