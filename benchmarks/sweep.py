"""A parameter sweep on the stack beside ``stratorch run``: wall times, how they grow with
symbol workers, and whether the two rank the combinations identically.

The sweep is ``sma_cross`` on the bundled real sample (1h bars, the month the integration
tests use), a 3-parameter grid. The full one is ``fast`` × ``slow`` × ``sl_pct``, 5 × 5 × 4
= 100 combinations on all 8 symbols: 800 units, run on the stack with two symbol workers and
through ``stratorch run`` (process sandbox, whole process), whose rankings must be equal bit
for bit. How the stack grows with workers is measured on a small sweep (2 × 2 × 2 on 2
symbols) with one worker, then two; ``--quick`` runs only that, and compares its ranking.
Every run has another ``initial_cash``, so no combination is a cache hit. Planning is the
time to the sweep's ``planned`` event: the scheduler describes each combination in the
sandbox and fingerprints its candles.
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

FULL = (
    {"fast": [3, 5, 8, 10, 13], "slow": [20, 30, 40, 50, 60], "sl_pct": [0.01, 0.015, 0.02, 0.03]},
    client.ALL_SYMBOLS,
)
SMALL = ({"fast": [5, 10], "slow": [30, 50], "sl_pct": [0.015, 0.03]}, client.ALL_SYMBOLS[:2])


def sweep_section(quick: bool, work: Path) -> list[Figure]:
    try:
        with running_stack(work / "sweep-logs", workers=1) as (stack, amqp_url, mongo, db):
            asyncio.run(load_sample(mongo, db, **WINDOW))
            one = asyncio.run(_on_stack(amqp_url, _request(*SMALL, cash=10_001)))
            stack.start("symbol_worker", STRATORCH_CONCURRENCY="1")
            stack.wait_ready()
            two = asyncio.run(_on_stack(amqp_url, _request(*SMALL, cash=10_002)))
            compared = _request(*(SMALL if quick else FULL), cash=10_000)
            got = asyncio.run(_on_stack(amqp_url, compared))
    except ServersUnavailable as exc:
        return [Figure("sweep on the stack", f"skipped: servers not up ({exc})")]
    spec, out = work / "sweep.request.json", work / "sweep.result.json"
    spec.write_text(json.dumps(compared))
    embedded = timed(
        [STRATORCH, "run", str(spec), "--quiet", "--out", str(out)], env=child_env()
    ).seconds
    same = got["result"]["sweep"]["ranking"] == json.loads(out.read_text())["sweep"]["ranking"]
    shape = _shape(compared)
    return [
        _stack_figure(_shape(_request(*SMALL, cash=1)), 1, one),
        _stack_figure(_shape(_request(*SMALL, cash=1)), 2, two),
        Figure(
            "the small sweep, 2 symbol workers vs 1 (time)", ratio(two["total_s"], one["total_s"])
        ),
        _stack_figure(shape, 2, got),
        Figure(f"sweep, {shape}: stratorch run (whole process)", f"{embedded:.1f} s"),
        Figure(
            f"sweep, {shape}: the stack (2 workers) vs stratorch run",
            ratio(got["total_s"], embedded),
        ),
        Figure(
            f"sweep, {shape}: rankings, the stack vs stratorch run",
            "identical" if same else "DIFFER",
            "identical",
            same,
        ),
    ]


def _request(grid: dict[str, list[Any]], symbols: list[str], *, cash: float) -> dict[str, Any]:
    return client.request(symbols=symbols, initial_cash=cash, sweep={"grid": grid})


def _shape(request: dict[str, Any]) -> str:
    combos = 1
    for values in request["sweep"]["grid"].values():
        combos *= len(values)
    return f"{combos} combinations × {len(request['symbols'])} symbols"


def _stack_figure(shape: str, workers: int, run: dict[str, Any]) -> Figure:
    return Figure(
        f"sweep, {shape}: the stack, {workers} symbol worker(s), publish → result",
        f"{run['total_s']:.1f} s (planning {run['total_s'] - run['units_s']:.1f} s)",
    )


async def _on_stack(amqp_url: str, request: dict[str, Any]) -> dict[str, Any]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        return await timed_backtest(connection, request, timeout_s=4 * 3600)
