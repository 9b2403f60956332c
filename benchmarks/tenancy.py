"""Time what tenancy adds to every backtest on a Mongo wire-protocol server: taking its id
(an insert), an admission (counted insert, the tenant's count), an owner lookup (every status
query) and a release (when it ends). Run against ``STRATORCH_MONGO_URL`` (a throwaway database):

    .venv/bin/python benchmarks/tenancy.py              # 40 backtests counted at once
    .venv/bin/python benchmarks/tenancy.py --backtests 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

from shared import mongo
from shared.tenancy import Quota


async def run(url: str, backtests: int) -> None:
    client = await mongo.connect(url)
    name = f"stratorch_bench_{uuid.uuid4().hex[:8]}"
    try:
        db = client[name]
        await mongo.ensure_indexes(db)
        store = mongo.MongoStore(db)
        quota = Quota(running=backtests, units=backtests * 2)
        timings = {}
        started = time.perf_counter()
        for i in range(backtests):
            await store.accept(f"bt{i}", f"{i:064x}", tenant="bench")
        timings["accept"] = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(backtests):
            await store.admit("bench", f"bt{i}", 2, quota)
        timings["admit"] = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(backtests):
            await store.get_accepted(f"bt{i}")
        timings["owner"] = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(backtests):
            await store.release(f"bt{i}")
        timings["release"] = time.perf_counter() - started
        for step, seconds in timings.items():
            print(f"{step:8} {seconds / backtests * 1000:7.1f} ms each ({backtests} backtests)")
    finally:
        await client.drop_database(name)
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backtests", type=int, default=40)
    args = parser.parse_args()
    url = os.environ.get("STRATORCH_MONGO_URL", "mongodb://127.0.0.1:27017/")
    asyncio.run(run(url, args.backtests))


if __name__ == "__main__":
    main()
