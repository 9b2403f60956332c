"""Collection names and the indexes stratorch needs; no other module spells either.

Collections (database ``STRATORCH_MONGO_DB``):

``candles``
    one document per bar (see :mod:`shared.mongo.candles`); unique (symbol, interval, open_time).
``candle_series``, ``candle_chunks.<SYMBOL>.<interval>[.<year>]``
    the columnar candle layout: one manifest per series, ``_id`` = ``<SYMBOL>/<interval>``,
    naming its chunks, one per period, ``_id`` = ``<SYMBOL>/<interval>/<period>/<hash>``, in
    a collection per series and year (see :mod:`shared.mongo.chunks`); read by ``_id`` only.
``counters``
    ``{_id: "candles", version: n}``: the last version number handed to a candle write.
``sources``
    uploaded strategy code, ``_id`` = its sha256.
``uploads``
    ``_id`` = ``<sha256>/<tenant>``: the tenant uploaded that code, so it may use it by hash.
``accepted``
    ``{_id: backtest id, fingerprint, tenant}``: which request, of which tenant, owns the id;
    written before it is published or planned.
``active``
    one per backtest counted against its tenant's quota (deleted when it ends): ``tenant``,
    ``units``, ``since``; indexed by tenant.
``plans``, ``results``, ``cache``
    one document per backtest id (cache: per cache key) whose body is stored compressed; a
    plan's document also lists its ``unit_ids``, so its batches are found by ``_id``.
``batches``
    one per (backtest id, unit id), body compressed: ``_id`` = ``<backtest id>/<unit id>``;
    unique (backtest_id, unit_id). Batches stored before ``_id`` was derived have an
    ``ObjectId`` (their plans list no ``unit_ids``, so they are found by ``backtest_id``).
    Deleted when the backtest completes, as are its plan, ``claims`` and ``wal`` (nothing
    reads them after; its ``results`` document keeps its ``unit_count``); a backtest that
    ended otherwise keeps them until the retention.
``described``
    what a sandbox's ``describe`` said of a strategy (lookback, work units), ``_id`` =
    :func:`shared.cache.describe_key`.
``claims``
    the lease on a backtest's replay, one per generation: ``_id`` = ``<backtest id>/<n>``.
``wal``
    the write-ahead log, in blocks of records: ``_id`` = ``<backtest id>/<first seq>``, the
    records as JSON, ``next`` (the seq after the block's last); unique (backtest_id, seq),
    ``seq`` being the first. (Before blocks: one document per record, under an ``ObjectId``.)

Every read on a backtest's way (planning, each batch, the replay, the cache) is by ``_id``,
never a query over a field: FerretDB v1 (the tests' server) hands only a lookup by ``_id`` to
SQLite, which still reads every row of the collection (its ``_id`` index is not used, ~1 GB/s);
anything else it decodes document by document (~50 MB/s). Inserts are checked on the unique
index, cheap however many documents are stored. Hence the completed backtests' batches, WAL
and leases are deleted, and records are written by insert first (see :mod:`.store`).
``<collection>.chunks``
    the compressed bodies of ``plans``, ``batches``, ``results`` and ``cache``, in pieces
    (see :mod:`shared.mongo.store`).

**Retention.** Every document of :data:`EXPIRING` (and of their ``.chunks``) carries
``stored_at``, the UTC time it was written; with ``retention_days`` :func:`ensure_indexes`
puts a TTL index on it, so MongoDB deletes it that long after (its TTL monitor runs once a
minute). A body's chunks get the same ``stored_at`` as the record naming them and expire
:data:`CHUNK_GRACE` later, so a record is never found without its body. Candles, counters and
uploaded sources (named by later requests' ``source_sha256``) never expire. On a server
without TTL indexes (FerretDB v1 answers "not implemented") the services delete what a TTL
monitor would have, themselves: :func:`expire`, every :data:`SWEEP_EVERY_S`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import structlog
from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from shared.mongo._client import MongoConfigError, MongoDataError, mapped

__all__ = [
    "ACCEPTED",
    "ACTIVE",
    "BATCHES",
    "CACHE",
    "CANDLES",
    "CANDLE_CHUNKS",
    "CANDLE_SERIES",
    "CHUNK_GRACE",
    "CLAIMS",
    "COUNTERS",
    "DESCRIBED",
    "EXPIRING",
    "INDEXES",
    "PLANS",
    "REQUESTS",
    "RESULTS",
    "SOURCES",
    "STORED_AT",
    "SWEEPS",
    "SWEEP_DONE",
    "UPLOADS",
    "WAL",
    "chunks_of",
    "ensure_indexes",
]

CANDLES = "candles"
CANDLE_SERIES = "candle_series"
CANDLE_CHUNKS = "candle_chunks"
COUNTERS = "counters"
SOURCES = "sources"
UPLOADS = "uploads"
ACCEPTED = "accepted"
ACTIVE = "active"
PLANS = "plans"
#: A completed backtest's request, kept from its plan when the plan goes (its report shows it).
REQUESTS = "requests"
BATCHES = "batches"
CLAIMS = "claims"
WAL = "wal"
RESULTS = "results"
CACHE = "cache"
DESCRIBED = "described"
#: A sweep's plan, by the sweep's id; a document per ended child (``sweep``: its sweep's id).
SWEEPS = "sweeps"
SWEEP_DONE = "sweep_done"

#: The indexes :func:`ensure_indexes` creates, by collection. Names are MongoDB's defaults, so
#: a ``candles`` collection that already has the unique index (as users' often do) is left as
#: it is instead of getting a second copy under another name.
INDEXES: Mapping[str, tuple[IndexModel, ...]] = MappingProxyType(
    {
        CANDLES: (
            IndexModel(
                [("symbol", ASCENDING), ("interval", ASCENDING), ("open_time", ASCENDING)],
                unique=True,
            ),
        ),
        BATCHES: (IndexModel([("backtest_id", ASCENDING), ("unit_id", ASCENDING)], unique=True),),
        WAL: (IndexModel([("backtest_id", ASCENDING), ("seq", ASCENDING)], unique=True),),
        ACTIVE: (IndexModel([("tenant", ASCENDING)]),),
        SWEEP_DONE: (IndexModel([("sweep", ASCENDING)]),),
    }
)

#: The field of every expiring document: when it was stored (a UTC datetime).
STORED_AT = "stored_at"
#: The collections whose documents expire after the retention, each with its ``.chunks``
#: where it has bodies.
EXPIRING = (
    PLANS,
    REQUESTS,
    BATCHES,
    CLAIMS,
    WAL,
    RESULTS,
    CACHE,
    DESCRIBED,
    SWEEPS,
    SWEEP_DONE,
)
_WITH_BODIES = (PLANS, REQUESTS, BATCHES, RESULTS, CACHE)
#: How much longer a body's chunks live than the record naming them: a reader that found the
#: record a moment before the TTL monitor deleted it still finds its chunks.
CHUNK_GRACE = timedelta(days=1)
#: Seconds between two runs of :func:`expire` where the server has no TTL indexes: as a TTL
#: monitor, it need not be prompt, and each run scans every expiring collection.
SWEEP_EVERY_S = 3600.0

_INDEX_CONFLICT_CODES = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict
_DUPLICATE_KEY = 11000
_NOT_IMPLEMENTED = 238  # FerretDB v1 on expireAfterSeconds
_INDEX_NOT_FOUND = 27
_TTL_KEY = [(STORED_AT, ASCENDING)]

log = structlog.get_logger(__name__)


def chunks_of(collection: str) -> str:
    """The collection holding the body chunks of ``collection``'s documents (GridFS's naming)."""
    return f"{collection}.chunks"


async def ensure_indexes(
    db: AsyncDatabase[dict[str, Any]], *, retention_days: float | None = None
) -> bool:
    """Create the indexes of :data:`INDEXES` in ``db``; a no-op for those already there.
    Whether the server expires documents itself: ``False`` when it has no TTL indexes (then
    :func:`expire` must run now and then).

    Call it at service start with the primary's client (the candles client is read-only),
    and before ingesting: the unique candle index is what makes re-ingesting idempotent.

    :param retention_days: how long the documents of :data:`EXPIRING` are kept (TTL indexes
        on ``stored_at``; a changed value replaces the index); ``0``: forever (the TTL
        indexes are dropped); ``None`` (ingest, tools): leave retention as it is.

    :raises MongoConfigError: an index with the same keys but other options (say, a
        non-unique one on ``candles``) is in the way.
    :raises MongoDataError: ``candles`` holds two documents for one bar, so the unique index
        cannot be built.
    """
    for collection, models in INDEXES.items():
        doing = f"creating the indexes of {db.name}.{collection}"
        with mapped(doing, needs="the createIndex privilege (role readWrite)"):
            for model in models:
                await _ensure(db, collection, model, doing)
    if retention_days is None:
        return True
    with mapped(f"setting the retention in {db.name}", needs="the readWrite role"):
        return await _ensure_retention(db, retention_days)


def _expiry(days: float) -> list[tuple[str, timedelta]]:
    """Each expiring collection and how long its documents are kept."""
    keep = timedelta(days=days)
    expiry = []
    for collection in EXPIRING:
        expiry.append((collection, keep))
        if collection in _WITH_BODIES:
            expiry.append((chunks_of(collection), keep + CHUNK_GRACE))
    return expiry


async def _ensure_retention(db: AsyncDatabase[dict[str, Any]], days: float) -> bool:
    for name, after in _expiry(days):
        if not await _ensure_ttl(db, name, int(after.total_seconds()) if days else None):
            log.warning(
                "this MongoDB server has no TTL indexes: the services delete expired"
                f" documents themselves, every {SWEEP_EVERY_S:g} s",
                database=db.name,
            )
            return False
    return True


async def expire(
    db: AsyncDatabase[dict[str, Any]], retention_days: float, *, now: datetime | None = None
) -> int:
    """Delete what TTL indexes would have by ``now``: every document of :data:`EXPIRING`
    stored over ``retention_days`` ago (their chunks :data:`CHUNK_GRACE` later). For servers
    without TTL indexes; several services running it at once is harmless. The number of
    documents deleted; ``retention_days`` 0 keeps everything."""
    if not retention_days:
        return 0
    now = now or datetime.now(UTC)
    deleted = 0
    with mapped(f"deleting expired documents in {db.name}", needs="the readWrite role"):
        for name, after in _expiry(retention_days):
            done = await db[name].delete_many({STORED_AT: {"$lt": now - after}})
            deleted += done.deleted_count
    return deleted


async def _ensure_ttl(
    db: AsyncDatabase[dict[str, Any]], collection: str, seconds: int | None
) -> bool:
    """Give ``collection`` a TTL index on ``stored_at`` expiring after ``seconds`` (``None``:
    no TTL index). False if the server does not support TTL indexes."""
    coll = db[collection]
    found = {
        name: info
        for name, info in (await coll.index_information()).items()
        if [(k, int(d)) for k, d in info["key"]] == _TTL_KEY
    }
    if any(info.get("expireAfterSeconds") == seconds for info in found.values()) or (
        seconds is None and not found
    ):
        return True
    for name in found:  # another expiry (or none): replace it
        try:
            await coll.drop_index(name)
        except OperationFailure as exc:
            if exc.code != _INDEX_NOT_FOUND:  # another service dropped it first
                raise
    if seconds is None:
        return True
    try:
        await coll.create_indexes([IndexModel(_TTL_KEY, expireAfterSeconds=seconds)])
    except OperationFailure as exc:
        if exc.code == _NOT_IMPLEMENTED:
            return False
        raise
    return True


async def _ensure(
    db: AsyncDatabase[dict[str, Any]], collection: str, model: IndexModel, doing: str
) -> None:
    spec = model.document
    keys = ", ".join(spec["key"])
    try:
        await db[collection].create_indexes([model])
    except OperationFailure as exc:
        reason = exc.details.get("errmsg") if exc.details else str(exc)
        if exc.code == _DUPLICATE_KEY:
            raise MongoDataError(
                f"{doing}: two documents have the same ({keys}), so the unique index cannot "
                f"be built ({reason}); remove the duplicates and start again"
            ) from exc
        if exc.code in _INDEX_CONFLICT_CODES:
            raise MongoConfigError(
                f"{doing}: an index on ({keys}) with other options is in the way ({reason}); "
                f"stratorch needs it unique: drop that index and start again"
            ) from exc
        raise
    # Check what is there, not only that creating it did not fail: a server may keep an older
    # index on the same keys and answer ok (FerretDB does; MongoDB says IndexKeySpecsConflict).
    wanted = list(spec["key"].items())
    indexes = (await db[collection].index_information()).values()
    found = [i for i in indexes if [(k, int(d)) for k, d in i["key"]] == wanted]
    if spec.get("unique") and not any(i.get("unique") for i in found):
        raise MongoConfigError(
            f"{doing}: the index on ({keys}) is not unique; stratorch needs it unique (a "
            f"writer could otherwise store a bar twice): drop that index and start again"
        )
