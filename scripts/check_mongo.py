"""Self-check of a MongoDB wire-protocol server for scripts/start-mongo.sh.

check_mongo.py --ping URL     exit 0 if the server answers ping (fast, for polling)
check_mongo.py --verify URL   what stratorch needs (fails loudly), then a report of
                              optional features the server lacks (never fails)
"""

import asyncio
import sys
from urllib.parse import urlsplit

from pymongo import AsyncMongoClient, MongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

DB = "stratorch_selfcheck"
FAST = {"serverSelectionTimeoutMS": 1000, "connectTimeoutMS": 1000}


def with_option(url: str, option: str) -> str:
    return url + ("&" if urlsplit(url).query else ("?" if url.endswith("/") else "/?")) + option


async def required(url: str) -> None:
    client = AsyncMongoClient(url, **FAST)
    try:
        await client.admin.command("ping")
        await client.drop_database(DB)
        coll = client[DB]["candles"]
        await coll.create_index([("symbol", 1), ("interval", 1), ("open_time", 1)], unique=True)
        close = 43210.123456789012  # a double that must come back bit for bit
        docs = [
            {
                "symbol": "BTCUSDT",
                "interval": "1h",
                "open_time": 1_700_000_000_000 + i * 3_600_000,
                "close": close + i,
            }
            for i in range(5)
        ]
        await coll.insert_many(docs)
        try:
            await coll.insert_one({**docs[0], "_id": "dup"})
            raise AssertionError("unique compound index did not reject a duplicate")
        except DuplicateKeyError:
            pass
        rows = await coll.find({"symbol": "BTCUSDT"}, {"_id": 0}).sort("open_time", -1).to_list()
        assert [r["open_time"] for r in rows] == sorted(
            (d["open_time"] for d in docs), reverse=True
        )
        assert isinstance(rows[-1]["open_time"], int) and rows[-1]["close"] == close, rows[-1]
        print("  ok: ping, insert, unique compound index (rejects a duplicate), find+sort,")
        print("  ok: int64 and double values round-trip exactly")
    finally:
        await client.close()

    secondary = AsyncMongoClient(with_option(url, "readPreference=secondaryPreferred"), **FAST)
    try:
        n = await secondary[DB]["candles"].count_documents({"interval": "1h"})
        assert n == 5, n
        print("  ok: readPreference=secondaryPreferred in the URI (reads served)")
    finally:
        await secondary.close()


async def optional(url: str) -> list[str]:
    """Probe features a Mongo user expects; return what is missing."""
    client = AsyncMongoClient(url, **FAST)
    db, coll = client[DB], client[DB]["candles"]
    missing: list[str] = []

    async def probe(name, coro_fn):
        try:
            await coro_fn()
            print(f"  ok: {name}")
        except (PyMongoError, AssertionError, NotImplementedError) as exc:
            print(f"  MISSING: {name}: {type(exc).__name__}: {str(exc)[:160]}")
            missing.append(name)

    async def find_one_and_update_upsert():
        doc = await db.plans.find_one_and_update(
            {"_id": "bt-1"},
            {"$setOnInsert": {"n": 0}, "$inc": {"v": 1}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc == {"_id": "bt-1", "n": 0, "v": 1}, doc

    async def aggregate_group():
        out = await (
            await coll.aggregate(
                [
                    {"$match": {"symbol": "BTCUSDT"}},
                    {"$group": {"_id": "$symbol", "n": {"$sum": 1}}},
                ]
            )
        ).to_list()
        assert out == [{"_id": "BTCUSDT", "n": 5}], out

    async def aggregate_lookup():
        await (
            await coll.aggregate(
                [
                    {
                        "$lookup": {
                            "from": "plans",
                            "localField": "symbol",
                            "foreignField": "_id",
                            "as": "p",
                        }
                    }
                ]
            )
        ).to_list()

    async def bulk_unordered():
        from pymongo import InsertOne, UpdateOne

        await db.bulk.bulk_write(
            [
                InsertOne({"_id": 1}),
                InsertOne({"_id": 1}),
                UpdateOne({"_id": 2}, {"$set": {"x": 1}}, upsert=True),
            ],
            ordered=False,
        )

    async def bulk_unordered_reports_dup():
        try:
            await bulk_unordered()
        except PyMongoError as exc:
            assert "E11000" in str(exc) or "duplicate" in str(exc).lower(), exc
            assert await db.bulk.count_documents({}) == 2
            return
        raise AssertionError("duplicate in an unordered bulk write was not reported")

    async def transaction():
        async with client.start_session() as s:
            await s.start_transaction()
            await db.tx.insert_one({"x": 1}, session=s)
            await s.commit_transaction()

    async def change_stream():
        async with await coll.watch(max_await_time_ms=100) as stream:
            await stream.try_next()

    async def ttl_index():
        await db.ttl.create_index("at", expireAfterSeconds=60)

    async def read_only_user():
        await db.command(
            "createUser", "candles_ro", pwd="ro-pass", roles=[{"role": "read", "db": DB}]
        )
        try:
            ro = AsyncMongoClient(
                url, username="candles_ro", password="ro-pass", authSource=DB, **FAST
            )
            try:
                await ro[DB]["candles"].find_one()
                try:
                    await ro[DB]["candles"].insert_one({"forbidden": True})
                except PyMongoError:
                    return
                raise AssertionError(
                    "user created, but its 'read' role is not enforced: it could write"
                )
            finally:
                await ro.close()
        finally:
            await db.command("dropUser", "candles_ro")

    async def replica_set_uri():
        hello = await client.admin.command("hello")
        assert "setName" in hello, (
            "server reports no replica set: a URI with replicaSet=... won't connect"
        )
        rs = AsyncMongoClient(with_option(url, f"replicaSet={hello['setName']}"), **FAST)
        try:
            await rs[DB]["candles"].find_one()
        finally:
            await rs.close()

    for name, fn in [
        ("findOneAndUpdate with upsert", find_one_and_update_upsert),
        ("aggregate $match/$group", aggregate_group),
        ("aggregate $lookup", aggregate_lookup),
        ("unordered bulk write reports duplicates, applies the rest", bulk_unordered_reports_dup),
        ("TTL index", ttl_index),
        ("multi-document transactions", transaction),
        ("change streams", change_stream),
        ("read-only user (createUser + enforced 'read' role)", read_only_user),
        ("replica set URI (replicaSet=<hello.setName>)", replica_set_uri),
    ]:
        await probe(name, fn)
    await client.drop_database(DB)
    await client.close()
    return missing


def main() -> int:
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "--ping":
        with MongoClient(url, **FAST) as c:
            c.admin.command("ping")
        return 0
    with MongoClient(url, **FAST) as c:
        info = c.admin.command("buildInfo")
        print(
            f"  server: MongoDB-compatible {info.get('version')}; "
            f"FerretDB {info.get('ferretdbVersion', 'no')}"
        )
    asyncio.run(required(url))
    missing = asyncio.run(optional(url))
    print(f"  optional features missing: {', '.join(missing) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
