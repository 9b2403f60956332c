"""What writing the WAL ahead costs a big replay: the replay alone, with its WAL stored after
it (how portfolio_sim did it before the WAL was write-ahead), and with the WAL written ahead in
batches while it runs (how it does now), on the file store and, if one answers, on MongoDB.

The proposals come from an embedded backtest of a strategy that buys on every bar, over
SYNTHETIC candles (a seeded random walk, clearly not market data), with ``max_holding_bars``
1: two WAL events per bar and symbol. Run:

    .venv/bin/python benchmarks/wal.py                         # 8 symbols × 10,000 bars
    STRATORCH_MONGO_URL=mongodb://127.0.0.1:27017/ .venv/bin/python benchmarks/wal.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from synthetic import synthetic  # benchmarks/ is the script's directory

from services.portfolio_sim.lease import HeldLease
from services.portfolio_sim.wal import WalWriter
from shared import mongo
from shared.candles import ParquetCandleStore
from shared.messages import BacktestRequest, Plan, ProposalBatch
from shared.ports import Ports
from shared.sandbox.process import ProcessSandbox
from shared.sim import simulate
from shared.store import FileStore, Store
from stratorch.embedded import run_backtest

HOUR = 3_600_000
EVERY_BAR = """
import pandas as pd
from shared.strategy import BaseStrategy

class EveryBar(BaseStrategy):
    def signals(self, df):
        return pd.DataFrame({"signal": ["BUY"] * len(df)}, index=df.index)
"""


def proposals(tmp: Path, symbols: int, bars: int) -> tuple[BacktestRequest, list[ProposalBatch]]:
    """Run the embedded engine once; the request and the units' batches it left behind."""
    names = [f"SYN{i:02d}USDT" for i in range(symbols)]
    candles = ParquetCandleStore(tmp / "candles")
    for i, symbol in enumerate(names):
        candles.write(symbol, "1h", synthetic(bars, seed=i, step_ms=HOUR, sigma=0.01, spread=0.005))
    request = {
        "id": "wal-bench",
        "strategy": {"source": EVERY_BAR, "class": "EveryBar"},
        "symbols": names,
        "interval": "1h",
        "start": "2021-01-01",
        "end": "2040-01-01",
        "max_holding_bars": 1,
        "portfolio": {"builtin": "fixed_fraction", "params": {"fraction": 0.1}},
    }
    state = FileStore(tmp / "state")
    result = asyncio.run(
        run_backtest(json.dumps(request).encode(), Ports(candles, ProcessSandbox(), state))
    )
    assert result.status == "completed", result.errors
    folder = tmp / "state" / "backtests" / "wal-bench"
    plan = Plan.model_validate_json((folder / "plan.json").read_bytes())
    batches = [
        ProposalBatch.model_validate_json(p.read_bytes())
        for p in sorted((folder / "batches").glob("*.json"))
    ]
    return plan.request, batches


async def timed(run: Callable[[], Awaitable[int]]) -> tuple[float, int]:
    started = time.perf_counter()
    events = await run()
    return time.perf_counter() - started, events


async def compare(store: Store, request: BacktestRequest, batches: list[ProposalBatch]) -> None:
    async def alone() -> int:
        _, wal = await asyncio.to_thread(simulate, request, batches)
        return len(wal)

    async def after() -> int:
        _, wal = await asyncio.to_thread(simulate, request, batches)
        await store.put_wal("after", wal)
        return len(wal)

    async def ahead() -> int:
        await store.claim("ahead", "bench")
        async with HeldLease(store, "ahead", "bench") as lease:
            wal = WalWriter(store, "ahead", [], check=lease.check, loop=asyncio.get_running_loop())
            _, records = await asyncio.to_thread(simulate, request, batches, log=wal)
            await wal.close()
        return len(records)

    rows = [
        ("replay, no WAL stored", alone),
        ("replay, then its WAL (before)", after),
        ("replay writing its WAL ahead (now)", ahead),
    ]
    base = None
    for name, run in rows:
        seconds, events = await timed(run)
        base = base or seconds
        print(
            f"  {name:36} {seconds:7.2f} s   {events / seconds:9,.0f} events/s"
            f"   +{seconds - base:6.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=8)
    parser.add_argument("--bars", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        request, batches = proposals(Path(tmp), args.symbols, args.bars)
        print(f"{args.symbols} symbols × {args.bars:,} bars, a BUY on every bar")
        print("file store:")
        asyncio.run(compare(FileStore(Path(tmp) / "bench"), request, batches))
    url = os.environ.get("STRATORCH_MONGO_URL")
    if url:
        print(f"MongoDB at {mongo.redact(url)}:")
        asyncio.run(on_mongo(url, request, batches))


async def on_mongo(url: str, request: BacktestRequest, batches: list[ProposalBatch]) -> None:
    client = await mongo.connect(url, retries=0)
    db = client[f"stratorch_bench_{uuid.uuid4().hex[:8]}"]
    try:
        await mongo.ensure_indexes(db)
        await compare(mongo.MongoStore(db), request, batches)
    finally:
        await client.drop_database(db.name)
        await client.close()


if __name__ == "__main__":
    main()
