"""Collection names and the indexes stratorch needs; no other module spells either.

Collections (database ``STRATORCH_MONGO_DB``):

``candles``
    one document per bar (see :mod:`shared.mongo.candles`); unique (symbol, interval, open_time).
``counters``
    ``{_id: "candles", version: n}``: the last version number handed to a candle write.
``sources``
    uploaded strategy code, ``_id`` = its sha256.
``uploads``
    ``_id`` = ``<sha256>/<tenant>``: the tenant uploaded that code, so it may use it by hash.
``owners``
    one per admitted backtest id: its ``tenant`` and ``units`` (what it counts in the quota).
``active``
    one per backtest counted against its tenant's quota (deleted when it ends): ``tenant``,
    ``units``, ``since``; indexed by tenant.
``plans``, ``results``, ``cache``
    one document per backtest id (cache: per cache key) whose body is stored compressed.
``batches``
    one per (backtest id, unit id), body compressed; unique (backtest_id, unit_id).
``claims``
    one per backtest: who runs its replay.
``wal``
    one per write-ahead-log record; unique (backtest_id, seq).
``<collection>.chunks``
    the compressed bodies of ``plans``, ``batches``, ``results`` and ``cache``, in pieces
    (see :mod:`shared.mongo.store`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from shared.mongo._client import MongoConfigError, MongoDataError, mapped

__all__ = [
    "ACTIVE",
    "BATCHES",
    "CACHE",
    "CANDLES",
    "CLAIMS",
    "COUNTERS",
    "INDEXES",
    "OWNERS",
    "PLANS",
    "RESULTS",
    "SOURCES",
    "UPLOADS",
    "WAL",
    "chunks_of",
    "ensure_indexes",
]

CANDLES = "candles"
COUNTERS = "counters"
SOURCES = "sources"
UPLOADS = "uploads"
OWNERS = "owners"
ACTIVE = "active"
PLANS = "plans"
BATCHES = "batches"
CLAIMS = "claims"
WAL = "wal"
RESULTS = "results"
CACHE = "cache"

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
    }
)

_INDEX_CONFLICT_CODES = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict
_DUPLICATE_KEY = 11000


def chunks_of(collection: str) -> str:
    """The collection holding the body chunks of ``collection``'s documents (GridFS's naming)."""
    return f"{collection}.chunks"


async def ensure_indexes(db: AsyncDatabase[dict[str, Any]]) -> None:
    """Create the indexes of :data:`INDEXES` in ``db``; a no-op for those already there.

    Call it at service start with the primary's client (the candles client is read-only),
    and before ingesting: the unique candle index is what makes re-ingesting idempotent.

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
