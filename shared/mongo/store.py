"""The state store on MongoDB's primary: :class:`MongoStore` is :class:`shared.store.Store`.

=============  ============  ==========================  =====================================
record         collection    key                         a second write of the same key
=============  ============  ==========================  =====================================
source         ``sources``   sha256 (``_id``)            changes nothing (same code by hash)
accepted id    ``accepted``  backtest id (``_id``)       fails: an id has one owner
upload         ``uploads``   sha256/tenant (``_id``)     changes nothing
counted        ``active``    backtest id (``_id``)       fails: counted once (see ``admit``)
plan           ``plans``     backtest id (``_id``)       replaces it
batch          ``batches``   backtest id/unit id         changes nothing: redelivered batch
lease          ``claims``    backtest id/generation      fails: one owner per generation
WAL block      ``wal``       backtest id/first seq       changes nothing: the log is append-only
result         ``results``   backtest id (``_id``)       fails: a backtest ends once
cached result  ``cache``     cache key (``_id``)         replaces it
description    ``described`` describe key (``_id``)      changes nothing (same code, same answer)
=============  ============  ==========================  =====================================

Every key is the document's ``_id`` (see :mod:`shared.mongo._schema` for why), and each record
is read by it: a backtest's batches from its plan's unit ids, its WAL blocks from seq 0 on.
Batches stored before their ``_id`` was derived are still read (by ``backtest_id``).

**What a backtest leaves.** A lookup by ``_id`` on FerretDB scans the whole collection, so what
each ended backtest leaves in a collection that running backtests read is what the next one
pays. Plans, batches, WAL blocks and leases are read only while a backtest runs: once it
completed, :meth:`MongoStore.finish` deletes them, and its result records its unit count (its
progress). A cancelled or failed backtest keeps them until the retention, so its late batches
still count for its progress. Plans, cached results and outcomes are written by an insert (a
unique-index check, cheap however many are stored); a plan or cached result is replaced only
when its key is taken.

"Changes nothing" rests on a unique key (``_id`` or a unique index), so it holds across
processes: two portfolio_sim replicas storing the same batch, or claiming the same backtest,
race on an insert that exactly one of them wins.

**Leases** (:meth:`MongoStore.claim`). A backtest's replay lease is a chain of documents,
``_id`` = ``<backtest id>/<generation>``, each ``{owner, expires}``; the last one stands. The
first claim inserts generation 0; the holder renews by moving its own document's ``expires``
(nobody else writes it); a taker, once that has passed, inserts the next generation, and a
holder that finds a next generation has lost the lease. Every change of owner is an insert on
``_id``, because a conditional update is not atomic on every server (FerretDB's
``findAndModify`` and ``update`` let several callers match the same lapsed lease).

**Bodies.** A :class:`~shared.messages.ProposalBatch` of 100k+ bars, or a
:class:`~shared.messages.BacktestResult` with 100k trades, is tens of MB of JSON: over BSON's
16 MB document limit. So plans, batches, results and cached results keep their JSON body
zlib-compressed (level 1: a third of the size at a few hundred MB/s) in the collection's
``.chunks`` collection, cut into pieces of :data:`CHUNK_BYTES`, each with a fresh ``ObjectId``.
The record's own document stays small: a few queryable fields (``status``, ``backtest_id``,
...) and ``body: {codec, size, sha256, chunks: [ids]}``. GridFS does the same, but in 255 kB
chunks and with no way to swap a file atomically.

**Consistency without transactions** (FerretDB has none; none are needed on MongoDB either):
chunks are written first, then the document that names them, so whoever finds a document finds
its chunks. Replacing a record swaps its document with ``findOneAndReplace`` and then deletes
the chunks of the document it replaced, which nothing names any more; a reader that fetched
that document a moment earlier finds a chunk gone and reads the record again. Chunks are never
shared, so one writer can never delete another's. A writer that dies between the two steps
leaves chunks nothing names (their ``owner`` field says whose), never a broken record; the
retention's TTL index removes them (see :mod:`shared.mongo._schema`).

All JSON and compression work runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import zlib
from collections.abc import Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from bson import ObjectId
from pydantic import BaseModel
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from shared.messages import (
    BacktestRequest,
    BacktestResult,
    Plan,
    ProposalBatch,
    Status,
    WalRecord,
)
from shared.mongo._client import MongoDataError, mapped
from shared.mongo._schema import (
    ACCEPTED,
    ACTIVE,
    BATCHES,
    CACHE,
    CLAIMS,
    DESCRIBED,
    PLANS,
    REQUESTS,
    RESULTS,
    SOURCES,
    SWEEP_DONE,
    SWEEPS,
    UPLOADS,
    WAL,
    chunks_of,
)
from shared.sandbox.port import StrategyInfo
from shared.store import DEFAULT_LEASE_S, Lease, Owner, described
from shared.sweep.expand import SweepPlan
from shared.tenancy import ANONYMOUS, STALE_AFTER_S, Admission, Quota

__all__ = ["CHUNK_BYTES", "MongoStore"]

Document = dict[str, Any]

#: Compressed bytes per chunk document: a quarter of BSON's 16 MB limit, so a 50 MB batch
#: (~13 MB compressed) is four documents, fetched concurrently.
CHUNK_BYTES = 4 * 1024 * 1024
_CODEC = "json+zlib"
_ZLIB_LEVEL = 1
#: WAL records per document (a few hundred kB of JSON).
_WAL_BATCH = 5_000
#: Reads of a record whose chunks vanished under it (replaced meanwhile) before giving up.
_READ_TRIES = 3
_NEEDS = "the readWrite role"


class MongoStore:
    """:class:`shared.store.Store` in a MongoDB database; see the module docstring.

    It uses ``db``'s client and does not close it (the service that connected does).
    Call :func:`shared.mongo.ensure_indexes` on ``db`` before using it.

    :param db: the database (``STRATORCH_MONGO_DB``) on a client for the primary.
    :param lease_s: how long a :meth:`claim` lasts unless renewed
        (``STRATORCH_CLAIM_LEASE_S``).
    """

    def __init__(self, db: AsyncDatabase[Document], *, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.db = db
        self.lease_s = lease_s

    def __repr__(self) -> str:
        return f"MongoStore(database={self.db.name!r})"

    # -- sources, plans ----------------------------------------------------------------------

    async def put_source(self, sha256: str, code: str, *, tenant: str) -> None:
        # Content-addressed: a source stored already is the same code. Who may use it is a
        # document of its own per tenant (an insert: atomic where an update may not be).
        with self._mapped(f"storing strategy source {sha256[:12]}"):
            with suppress(DuplicateKeyError):
                await self.db[SOURCES].insert_one(
                    {"_id": sha256, "code": code, "stored_at": _now()}
                )
            with suppress(DuplicateKeyError):
                await self.db[UPLOADS].insert_one(
                    {"_id": f"{sha256}/{tenant}", "stored_at": _now()}
                )

    async def has_source(self, sha256: str, *, tenant: str) -> bool:
        with self._mapped(f"looking up strategy source {sha256[:12]}"):
            found = await self.db[UPLOADS].find_one({"_id": f"{sha256}/{tenant}"})
        return found is not None

    async def get_source(self, sha256: str) -> str | None:
        with self._mapped(f"reading strategy source {sha256[:12]}"):
            doc = await self.db[SOURCES].find_one({"_id": sha256})
        return None if doc is None else str(doc["code"])

    async def accept(self, backtest_id: str, fingerprint: str, *, tenant: str) -> Owner | None:
        """Insert on ``_id``: exactly one request owns an id, across processes."""
        coll = self.db[ACCEPTED]
        with self._mapped(f"accepting backtest {backtest_id}"):
            try:
                await coll.insert_one(
                    {
                        "_id": backtest_id,
                        "fingerprint": fingerprint,
                        "tenant": tenant,
                        "accepted_at": _now(),
                    }
                )
            except DuplicateKeyError:
                pass
            else:
                return None
        owner = await self.get_accepted(backtest_id)
        if owner is None:  # withdrawn in between: the id is free again
            return await self.accept(backtest_id, fingerprint, tenant=tenant)
        return owner

    async def get_accepted(self, backtest_id: str) -> Owner | None:
        with self._mapped(f"reading whether backtest {backtest_id} was accepted"):
            doc = await self.db[ACCEPTED].find_one({"_id": backtest_id})
        if doc is None:
            return None
        # Accepted before tenants were recorded: it is ``anonymous``'s.
        return Owner(str(doc["fingerprint"]), str(doc.get("tenant", ANONYMOUS)))

    async def withdraw(self, backtest_id: str) -> None:
        with self._mapped(f"withdrawing backtest {backtest_id}"):
            await self.db[ACCEPTED].delete_one({"_id": backtest_id})

    async def put_plan(self, plan: Plan) -> None:
        body = await _compress(plan)
        await self._replace(PLANS, plan.request.id, {"unit_ids": sorted(plan.units)}, body)

    async def get_plan(self, backtest_id: str) -> Plan | None:
        found = await self._read(PLANS, backtest_id)
        if found is None:
            return None
        return await asyncio.to_thread(lambda: Plan.model_validate_json(_decompress(*found)))

    async def get_request(self, backtest_id: str) -> BacktestRequest | None:
        """From the plan while there is one, then from :data:`REQUESTS` (looked up by reports
        only, never on a backtest's way)."""
        plan = await self.get_plan(backtest_id)
        if plan is not None:
            return plan.request
        found = await self._read(REQUESTS, backtest_id)
        if found is None:
            return None
        return await asyncio.to_thread(
            lambda: BacktestRequest.model_validate_json(_decompress(*found))
        )

    # -- batches, claims ---------------------------------------------------------------------

    async def add_batch(self, batch: ProposalBatch) -> int:
        """Store the unit's batch unless one is stored; the number of distinct units stored.
        A batch of a completed backtest (its plan and batches went with its outcome) is not
        stored again: it counts as one of all its units."""
        _id = _batch_id(batch.backtest_id, batch.unit_id)
        doing = f"storing the batch of unit {batch.unit_id} of backtest {batch.backtest_id}"
        with self._mapped(doing):
            plan = await self._plan_meta(batch.backtest_id)
            if plan is None and (done := await self._completed_units(batch.backtest_id)):
                return done
            stored = await self.db[BATCHES].find_one({"_id": _id}, {"_id": 1})
        if stored is None:
            body = await _compress(batch)
            meta = {
                "_id": _id,
                "backtest_id": batch.backtest_id,
                "unit_id": batch.unit_id,
                "unit_count": batch.unit_count,
                "symbols": list(batch.symbols),
                "error": batch.error.kind if batch.error else None,
            }
            # A duplicate (on ``_id``, or on the unique (backtest_id, unit_id) index for a
            # batch stored in the old layout) is a batch stored already: it stays.
            await self._insert_first(BATCHES, meta, body, doing)
        with self._mapped(f"counting the stored units of backtest {batch.backtest_id}"):
            return len(await self._batch_docs(batch.backtest_id, {"_id": 1}, plan))

    async def batches(self, backtest_id: str) -> list[ProposalBatch]:
        """Every stored batch of the backtest, by unit id."""
        with self._mapped(f"reading the batches of backtest {backtest_id}"):
            docs = await self._batch_docs(backtest_id, {}, await self._plan_meta(backtest_id))
            parts = await asyncio.gather(*(self._chunks(BATCHES, doc) for doc in docs))
        for doc, chunks in zip(docs, parts, strict=True):
            if chunks is None:  # batches are never replaced, so this is damage, not a race
                raise MongoDataError(
                    f"{self.db.name}.{BATCHES}: the body of unit {doc.get('unit_id')} of "
                    f"backtest {backtest_id} has missing chunks"
                )

        def decode() -> list[ProposalBatch]:
            return [
                ProposalBatch.model_validate_json(_decompress(doc["body"], chunks or []))
                for doc, chunks in zip(docs, parts, strict=True)
            ]

        return await asyncio.to_thread(decode)

    async def units_done(self, backtest_id: str) -> int:
        """The units with a stored batch; for a completed backtest, whose plan and batches
        went with its outcome, every unit (its result records how many)."""
        with self._mapped(f"counting the stored units of backtest {backtest_id}"):
            plan = await self._plan_meta(backtest_id)
            if plan is None and (done := await self._completed_units(backtest_id)):
                return done
            return len(await self._batch_docs(backtest_id, {"_id": 1}, plan))

    async def _completed_units(self, backtest_id: str) -> int | None:
        """The unit count its result records, for a backtest that completed."""
        ended = await self.db[RESULTS].find_one({"_id": backtest_id}, {"unit_count": 1})
        return None if ended is None or "unit_count" not in ended else int(ended["unit_count"])

    async def _plan_meta(self, backtest_id: str) -> Document | None:
        """The plan's own document (its unit ids, its body's description), if any."""
        return await self.db[PLANS].find_one({"_id": backtest_id})

    async def _batch_docs(
        self, backtest_id: str, projection: Document, plan: Document | None
    ) -> list[Document]:
        """The documents of the backtest's stored batches, by unit id: one ``_id`` lookup per
        unit of its ``plan`` (concurrently), never a query over every batch ever stored. For
        a plan that lists no unit ids (stored before they were; its batches may have
        ``ObjectId``s) or no plan, a query by ``backtest_id``."""
        coll = self.db[BATCHES]
        if plan is None or "unit_ids" not in plan:
            found = coll.find({"backtest_id": backtest_id}, projection or None).sort("unit_id", 1)
            return await found.to_list()
        docs = await asyncio.gather(
            *(
                coll.find_one({"_id": _batch_id(backtest_id, unit_id)}, projection or None)
                for unit_id in plan["unit_ids"]
            )
        )
        return [doc for doc in docs if doc is not None]

    async def claim(self, backtest_id: str, owner: str) -> Lease:
        """Take, take over or renew the replay's lease; the lease that stands (see the
        module docstring: every change of owner is an insert, so exactly one taker wins)."""
        coll = self.db[CLAIMS]
        with self._mapped(f"claiming the replay of backtest {backtest_id}"):
            while True:
                held = await self._last_lease(backtest_id)
                if held is not None and held["owner"] == owner:
                    return await self._renew(held)
                if held is not None and _utc(held["expires"]) > _now():
                    return _lease(held)
                now = _now()
                generation = 0 if held is None else held["generation"] + 1
                doc = {
                    "_id": f"{backtest_id}/{generation}",
                    "backtest_id": backtest_id,
                    "generation": generation,
                    "owner": owner,
                    "claimed_at": now,
                    "stored_at": now,
                    "expires": now + timedelta(seconds=self.lease_s),
                }
                try:
                    await coll.insert_one(doc)
                except DuplicateKeyError:
                    continue  # another taker won this generation: it stands
                return _lease(doc)

    async def _last_lease(self, backtest_id: str) -> Document | None:
        """The lease document of the last generation, if any."""
        leases = await self._leases(backtest_id)
        return leases[-1] if leases else None

    async def _leases(self, backtest_id: str) -> list[Document]:
        """The lease documents of every generation, in order (one ``_id`` lookup each)."""
        leases: list[Document] = []
        while (
            found := await self.db[CLAIMS].find_one({"_id": f"{backtest_id}/{len(leases)}"})
        ) is not None:
            leases.append(found)
        return leases

    async def _renew(self, held: Document) -> Lease:
        expires = _now() + timedelta(seconds=self.lease_s)
        await self.db[CLAIMS].update_one({"_id": held["_id"]}, {"$set": {"expires": expires}})
        # A taker that found our lease lapsed just before we moved it may have inserted the
        # next generation meanwhile: then the lease is theirs.
        next_id = f"{held['backtest_id']}/{held['generation'] + 1}"
        taker = await self.db[CLAIMS].find_one({"_id": next_id})
        return _lease(taker) if taker is not None else Lease(held["owner"], expires.timestamp())

    # -- quotas ------------------------------------------------------------------------------

    async def admit(self, tenant: str, backtest_id: str, units: int, quota: Quota) -> Admission:
        """Count the backtest, then check the tenant's count.

        Only inserts and deletes by ``_id`` decide anything: a conditional update is not
        atomic on every Mongo wire-protocol server (FerretDB reads, then writes). So the
        backtest is counted first (an insert into ``active``) and checked after: of two
        admissions racing for the last place, each sees the other, so neither can exceed
        the quota — at worst both are refused, and retry.
        """
        with self._mapped(f"admitting backtest {backtest_id} for tenant {tenant}"):
            try:
                await self.db[ACTIVE].insert_one(
                    {"_id": backtest_id, "tenant": tenant, "units": units, "since": _now()}
                )
            except DuplicateKeyError:
                return Admission.ADMITTED  # counted already: a second admission
            if not _over(quota, await self._counted(tenant)):
                return Admission.ADMITTED
            if await self._heal(tenant) and not _over(quota, await self._counted(tenant)):
                return Admission.ADMITTED
            await self.db[ACTIVE].delete_one({"_id": backtest_id})
        return Admission.OVER_QUOTA

    async def release(self, backtest_id: str) -> None:
        with self._mapped(f"releasing the quota of backtest {backtest_id}"):
            await self.db[ACTIVE].delete_one({"_id": backtest_id})

    async def _counted(self, tenant: str) -> list[Document]:
        """The tenant's counted backtests. ``active`` holds only unfinished backtests (a
        release deletes), so this never reads history."""
        return await self.db[ACTIVE].find({"tenant": tenant}).to_list()

    async def _heal(self, tenant: str) -> bool:
        """Stop counting the tenant's backtests that ended unobserved (they have a result)
        or long ago (:data:`STALE_AFTER_S`); True if any was. Run only when a quota is full:
        one lookup by ``_id`` per counted backtest."""
        healed = False
        for doc in await self._counted(tenant):
            since = doc["since"] if doc["since"].tzinfo else doc["since"].replace(tzinfo=UTC)
            ended = await self.db[RESULTS].find_one({"_id": doc["_id"]}, {"_id": 1})
            if ended is not None or _now() - since > timedelta(seconds=STALE_AFTER_S):
                await self.db[ACTIVE].delete_one({"_id": doc["_id"]})
                healed = True
        return healed

    # -- WAL, results, cache -----------------------------------------------------------------

    async def put_wal(self, backtest_id: str, records: Sequence[WalRecord]) -> None:
        """Append the records after the last one stored, in blocks of up to :data:`_WAL_BATCH`
        records, a document each: ``_id`` = ``<backtest id>/<its first seq>``, the records as
        JSON, and ``next``, the seq after its last. Records stored already are kept.

        One document per block, not per record: every lookup on FerretDB costs more the more
        documents a collection holds, and a replay logs thousands of records. Two writers (a
        replay that lost its lease and its taker) race on the insert of the next block; the
        loser goes on after the winner's. Acknowledged by the primary (the client's write
        concern) before it returns.
        """
        for record in records:
            if type(record.get("seq")) is not int:
                raise ValueError(f"a WAL record needs an integer 'seq', got {record!r:.200}")
        doing = f"writing the WAL of backtest {backtest_id}"
        end = 0
        with self._mapped(doing):
            while True:
                _, end = await self._wal_blocks(backtest_id, end, {"next": 1})
                block = [r for r in records if r["seq"] >= end][:_WAL_BATCH]
                if not block:
                    return
                first, after = block[0]["seq"], block[-1]["seq"] + 1
                doc = {
                    "_id": f"{backtest_id}/{first}",
                    "backtest_id": backtest_id,
                    "seq": first,
                    "next": after,
                    "records": json.dumps(block),
                    "stored_at": _now(),
                }
                try:
                    await self.db[WAL].insert_one(doc)
                except DuplicateKeyError:
                    taken = await self.db[WAL].find_one({"_id": doc["_id"]}, {"_id": 1})
                    if taken is None:  # the unique (backtest_id, seq) index: a record
                        raise MongoDataError(
                            f"{doing}: record {first} is stored as a record of its own (as "
                            f"before WAL blocks); delete the backtest's records in collection "
                            f"'wal' to replay it from the start"
                        ) from None
                    # another writer's block: go on after it
                else:
                    end = after

    async def get_wal(self, backtest_id: str) -> list[WalRecord]:
        """The stored records, by ``seq``: the blocks from seq 0 on, each found by ``_id``
        from the one before (a replay's log is empty, one lookup, unless it takes over a
        crashed one's). Records stored one per document (before blocks) are not read: a
        replay that takes over such a log is stopped, saying so, when it appends."""
        with self._mapped(f"reading the WAL of backtest {backtest_id}"):
            blocks, _ = await self._wal_blocks(backtest_id, 0, {"records": 1, "next": 1})
        return [record for block in blocks for record in json.loads(block["records"])]

    async def _wal_blocks(
        self, backtest_id: str, seq: int, projection: Document
    ) -> tuple[list[Document], int]:
        """The WAL blocks from the one starting at ``seq`` on, and the seq after the last."""
        blocks = []
        while (
            block := await self.db[WAL].find_one({"_id": f"{backtest_id}/{seq}"}, projection)
        ) is not None:
            blocks.append(block)
            seq = int(block["next"])
        return blocks, seq

    async def finish(self, result: BacktestResult) -> BacktestResult:
        """Store ``result`` unless the backtest has an outcome; the outcome (first wins)."""
        body = await _compress(result)
        meta = {
            "_id": result.backtest_id,
            "status": result.status,
            "cache_hit": result.cache_hit,
            "trade_count": len(result.trades),
        }
        doing = f"storing the result of backtest {result.backtest_id}"
        plan = None
        if result.status == "completed":  # its plan goes: its progress is kept here
            plan = await self._plan_meta(result.backtest_id)
            meta["unit_count"] = len((plan or {}).get("unit_ids", []))
        outcome: BacktestResult | None = result
        if not await self._insert_first(RESULTS, meta, body, doing):
            outcome = await self.get_result(result.backtest_id)
        if outcome is None:  # pragma: no cover - results are never deleted while in use
            raise MongoDataError(f"{doing}: a result is stored but cannot be read")
        if outcome.status == "completed":
            if result.status != "completed":
                plan = await self._plan_meta(result.backtest_id)
            await self._drop_working_records(result.backtest_id, plan)
        return outcome

    async def _drop_working_records(self, backtest_id: str, plan: Document | None) -> None:
        """Delete what only a running backtest reads, now that it completed: its batches
        (then their bodies) and plan (``plan``: its document), WAL blocks and lease
        generations, each by ``_id``. Its result records how many units it had.

        So those collections hold little but the running backtests, and each lookup in them
        (on FerretDB a scan of the whole collection) costs the same however many backtests
        completed before. Nothing reads them once a backtest completed: every unit was in,
        a batch of it delivered again finds its outcome first (portfolio_sim), and its
        progress is its result's ``unit_count`` (:meth:`units_done`). A
        backtest that ended otherwise (cancelled, failed) keeps them until the retention:
        its late batches still count for its progress. So does whatever a crash between
        the two steps leaves, and batches stored before their ``_id`` was derived.
        """
        doing = f"deleting the plan, batches, WAL and lease of ended backtest {backtest_id}"
        with self._mapped(doing):
            await asyncio.gather(
                self._drop_plan(backtest_id, plan),
                self._drop_wal(backtest_id),
                self._drop_leases(backtest_id),
            )

    async def _drop_plan(self, backtest_id: str, plan: Document | None) -> None:
        """Delete the batches of the backtest's plan, then the plan, its request kept in
        :data:`REQUESTS`; each document before its body (a crash in between leaves a body
        nothing names, which expires)."""
        if plan is None:
            return
        ids = [_batch_id(backtest_id, u) for u in plan.get("unit_ids", [])]
        await asyncio.gather(*(self._take(BATCHES, _id) for _id in ids))
        chunks = await self._chunks(PLANS, plan)  # ``plan`` is its whole document
        if chunks is not None:  # its request stays, for its report
            kept = await asyncio.to_thread(
                lambda: Plan.model_validate_json(_decompress(plan["body"], chunks))
            )
            body = await _compress(kept.request)
            await self._insert_first(REQUESTS, {"_id": backtest_id}, body, "keeping its request")
        await self._take(PLANS, backtest_id)

    async def _take(self, collection: str, _id: str) -> None:
        """Delete a record by ``_id``, then its body's chunks."""
        doc = await self.db[collection].find_one_and_delete({"_id": _id})
        if doc is not None:
            await self._delete_chunks(collection, doc["body"]["chunks"])

    async def _drop_wal(self, backtest_id: str) -> None:
        blocks, _ = await self._wal_blocks(backtest_id, 0, {"next": 1})
        await self._delete_ids(WAL, [block["_id"] for block in blocks])

    async def _drop_leases(self, backtest_id: str) -> None:
        await self._delete_ids(CLAIMS, [lease["_id"] for lease in await self._leases(backtest_id)])

    async def get_result(self, backtest_id: str) -> BacktestResult | None:
        return await self._read_result(RESULTS, backtest_id)

    async def ended(self, backtest_id: str) -> Status | None:
        """The stored outcome's status, from its small document (no body is read); ``None``
        at once for a backtest its tenant's quota still counts (in :data:`ACTIVE`).

        Every unit asks, and so do the scheduler and portfolio_sim, several times a backtest:
        ``active`` holds only the backtests in flight, where ``results`` holds every one for
        the retention (on FerretDB a lookup by ``_id`` reads the whole collection: ~5 ms per
        1,000 results). A backtest is released just after its outcome is stored
        (:func:`shared.outcome.finish`), so in between this says ``None`` a moment longer:
        as any answer may be stale by the time it is used, callers take ``None`` for "not
        yet", and an outcome, once stored, is the one that stands.
        """
        with self._mapped(f"looking up the outcome of backtest {backtest_id}"):
            if await self.db[ACTIVE].find_one({"_id": backtest_id}, {"_id": 1}) is not None:
                return None
            doc = await self.db[RESULTS].find_one({"_id": backtest_id}, {"status": 1})
        return None if doc is None else doc["status"]

    async def get_cached(self, key: str) -> BacktestResult | None:
        """The result stored under a request's cache key, if any."""
        return await self._read_result(CACHE, key)

    async def put_cached(self, key: str, result: BacktestResult) -> None:
        body = await _compress(result)
        meta = {"backtest_id": result.backtest_id, "status": result.status}
        await self._replace(CACHE, key, meta, body)

    async def get_described(self, key: str) -> StrategyInfo | None:
        with self._mapped(f"reading the description of strategy {key[:12]}"):
            doc = await self.db[DESCRIBED].find_one({"_id": key})
        return None if doc is None else described(json.loads(doc["info"]))

    async def put_described(self, key: str, info: StrategyInfo) -> None:
        doing = f"storing the description of strategy {key[:12]}"
        # JSON: work units are lists of lists, which FerretDB cannot store. A duplicate was
        # described already: the same answer.
        with self._mapped(doing), suppress(DuplicateKeyError):
            await self.db[DESCRIBED].insert_one(
                {"_id": key, "info": json.dumps(asdict(info)), "stored_at": _now()}
            )

    async def aclose(self) -> None:
        """Nothing to release: the client belongs to whoever connected it."""

    # -- sweeps: one document per sweep for its plan, one for the set of ended children -----

    async def put_sweep(self, plan: SweepPlan) -> None:
        # Written once (a redelivered sweep request plans the same children).
        doc = {"plan": plan.model_dump_json(), "stored_at": _now()}
        with self._mapped(f"storing the plan of sweep {plan.backtest_id}"):
            await self.db[SWEEPS].update_one(
                {"_id": plan.backtest_id}, {"$setOnInsert": doc}, upsert=True
            )

    async def get_sweep(self, backtest_id: str) -> SweepPlan | None:
        with self._mapped(f"reading the plan of sweep {backtest_id}"):
            doc = await self.db[SWEEPS].find_one({"_id": backtest_id})
        return None if doc is None else SweepPlan.model_validate_json(doc["plan"])

    async def sweep_child_done(self, backtest_id: str, child_id: str) -> int:
        # A document per child (``_id``: the child's, so counting it twice changes nothing),
        # then a count: an ``$addToSet`` on one document per sweep lost children that ended
        # at the same moment on FerretDB (its updates read, then write).
        with self._mapped(f"counting backtest {child_id} of sweep {backtest_id}"):
            done = self.db[SWEEP_DONE]
            with suppress(DuplicateKeyError):  # counted already
                await done.insert_one({"_id": child_id, "sweep": backtest_id, "stored_at": _now()})
        return await self.sweep_children_done(backtest_id)

    async def sweep_children_done(self, backtest_id: str) -> int:
        with self._mapped(f"reading the progress of sweep {backtest_id}"):
            return await self.db[SWEEP_DONE].count_documents({"sweep": backtest_id})

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- bodies ------------------------------------------------------------------------------

    def _mapped(self, doing: str) -> AbstractContextManager[None]:
        return mapped(doing, where=f"database {self.db.name}", needs=_NEEDS)

    async def _write_chunks(
        self, collection: str, owner: str, body: _Compressed, stored_at: datetime
    ) -> list[ObjectId]:
        """Write ``body``'s chunks, stamped with the ``stored_at`` of the record that will name
        them: chunks expire :data:`~shared.mongo._schema.CHUNK_GRACE` after their record."""
        ids = [ObjectId() for _ in body.parts]
        docs = [
            {"_id": _id, "owner": owner, "i": i, "data": part, "stored_at": stored_at}
            for i, (_id, part) in enumerate(zip(ids, body.parts, strict=True))
        ]
        chunks = self.db[chunks_of(collection)]
        await asyncio.gather(*(chunks.insert_one(doc) for doc in docs))
        return ids

    async def _delete_chunks(self, collection: str, ids: Sequence[Any]) -> None:
        await self._delete_ids(chunks_of(collection), ids)

    async def _delete_ids(self, collection: str, ids: Sequence[Any]) -> None:
        """One delete by ``_id`` each (``$in`` would decode every document on FerretDB)."""
        coll = self.db[collection]
        await asyncio.gather(*(coll.delete_one({"_id": _id}) for _id in ids))

    async def _replace(self, collection: str, _id: str, meta: Document, body: _Compressed) -> None:
        """Store a record's document and body, replacing any earlier one (last write wins).

        An insert first: the key is new almost always (a plan is replaced only when its
        request is delivered again, a cached result only when the same request on the same
        data was computed again), and an insert is checked on the unique index where a
        replace looks the key up first (on FerretDB, a scan of the whole collection).
        """
        doing = f"storing {collection} {_id}"
        if await self._insert_first(collection, {**meta, "_id": _id}, body, doing):
            return
        with self._mapped(doing):
            now = _now()
            ids = await self._write_chunks(collection, f"{collection}/{_id}", body, now)
            doc = {**meta, "stored_at": now, "body": body.describe(ids)}
            old = await self.db[collection].find_one_and_replace(
                {"_id": _id},
                doc,  # no projection: FerretDB's findAndModify has none, the doc is small
                upsert=True,
                return_document=ReturnDocument.BEFORE,
            )
            if old is not None:
                await self._delete_chunks(collection, old.get("body", {}).get("chunks", []))

    async def _insert_first(
        self, collection: str, meta: Document, body: _Compressed, doing: str
    ) -> bool:
        """Store a record unless its unique key is taken (first write wins); True if stored.

        ``meta`` may give the ``_id``; otherwise a fresh one is used.
        """
        _id = meta.get("_id", ObjectId())
        with self._mapped(doing):
            now = _now()
            ids = await self._write_chunks(collection, f"{collection}/{_id}", body, now)
            doc = {**meta, "_id": _id, "stored_at": now, "body": body.describe(ids)}
            try:
                await self.db[collection].insert_one(doc)
            except DuplicateKeyError:  # stored meanwhile: ours was never named, so drop it
                await self._delete_chunks(collection, ids)
                return False
        return True

    async def _read(self, collection: str, _id: str) -> tuple[Document, list[bytes]] | None:
        """A record's body description and chunks, or ``None`` if there is no such record."""
        with self._mapped(f"reading {collection} {_id}"):
            for _ in range(_READ_TRIES):
                doc = await self.db[collection].find_one({"_id": _id})
                if doc is None:
                    return None
                chunks = await self._chunks(collection, doc)
                if chunks is not None:
                    return doc["body"], chunks
        raise MongoDataError(
            f"{self.db.name}.{collection} {_id}: the chunks of its body are missing "
            f"({_READ_TRIES} reads); store it again"
        )

    async def _chunks(self, collection: str, doc: Document) -> list[bytes] | None:
        """The chunks ``doc`` names, in order; ``None`` if one is gone (replaced meanwhile)."""
        body = doc.get("body")
        if not isinstance(body, dict) or body.get("codec") != _CODEC:
            raise MongoDataError(
                f"{self.db.name}.{collection} {doc.get('_id')}: not a body stratorch wrote "
                f"(expected body.codec {_CODEC!r})"
            )
        chunks = self.db[chunks_of(collection)]
        found = await asyncio.gather(*(chunks.find_one({"_id": _id}) for _id in body["chunks"]))
        if any(chunk is None for chunk in found):
            return None
        return [bytes(chunk["data"]) for chunk in found if chunk is not None]

    async def _read_result(self, collection: str, _id: str) -> BacktestResult | None:
        found = await self._read(collection, _id)
        if found is None:
            return None
        return await asyncio.to_thread(
            lambda: BacktestResult.model_validate_json(_decompress(*found))
        )


class _Compressed:
    """A JSON body compressed and cut into chunks."""

    __slots__ = ("parts", "sha256", "size")

    def __init__(self, payload: bytes) -> None:
        packed = zlib.compress(payload, _ZLIB_LEVEL)
        self.size = len(payload)
        self.sha256 = hashlib.sha256(packed).hexdigest()
        self.parts = [
            packed[start : start + CHUNK_BYTES] for start in range(0, len(packed), CHUNK_BYTES)
        ]

    def describe(self, ids: list[ObjectId]) -> Document:
        return {"codec": _CODEC, "size": self.size, "sha256": self.sha256, "chunks": ids}


async def _compress(message: BaseModel) -> _Compressed:
    """``message``'s JSON, compressed and cut into chunks (in a worker thread)."""
    return await asyncio.to_thread(
        lambda: _Compressed(message.model_dump_json(by_alias=True).encode())
    )


def _decompress(body: Document, chunks: list[bytes]) -> bytes:
    """The JSON of a body from its chunks; :class:`MongoDataError` if they are not intact."""
    packed = b"".join(chunks)
    if hashlib.sha256(packed).hexdigest() != body.get("sha256"):
        raise MongoDataError(
            "a stored body does not match its sha256: its chunks are damaged; store it again"
        )
    return zlib.decompress(packed)


def _batch_id(backtest_id: str, unit_id: str) -> str:
    return f"{backtest_id}/{unit_id}"


def _lease(doc: Document) -> Lease:
    return Lease(str(doc["owner"]), _utc(doc["expires"]).timestamp())


def _utc(moment: datetime) -> datetime:
    """BSON dates come back naive (in UTC) unless the client is ``tz_aware``."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _over(quota: Quota, counted: Sequence[Document]) -> bool:
    """Whether ``counted`` (the new backtest among them) is past ``quota``."""
    if quota.running is not None and len(counted) > quota.running:
        return True
    return quota.units is not None and sum(int(d["units"]) for d in counted) > quota.units


def _now() -> datetime:
    return datetime.now(UTC)
