"""MongoDB: the real stack's candle source and state store (DESIGN.md "Ports", "Data").

- :class:`MongoCandleSource`: :class:`shared.ports.CandleSource` over the ``candles``
  collection, with its own client (read-only user, ``readPreference=secondaryPreferred``);
- :func:`write_chunks`: what ``stratorch ingest binance --mongo`` writes with (the columnar
  layout); :func:`convert_collection` converts the per-bar layout (:func:`write_candles`) to it;
- :class:`ChunkCache`: a worker's cache of decoded chunks, by content hash;
- :class:`MongoStore`: :class:`shared.store.Store` on the primary;
- :func:`ensure_indexes`: the indexes both need, created idempotently at service start, and
  the retention (TTL indexes on the state store's collections; :func:`expire` deletes what
  they would have, on a server that has none);
- :func:`connect`: a client that has answered a ping, after logged retries.

Driver: PyMongo's :class:`~pymongo.AsyncMongoClient`. PyMongo's errors reach callers as
:class:`MongoError` and its subclasses, which say what was attempted and what to check.

Only standard MongoDB semantics are used: no transactions, change streams, ``$lookup`` or
``$group`` beyond counting, so the same code runs on a MongoDB replica set and on FerretDB
(the wire-protocol server the integration tests use).
"""

from shared.mongo._client import (
    DEFAULT_CONNECT_RETRIES,
    DEFAULT_RETRY_DELAY_S,
    DEFAULT_TIMEOUT_MS,
    MongoAccessDenied,
    MongoConfigError,
    MongoDataError,
    MongoError,
    MongoUnavailable,
    connect,
    new_client,
    redact,
)
from shared.mongo._schema import (
    CHUNK_GRACE,
    EXPIRING,
    INDEXES,
    SWEEP_EVERY_S,
    ensure_indexes,
    expire,
)
from shared.mongo.candles import (
    DEFAULT_READ_PREFERENCE,
    MongoCandleSource,
    convert_collection,
    write_candles,
)
from shared.mongo.chunk_cache import ChunkCache
from shared.mongo.chunks import write_chunks
from shared.mongo.store import CHUNK_BYTES, MongoStore

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_GRACE",
    "DEFAULT_CONNECT_RETRIES",
    "DEFAULT_READ_PREFERENCE",
    "DEFAULT_RETRY_DELAY_S",
    "DEFAULT_TIMEOUT_MS",
    "EXPIRING",
    "INDEXES",
    "SWEEP_EVERY_S",
    "ChunkCache",
    "MongoAccessDenied",
    "MongoCandleSource",
    "MongoConfigError",
    "MongoDataError",
    "MongoError",
    "MongoStore",
    "MongoUnavailable",
    "connect",
    "convert_collection",
    "ensure_indexes",
    "expire",
    "new_client",
    "redact",
    "write_candles",
    "write_chunks",
]
