"""Candle read throughput per client: the local Parquet store, and MongoDB's per-bar layout
(one document per bar) and columnar layout (a chunk per month: cold, on full-precision floats,
on full-precision floats whose taker buys are a random share of the volume, and on
tick-rounded prices; and from the worker's chunk cache) on the server at
``STRATORCH_MONGO_URL``, in a database of its own that is dropped afterwards."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.report import Figure
from benchmarks.synthetic import MINUTE, T0, synthetic

if TYPE_CHECKING:
    import pandas as pd

    from shared.mongo import ChunkCache

TARGET = 1_000_000  # candles/s per client, from the columnar layout (issue 9)
_PRICES = ("open", "high", "low", "close")
_QUANTITIES = ("volume", "taker_buy_base")
_QUOTE_VOLUMES = ("quote_volume", "taker_buy_quote")
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


async def _mongo(url: str, bars: int, columnar: int, repeat: int) -> list[Figure]:
    from shared import mongo

    name = f"stratorch_bench_{uuid.uuid4().hex[:8]}"
    client = await mongo.connect(url)
    try:
        db = client[name]
        await mongo.ensure_indexes(db)
        frame = synthetic(bars, 0, step_ms=MINUTE, sigma=0.001, spread=0.0007)
        started = time.perf_counter()
        await mongo.write_candles(db, "SYN00USDT", "1m", frame)
        written = time.perf_counter() - started
        n, rate = await _read_rate(url, name, "SYN00USDT", repeat)
        per_bar = [
            Figure(
                f"Mongo, one document per bar, {n:,} bars: write",
                f"{bars / written:,.0f} candles/s",
            ),
            Figure(
                f"Mongo, one document per bar, {n:,} bars: read",
                f"{rate:,.0f} candles/s (the layout the columnar one, below, replaces)",
            ),
        ]
        columnar_rows = []
        for symbol, frame, what in _columnar_data(columnar):
            started = time.perf_counter()
            await mongo.write_chunks(db, symbol, "1m", frame)
            written = time.perf_counter() - started
            n, rate = await _read_rate(url, name, symbol, repeat)
            columnar_rows += [
                Figure(
                    f"Mongo, columnar, {n:,} bars ({what}): write",
                    f"{columnar / written:,.0f} candles/s",
                ),
                Figure(
                    f"Mongo, columnar, {n:,} bars ({what}): read",
                    f"{rate:,.0f} candles/s",
                    f"≥ {TARGET:,}/s",
                    rate >= TARGET,
                ),
            ]
        cache = mongo.ChunkCache(2 * columnar * 88)  # 88 bytes a bar, decoded
        await _read_rate(url, name, symbol, 1, cache)  # fills it
        n, hit = await _read_rate(url, name, symbol, repeat, cache)
        return [
            *per_bar,
            *columnar_rows,
            Figure(
                f"Mongo, columnar, {n:,} bars: read, chunks in the worker's cache",
                f"{hit:,.0f} candles/s",
            ),
        ]
    finally:
        await client.drop_database(name)
        await client.close()


def _columnar_data(bars: int) -> list[tuple[str, pd.DataFrame, str]]:
    """The synthetic random walk as it is (every float a full 53-bit mantissa: the worst case
    for the chunks' compression, except that its taker buys are exactly half the volumes,
    which the chunks store in next to nothing); the same with taker buys a random share of the
    volumes (full 53-bit mantissas there too); and on Binance's grid: prices to 0.01,
    quantities to 0.00001, which the chunks store as scaled integers."""
    import numpy as np

    frame = synthetic(bars, 1, step_ms=MINUTE, sigma=0.001, spread=0.0007)
    shares = frame.copy()
    share = np.random.default_rng(1).uniform(0.2, 0.8, bars)
    shares["taker_buy_base"] = shares["volume"] * share
    shares["taker_buy_quote"] = shares["quote_volume"] * share
    ticks = frame.copy()
    for names, places in (_PRICES, 2), (_QUANTITIES, 5), (_QUOTE_VOLUMES, 7):
        ticks[list(names)] = ticks[list(names)].round(places)
    ticks["high"] = ticks[["open", "close", "high"]].max(axis=1)
    ticks["low"] = ticks[["open", "close", "low"]].min(axis=1)
    return [
        ("SYN01USDT", frame, "full-precision floats"),
        ("SYN03USDT", shares, "full-precision floats, taker buys a random share"),
        ("SYN02USDT", ticks, "prices on a 0.01 tick"),
    ]


async def _read_rate(
    url: str, database: str, symbol: str, repeat: int, cache: ChunkCache | None = None
) -> tuple[int, float]:
    """Bars read and candles/s (median of ``repeat`` loads of the whole series), one client."""
    from shared import mongo
    from shared.candles import Span

    seconds, n = [], 0
    async with mongo.MongoCandleSource(url, database, cache=cache) as source:
        for _ in range(repeat):
            started = time.perf_counter()
            n = len(await source.load(symbol, Span("1m", T0, END)))
            seconds.append(time.perf_counter() - started)
    return n, n / statistics.median(seconds)


def mongo_section(bars: int, columnar: int, repeat: int) -> list[Figure]:
    """Per-bar layout: ``bars`` bars; columnar: ``columnar`` bars (a few million: a chunk
    holds a month of 1m bars, 44,640)."""
    url = os.environ.get("STRATORCH_MONGO_URL")
    if not url:
        return [Figure("Mongo candle reads", "skipped: STRATORCH_MONGO_URL is not set")]
    try:
        return asyncio.run(_mongo(url, bars, columnar, repeat))
    except Exception as exc:  # a server that is not there is a skip, said plainly
        return [Figure("Mongo candle reads", f"skipped: {type(exc).__name__}: {exc}")]
