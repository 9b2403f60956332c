"""Time a whole embedded backtest: N symbols × M bars of SYNTHETIC candles, end to end.

The candles are a seeded geometric random walk (clearly not market data): what is measured is
the engine — candle loading, the process sandbox, exit resolution, the portfolio replay and
metrics — not a strategy's edge. Run:

    .venv/bin/python benchmarks/engine.py                # 20 symbols × 100,000 1m bars
    .venv/bin/python benchmarks/engine.py --symbols 4 --bars 10000
    .venv/bin/python benchmarks/engine.py --symbols 1 --report   # and time its HTML report
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from synthetic import write_store  # benchmarks/ is the script's directory

from shared import report
from shared.candles import ParquetCandleStore
from shared.ports import Ports
from shared.sandbox.process import ProcessSandbox
from shared.store import FileStore
from stratorch.embedded import run_backtest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--bars", type=int, default=100_000)
    parser.add_argument("--strategy", default="sma_cross")
    parser.add_argument("--report", action="store_true", help="also time the HTML report")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = ParquetCandleStore(Path(tmp) / "candles")
        symbols = write_store(store.root, args.symbols, args.bars)
        request = {
            "strategy": {"builtin": args.strategy},
            "symbols": symbols,
            "interval": "1m",
            "start": "2021-01-01",
            "end": "2030-01-01",
            "portfolio": {
                "builtin": "fixed_fraction",
                "params": {"fraction": 0.1, "max_positions": 10},
            },
        }
        ports = Ports(store, ProcessSandbox(), FileStore(Path(tmp) / "state"))
        started = time.perf_counter()
        result = asyncio.run(run_backtest(json.dumps(request).encode(), ports))
        elapsed = time.perf_counter() - started
        if args.report:  # as `stratorch run --report` builds it: prices read, page rendered
            started = time.perf_counter()
            page = asyncio.run(report.build(result, store, request))
            report_s, report_mb = time.perf_counter() - started, len(page.encode()) / 1e6
    assert result.status == "completed", result.errors
    assert result.metrics is not None
    print(f"{args.symbols} symbols × {args.bars:,} bars ({args.strategy}, process sandbox)")
    print(f"  wall time            {elapsed:8.2f} s")
    print(f"  bars per second      {args.symbols * args.bars / elapsed:12,.0f}")
    print(f"  trades               {result.metrics.trade_count:8d}")
    print(f"  WAL events           {result.wal.events if result.wal else 0:8d}")
    print(f"  sum of unit times    {result.timings['units_s']:8.2f} s")
    print(f"  portfolio replay     {result.timings['replay_s']:8.2f} s")
    if args.report:
        print(f"  HTML report          {report_s:8.2f} s, {report_mb:.1f} MB")


if __name__ == "__main__":
    main()
