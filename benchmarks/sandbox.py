"""Time what the Docker sandbox adds per unit, and to a whole 20-symbol backtest.

Overhead is measured against the same strategy work done in this process (``describe`` and
``compute_signals`` on the same candles): what remains is container start-up, the job's trip
through the attached streams, packing the candles and parsing the result. Three settings:

- cold: a container per call (``session=None``): every call pays a container's start-up;
- warm: one session, calls one after another: only the first call starts a container;
- a 20-symbol backtest as the services run it: ``describe``, then the 20 units two at a
  time (``--parallel``, the worker's concurrency on 2 cores), in one session.

The candles are the bundled real sample (8 symbols of 1h bars, 5,482 each; the 20 symbols of
the backtest cycle through them). Needs dockerd and a sandbox image (``scripts/start-docker.sh``
and ``scripts/build-sandbox-image.sh``). Run:

    .venv/bin/python benchmarks/sandbox.py                     # image stratorch-sandbox:test
    .venv/bin/python benchmarks/sandbox.py --units 20 --image stratorch-sandbox:latest
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pandas as pd

from shared.sandbox import ProcessSandbox, Sandbox
from shared.sandbox.docker import DockerSandbox
from shared.strategy import BUILTIN_STRATEGIES, ComponentRef, compute_signals, load_component

SAMPLE = Path(__file__).resolve().parents[1] / "stratorch" / "sample" / "1h"
WARM_UP = 200  # rows of each frame before the first simulated bar

Candles = dict[str, tuple[pd.DataFrame, int]]


def sample_units(count: int) -> list[Candles]:
    """``count`` one-symbol units; the sample's 8 symbols, then again under new names."""
    frames = {path.stem: pd.read_parquet(path) for path in sorted(SAMPLE.glob("*.parquet"))}
    names = list(frames)
    units = []
    for i in range(count):
        base = names[i % len(names)]
        symbol = base if i < len(names) else f"{base[:-4]}{i}USDT"
        units.append({symbol: (frames[base], WARM_UP)})
    return units


def in_process(spec: dict[str, Any], units: list[Candles]) -> tuple[float, list[float]]:
    """Seconds of the same work in this process: describe, then each unit."""
    started = time.perf_counter()
    strategy = load_component(ComponentRef.from_json(spec), registry=BUILTIN_STRATEGIES)
    strategy.get_required_lookback()
    strategy.work_units([symbol for unit in units for symbol in unit])
    describe_s = time.perf_counter() - started
    unit_s = []
    for unit in units:
        started = time.perf_counter()
        for symbol, (frame, first) in unit.items():
            strategy = load_component(ComponentRef.from_json(spec), registry=BUILTIN_STRATEGIES)
            compute_signals(strategy, frame, first_sim=first, interval="1h", symbol=symbol)
        unit_s.append(time.perf_counter() - started)
    return describe_s, unit_s


async def timed(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def sequential(
    sandbox: Sandbox, code: ComponentRef, units: list[Candles], session: str | None
) -> tuple[float, list[float]]:
    """Seconds of describe, then of each unit, one call after another."""
    symbols = [symbol for unit in units for symbol in unit]
    describe_s = await timed(lambda: sandbox.describe(code, symbols, session=session))
    unit_s = []
    for unit in units:
        unit_s.append(
            await timed(lambda u=unit: sandbox.signals(code, u, interval="1h", session=session))
        )
    return describe_s, unit_s


async def backtest(
    sandbox: Sandbox, code: ComponentRef, units: list[Candles], parallel: int, session: str
) -> float:
    """Wall seconds of describe + every unit, ``parallel`` units at a time, as the services
    run a backtest."""
    symbols = [symbol for unit in units for symbol in unit]
    slots = asyncio.Semaphore(parallel)

    async def run(unit: Candles) -> None:
        async with slots:
            await sandbox.signals(code, unit, interval="1h", session=session)

    started = time.perf_counter()
    await sandbox.describe(code, symbols, session=session)
    await asyncio.gather(*(run(unit) for unit in units))
    return time.perf_counter() - started


def report(
    name: str, describe_s: float, unit_s: list[float], local: tuple[float, list[float]]
) -> None:
    """Print a run's describe and first-unit times and its overhead per later unit."""
    overhead = [s - base for s, base in zip(unit_s, local[1], strict=True)][1:] or [0.0]
    print(f"  {name}")
    print(f"    describe                 {describe_s * 1000:8.0f} ms")
    print(f"    first unit               {unit_s[0] * 1000:8.0f} ms")
    print(
        f"    overhead per unit        {statistics.median(overhead) * 1000:8.1f} ms median, "
        f"{max(overhead) * 1000:.1f} ms max (units 2..{len(unit_s)})"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--image", default=os.environ.get("STRATORCH_SANDBOX_IMAGE", "stratorch-sandbox:test")
    )
    parser.add_argument("--units", type=int, default=8, help="units of the cold/warm runs")
    parser.add_argument("--symbols", type=int, default=20, help="symbols of the backtest")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--strategy", default="sma_cross")
    parser.add_argument("--runtime", default=None, help="OCI runtime, e.g. runsc")
    args = parser.parse_args()

    spec = {"builtin": args.strategy}
    code = ComponentRef.from_json(spec)
    units = sample_units(args.units)
    local = in_process(spec, units)
    bars = sum(len(frame) for unit in units for frame, _ in unit.values())
    print(f"{args.strategy}: describe + {args.units} units of 1 symbol ({bars:,} bars in all)")
    print(
        f"  in this process: describe {local[0] * 1000:.1f} ms, "
        f"units {statistics.median(local[1]) * 1000:.1f} ms median"
    )

    async with DockerSandbox(image=args.image, runtime=args.runtime) as docker:
        cold = await sequential(docker, code, units, session=None)
        report("docker, a container per call (cold)", *cold, local)
        warm = await sequential(docker, code, units, session="bench-warm")
        report("docker, one warm container per backtest (session)", *warm, local)
    async with ProcessSandbox() as process:
        warm = await sequential(process, code, units, session="bench-warm")
        report("process sandbox, warm child (for comparison)", *warm, local)

    units = sample_units(args.symbols)
    local = in_process(spec, units)
    compute_s = local[0] + sum(local[1])
    ideal_s = local[0] + sum(local[1]) / args.parallel
    print(f"\nbacktest: {args.symbols} symbols, {args.parallel} units at a time, one session")
    print(
        f"  strategy work in this process {compute_s * 1000:8.0f} ms "
        f"({ideal_s * 1000:.0f} ms spread over {args.parallel} cores)"
    )
    for name, factory in (
        ("docker", lambda: DockerSandbox(image=args.image, runtime=args.runtime)),
        ("process", ProcessSandbox),
    ):
        async with factory() as sandbox:
            wall = await backtest(sandbox, code, units, args.parallel, session="bench-backtest")
        print(
            f"  {name:7} sandbox: wall {wall * 1000:8.0f} ms, "
            f"overhead {(wall - ideal_s) * 1000:8.0f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
