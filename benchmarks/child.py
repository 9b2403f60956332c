"""One engine over candles of a local store, as a process of its own (so the parent times it
with its imports, as a user would see it, and measures its memory alone). Run by
``benchmarks.compare``:

    python -m benchmarks.child ENGINE STORE OUT.json SYMBOL...

ENGINE is ``reference``, ``vectorbt-rust``, ``vectorbt-numba`` or ``backtesting``; the outcome
(trades, final equity, and ``loop_s``: the engine's run without its imports) is written to OUT.json.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks.reference import Series, simulate


def read(store: Path, symbol: str) -> Series:
    frame = pd.read_parquet(
        store / "1m" / f"{symbol}.parquet", columns=["open_time", "open", "high", "low", "close"]
    )
    return Series(
        symbol,
        frame["open_time"].to_numpy(),
        *(frame[c].to_numpy() for c in ("open", "high", "low", "close")),
    )


def main(argv: list[str]) -> None:
    engine, store, out, *symbols = argv
    series = [read(Path(store), s) for s in symbols]
    if engine == "reference":
        run = simulate
    else:
        from benchmarks import rivals

        run = rivals.ENGINES[engine]
        importlib.import_module(engine.split("-")[0])  # loop_s is the engine's run, not its imports
    started = time.perf_counter()
    outcome = run(series)
    doc = {**outcome.to_json(), "loop_s": time.perf_counter() - started}
    Path(out).write_text(json.dumps(doc))


if __name__ == "__main__":
    main(sys.argv[1:])
