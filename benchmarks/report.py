"""Time the HTML report of a long backtest: N symbols × M bars of SYNTHETIC 1m candles.

The backtest runs first (not timed); then :func:`shared.report.build` is timed as
``stratorch run --report`` calls it: the prices read from the store, the page rendered. Run:

    .venv/bin/python benchmarks/report.py                 # 1 symbol × 100,000 1m bars
    .venv/bin/python benchmarks/report.py --symbols 8 --bars 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from synthetic import synthetic  # benchmarks/ is the script's directory

from shared import report
from shared.candles import ParquetCandleStore
from shared.ports import Ports
from shared.sandbox.process import ProcessSandbox
from shared.store import FileStore
from stratorch.embedded import run_backtest

MINUTE = 60_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=1)
    parser.add_argument("--bars", type=int, default=100_000)
    args = parser.parse_args()
    symbols = [f"SYN{i:02d}USDT" for i in range(args.symbols)]
    with tempfile.TemporaryDirectory() as tmp:
        store = ParquetCandleStore(Path(tmp) / "candles")
        for i, symbol in enumerate(symbols):
            bars = synthetic(args.bars, seed=i, step_ms=MINUTE, sigma=0.001, spread=0.0007)
            store.write(symbol, "1m", bars)
        request = {
            "strategy": {"builtin": "sma_cross"},
            "symbols": symbols,
            "interval": "1m",
            "start": "2021-01-01",
            "end": "2030-01-01",
            "portfolio": {
                "builtin": "fixed_fraction",
                "params": {"fraction": 0.5, "max_positions": max(1, args.symbols)},
            },
        }
        ports = Ports(store, ProcessSandbox(), FileStore(Path(tmp) / "state"))
        result = asyncio.run(run_backtest(json.dumps(request).encode(), ports))
        assert result.status == "completed", result.errors
        started = time.perf_counter()
        page = asyncio.run(report.build(result, store, request))
        elapsed = time.perf_counter() - started
    print(f"report of {args.symbols} symbol(s) × {args.bars:,} bars, {len(result.trades):,} trades")
    print(f"  build (read prices, render)   {elapsed:6.2f} s")
    print(f"  size                          {len(page.encode()) / 1e6:6.2f} MB")


if __name__ == "__main__":
    main()
