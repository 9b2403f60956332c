"""``python -m benchmarks``: the performance table of issue 9 from one run, every figure beside
its target and whether it is met.

Sections (``--sections``, all by default):

- ``engines``: ``stratorch run`` (process sandbox; Docker too on the many-symbol set) beside
  the numpy reference, vectorbt (Rust and numba engines) and backtesting.py on 1 symbol × 1M
  1m bars and 20 symbols × 100k, SYNTHETIC candles (a seeded random walk), the same rules;
  times (median of ``--repeat`` whole-process runs, engines in turn), ratios, peak RSS of each
  process tree, and whether trades and final equity equal stratorch's;
- ``perbar``: what ``decide(df)`` costs per bar, beside backtesting.py's ``next()`` and plain
  loops;
- ``candles``: candle read throughput, local Parquet store and MongoDB
  (``STRATORCH_MONGO_URL``);
- ``stack``: the real stack end to end (cold, cache hit, 30 at once), on this machine's
  RabbitMQ and Mongo (``scripts/services-up.sh``); skipped, saying why, when they are not up.
- ``sweep``: a 100-combination parameter sweep on 8 symbols, on the stack (one symbol
  worker, then two) and through ``stratorch run``, and whether their rankings are identical.

``--quick`` shrinks every size (seconds, for development and tests). vectorbt and
backtesting.py come with the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import services
import shared
import stratorch
from benchmarks import candles, compare
from benchmarks.report import Figure, print_section
from benchmarks.rivals import DIFFERENCES
from benchmarks.synthetic import write_store
from shared.candles import ParquetCandleStore
from shared.logging import configure as configure_logging

SECTIONS = ("engines", "perbar", "candles", "stack", "sweep")


@dataclass(frozen=True)
class Sizes:
    big: int  # bars of the one-symbol set
    symbols: int  # symbols of the many-symbol set
    bars: int  # bars of each of those
    per_bar: int
    mongo: int
    backtests: int  # submitted at once to the stack
    stack_timeout_s: float


FULL = Sizes(1_000_000, 20, 100_000, 100_000, 5_000, 30, 180)
QUICK = Sizes(20_000, 4, 5_000, 5_000, 500, 4, 180)


def compile_project() -> None:
    """Compile stratorch's modules to bytecode, as a user's first run (or a regular install)
    leaves them. A machine that sets ``PYTHONDONTWRITEBYTECODE`` (this one does) would make
    every timed ``stratorch run`` compile them anew, ~50 ms no user pays twice; the other
    engines' packages were compiled when pip installed them."""
    for package in (shared, services, stratorch):
        compileall.compile_dir(Path(package.__file__).parent, quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    parser.add_argument("--repeat", type=int, help="runs per engine (default 3; --quick 1)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--no-docker", action="store_true", help="skip `stratorch run --sandbox docker`"
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    sizes = QUICK if args.quick else FULL
    repeat = args.repeat or (1 if args.quick else 3)
    docker = not args.no_docker and bool(os.environ.get("DOCKER_HOST") or shutil.which("docker"))

    configure_logging("warning")  # the Mongo client's info lines would break up the table
    started = time.perf_counter()
    compile_project()
    print(
        f"python -m benchmarks{' --quick' if args.quick else ''}: {os.cpu_count()} CPUs, "
        f"median of {repeat} whole-process run(s) per engine; SYNTHETIC candles"
    )
    with tempfile.TemporaryDirectory(prefix="stratorch-bench-") as tmp:
        work = Path(tmp)
        one, many = work / "one", work / "many"
        if "engines" in sections:
            symbol = written(one, 1, sizes.big)
            print_section(
                f"1 symbol × {sizes.big:,} 1m bars",
                compare.engines_section(one, symbol, sizes.big, work, repeat, docker=False),
            )
            symbols = written(many, sizes.symbols, sizes.bars)
            print_section(
                f"{sizes.symbols} symbols × {sizes.bars:,} 1m bars, one all-in position at a time",
                compare.engines_section(many, symbols, sizes.bars, work, repeat, docker=docker),
            )
            print("\nWhere another engine's trades or equity differ, and why:")
            for engine, why in DIFFERENCES.items():
                print(f"- {engine}: {why}.")
        if "perbar" in sections:
            store = work / "perbar"
            (symbol,) = written(store, 1, sizes.per_bar)
            print_section(
                "Per-bar decide(df)",
                compare.perbar_section(store, symbol, sizes.per_bar, work, repeat),
            )
        if "candles" in sections:
            (symbol,) = written(one, 1, sizes.big)
            print_section(
                "Candle reads, one client",
                [
                    candles.local(one, symbol, repeat),
                    *candles.mongo_section(sizes.mongo, 2 * sizes.big, repeat),
                ],
            )
        if "stack" in sections:
            print_section("The stack end to end", stack_section(sizes, work))
        if "sweep" in sections:
            from benchmarks.sweep import sweep_section  # the stack helpers: the dev extra

            print_section("A parameter sweep", sweep_section(args.quick, work))
    elapsed = time.perf_counter() - started
    print_section(
        "This run",
        [
            Figure(
                "python -m benchmarks, wall time",
                f"{elapsed / 60:.1f} min",
                "< 15 min",
                elapsed < 15 * 60,
            )
        ],
    )
    return 0


def written(root: Path, symbols: int, bars: int) -> list[str]:
    """The store at ``root``, written on first use (sections share the data sets)."""
    if root.exists():
        return ParquetCandleStore(root).symbols("1m")
    return write_store(root, symbols, bars)


def stack_section(sizes: Sizes, work: Path) -> list[Figure]:
    try:  # the stack helpers live with the integration tests (the dev extra)
        from benchmarks import stack
    except ImportError as exc:
        return [Figure("the stack", f"skipped: {exc} (pip install -e '.[dev]')")]
    return stack.end_to_end(sizes.backtests, sizes.stack_timeout_s, work)


if __name__ == "__main__":
    sys.exit(main())
