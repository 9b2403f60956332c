"""A parameter sweep on the stack beside ``stratorch run``: wall times and whether the two
rank the combinations identically.

The sweep is ``sma_cross`` on the bundled real sample (1h bars, the month the integration
tests use), a 3-parameter grid: ``fast`` × ``slow`` × ``sl_pct``, 5 × 5 × 4 = 100
combinations on all 8 symbols (``--quick``: 2 × 2 × 2 on 2 symbols). The stack runs it with
one symbol worker, then with two (another ``initial_cash`` each time, so no child is a
cache hit); ``stratorch run`` (process sandbox, whole process) runs the two-worker request,
whose ranking must equal the stack's bit for bit. Planning is the time to the sweep's
``planned`` event: the scheduler describes each combination in the sandbox and fingerprints
its candles (slow on this machine's FerretDB, which scans a collection per query).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aio_pika

from benchmarks.compare import STRATORCH, child_env
from benchmarks.procs import timed
from benchmarks.report import Figure, ratio
from benchmarks.stack import running_stack, timed_backtest
from tests.integration import client
from tests.integration.conftest import WINDOW
from tests.integration.stack import ServersUnavailable, load_sample

FULL_GRID = {
    "fast": [3, 5, 8, 10, 13],
    "slow": [20, 30, 40, 50, 60],
    "sl_pct": [0.01, 0.015, 0.02, 0.03],
}
QUICK_GRID = {"fast": [5, 10], "slow": [30, 50], "sl_pct": [0.015, 0.03]}


def sweep_section(quick: bool, work: Path) -> list[Figure]:
    grid = QUICK_GRID if quick else FULL_GRID
    symbols = client.ALL_SYMBOLS[:2] if quick else client.ALL_SYMBOLS
    combos = len(grid["fast"]) * len(grid["slow"]) * len(grid["sl_pct"])
    shape = f"{combos} combinations × {len(symbols)} symbols"

    def request(cash: float) -> dict[str, Any]:
        return client.request(symbols=symbols, initial_cash=cash, sweep={"grid": grid})

    try:
        with running_stack(work / "sweep-logs", workers=1) as (stack, amqp_url, mongo, db):
            asyncio.run(load_sample(mongo, db, **WINDOW))
            one = asyncio.run(_on_stack(amqp_url, request(10_001)))
            stack.start("symbol_worker", STRATORCH_CONCURRENCY="1")
            stack.wait_ready()
            wanted = request(10_000)
            two = asyncio.run(_on_stack(amqp_url, wanted))
    except ServersUnavailable as exc:
        return [Figure("sweep on the stack", f"skipped: servers not up ({exc})")]
    spec, out = work / "sweep.request.json", work / "sweep.result.json"
    spec.write_text(json.dumps(wanted))
    embedded = timed(
        [STRATORCH, "run", str(spec), "--quiet", "--out", str(out)], env=child_env()
    ).seconds
    want = json.loads(out.read_text())["sweep"]["ranking"]
    got = two["result"]["sweep"]["ranking"]
    same = got == want
    return [
        Figure(f"sweep, {shape}: stratorch run (whole process)", f"{embedded:.1f} s"),
        _stack_figure(shape, 1, one),
        _stack_figure(shape, 2, two),
        Figure("sweep on the stack, 2 symbol workers vs 1", ratio(two["total_s"], one["total_s"])),
        Figure("sweep on the stack (2 workers) vs stratorch run", ratio(two["total_s"], embedded)),
        Figure(
            "sweep rankings, the stack vs stratorch run",
            "identical" if same else "DIFFER",
            "identical",
            same,
        ),
    ]


def _stack_figure(shape: str, workers: int, run: dict[str, Any]) -> Figure:
    return Figure(
        f"sweep, {shape}: the stack, {workers} symbol worker(s), publish → result",
        f"{run['total_s']:.1f} s (planning {run['total_s'] - run['units_s']:.1f} s)",
    )


async def _on_stack(amqp_url: str, request: dict[str, Any]) -> dict[str, Any]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        return await timed_backtest(connection, request)
