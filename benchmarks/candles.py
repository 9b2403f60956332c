"""Candle read throughput per client: the local Parquet store, and MongoDB's per-bar layout
(one document per bar) on the server at ``STRATORCH_MONGO_URL``, in a database of its own that
is dropped afterwards."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from pathlib import Path

from benchmarks.report import Figure
from benchmarks.synthetic import MINUTE, T0, synthetic

TARGET = 1_000_000  # candles/s per client, from the columnar layout (issue 9)
END = 2**62


def local(store: Path, symbol: str, repeat: int) -> Figure:
    from shared.candles import ParquetCandleStore

    source = ParquetCandleStore(store)
    seconds, n = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        n = len(source.read(symbol, "1m", start_ms=T0, end_ms=END))
        seconds.append(time.perf_counter() - started)
    rate = n / statistics.median(seconds)
    return Figure(f"local Parquet store, {n:,} bars", f"{rate:,.0f} candles/s")


async def _mongo(url: str, bars: int, repeat: int) -> list[Figure]:
    from shared import mongo
    from shared.candles import Window

    name = f"stratorch_bench_{uuid.uuid4().hex[:8]}"
    client = await mongo.connect(url)
    try:
        db = client[name]
        await mongo.ensure_indexes(db)
        frame = synthetic(bars, 0, step_ms=MINUTE, sigma=0.001, spread=0.0007)
        started = time.perf_counter()
        await mongo.write_candles(db, "SYN00USDT", "1m", frame)
        written = time.perf_counter() - started
        seconds = []
        async with mongo.MongoCandleSource(url, name) as source:
            for _ in range(repeat):
                started = time.perf_counter()
                n = len(await source.load("SYN00USDT", Window("1m", T0, END)))
                seconds.append(time.perf_counter() - started)
        rate = n / statistics.median(seconds)
        return [
            Figure(
                f"Mongo, one document per bar, {n:,} bars: write",
                f"{bars / written:,.0f} candles/s",
            ),
            Figure(
                f"Mongo, one document per bar, {n:,} bars: read",
                f"{rate:,.0f} candles/s",
                f"≥ {TARGET:,}/s (columnar)",
                rate >= TARGET,
            ),
            Figure(
                "Mongo, columnar layout: read",
                "not built yet",
                f"≥ {TARGET:,}/s",
                None,
            ),
        ]
    finally:
        await client.drop_database(name)
        await client.close()


def mongo_section(bars: int, repeat: int) -> list[Figure]:
    url = os.environ.get("STRATORCH_MONGO_URL")
    if not url:
        return [Figure("Mongo candle reads", "skipped: STRATORCH_MONGO_URL is not set")]
    try:
        return asyncio.run(_mongo(url, bars, repeat))
    except Exception as exc:  # a server that is not there is a skip, said plainly
        return [Figure("Mongo candle reads", f"skipped: {type(exc).__name__}: {exc}")]
