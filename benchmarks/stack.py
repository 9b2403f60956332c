"""Time backtests through the real broker: latency of a small one, throughput of work units.

Starts its own throwaway stack on this machine's servers (``scripts/services-up.sh``): a fresh
RabbitMQ vhost, a fresh Mongo database, the services as OS processes with the process sandbox
(see ``tests/integration/stack.py``), and removes it all afterwards. Run:

    .venv/bin/python benchmarks/stack.py                       # defaults below
    .venv/bin/python benchmarks/stack.py --workers 2 --symbols 40 --days 7 --repeat 5

The Mongo server of this machine is FerretDB on SQLite, which scans a whole collection for
every candle query (no index use but on ``_id``): candle loads and fingerprints cost seconds
here where MongoDB answers from its indexes in milliseconds, so both numbers are dominated by
it. Keep the data small (the defaults) or the run takes many minutes.

What is measured:

- **latency**: publish → result of a 4-symbol ``sma_cross`` backtest on the bundled real
  sample (1h bars, 2021-05-01 to 2021-06-01, as the integration tests), each run with a
  different ``initial_cash`` so none is a cache hit. Includes planning (the scheduler asks
  the sandbox for the strategy's lookback and units and Mongo for the data's fingerprints),
  one sandbox process per unit, the replay and every broker hop.
- **throughput**: work units per second from the ``planned`` event to the result, for one
  backtest of ``--symbols`` SYNTHETIC symbols (a seeded random walk, clearly not market data)
  of a cheap strategy over ``--days`` of 1h bars. A unit's cost here is mostly the sandbox
  process start, so this is the broker + worker overhead per unit, the ceiling for small units.
  The services' own logs give the breakdown: time in the handlers vs. the rest (broker hops,
  idle workers).
- **broker alone**: ``RabbitBus`` round trips on this broker (1 KiB messages, persistent,
  publisher confirms, manual acks): confirmed publishes per second one at a time, and
  publish → consume → ack per second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare import STRATORCH, child_env
from benchmarks.procs import timed
from benchmarks.report import Figure, ratio
from benchmarks.synthetic import T0, synthetic
from tests.integration import client, load
from tests.integration.conftest import WINDOW
from tests.integration.stack import (
    ServersUnavailable,
    Stack,
    create_vhost,
    delete_vhost,
    drop_database,
    load_sample,
    servers_up,
)

HOUR = 3_600_000


async def load_synthetic(mongo_url: str, db_name: str, symbols: list[str], bars: int) -> None:
    from shared import mongo

    connection = await mongo.connect(mongo_url)
    try:
        db = connection[db_name]
        for i, symbol in enumerate(symbols):
            candles = synthetic(
                bars, seed=i, step_ms=HOUR, sigma=0.004, spread=0.002, volume=(10, 1000)
            )
            await mongo.write_chunks(db, symbol, "1h", candles)
    finally:
        await connection.close()


async def timed_backtest(
    connection: aio_pika.abc.AbstractConnection, request: dict[str, Any], timeout_s: float = 900
) -> dict[str, Any]:
    """Seconds from publish to result, and from the ``planned`` event to the result; the
    result."""
    channel = await connection.channel()
    try:
        inbox = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await inbox.bind(client.RESULTS, routing_key=request["id"])
        await inbox.bind("backtest.events", routing_key=request["id"])
        started = time.perf_counter()
        await client.publish(channel, json.dumps(request).encode(), correlation_id=request["id"])
        planned = started
        units = 0
        async with asyncio.timeout(timeout_s), inbox.iterator() as messages:
            async for message in messages:
                await message.ack()
                body = json.loads(message.body)
                if body.get("type") == "planned":
                    planned, units = time.perf_counter(), body["unit_count"]
                elif "status" in body and "type" not in body:
                    if body["status"] != "completed":
                        raise RuntimeError(f"backtest {body['status']}: {body['errors']}")
                    break
        done = time.perf_counter()
        return {
            "total_s": done - started,
            "units_s": done - planned,
            "units": units,
            "result": body,
        }
    finally:
        await channel.close()


async def measure(args: argparse.Namespace, amqp_url: str, stack: Stack) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await timed_backtest(connection, client.request(initial_cash=1_000))  # warm-up
        latencies = []
        for i in range(args.repeat):
            request = client.request(initial_cash=10_000 + i)
            run = await timed_backtest(connection, request)
            latencies.append(run["total_s"])
        print(
            f"latency, 4-symbol sma_cross (1 month of 1h bars), {args.repeat} runs:"
            f" median {statistics.median(latencies) * 1000:.0f} ms,"
            f" min {min(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
        )
        print("  last run:", breakdown(stack, request["id"]))
        symbols = [f"SYN{i:03d}USDT" for i in range(args.symbols)]
        request = client.request(
            symbols=symbols,
            strategy={"builtin": "sma_cross", "params": {"fast": 5, "slow": 20}},
            start="2021-01-03",
            end=pd.Timestamp(T0 + args.days * 24 * HOUR, unit="ms").strftime("%Y-%m-%d"),
            portfolio={"builtin": "fixed_fraction", "params": {"fraction": 0.05}},
        )
        run = await timed_backtest(connection, request)
        print(
            f"throughput, {run['units']:.0f} units of {args.days} days of 1h bars:"
            f" {run['units'] / run['units_s']:.2f} units/s with {args.workers} symbol_worker(s)"
            f" ({run['units_s']:.2f} s planned → result, {run['total_s']:.2f} s end to end)"
        )
        print("  ", breakdown(stack, request["id"]))
        busy = sum(
            r["elapsed_s"]
            for w in stack.of("symbol_worker")
            for r in w.logged("handled")
            if r.get("backtest_id") == request["id"]
        )
        idle = args.workers * args.concurrency * run["units_s"] - busy
        print(
            f"   outside the handlers (broker hops, waiting, the replay): {idle:.2f} worker-s,"
            f" {idle / max(run['units'], 1) * 1000:.0f} ms per unit"
        )
    await broker_alone(amqp_url)


def breakdown(stack: Stack, backtest_id: str) -> str:
    """Seconds each service spent handling ``backtest_id``'s messages (from their logs)."""
    spent: dict[str, list[float]] = {}
    for service in stack.services:
        for record in service.logged("handled"):
            if record.get("backtest_id") == backtest_id:
                spent.setdefault(service.name, []).append(record["elapsed_s"])
    units = spent.get("symbol_worker", [])
    return (
        f"scheduler {sum(spent.get('scheduler', [])):.2f} s;"
        f" symbol_worker {len(units)} units, {statistics.mean(units or [0]):.2f} s each"
        f" (max {max(units or [0]):.2f});"
        f" portfolio_sim {sum(spent.get('portfolio_sim', [])):.2f} s in all"
    )


async def broker_alone(amqp_url: str, n: int = 1000) -> None:
    from shared import topology
    from shared.broker import RabbitBus

    body = b"x" * 1024
    async with RabbitBus(amqp_url, prefetch=50, name="benchmark") as bus:
        queue = await bus.bind_temporary(topology.EVENTS, "benchmark")
        started = time.perf_counter()
        for i in range(n):
            await bus.publish(
                topology.EVENTS, "benchmark", body, message_id=str(i), correlation_id="b"
            )
        published = time.perf_counter() - started
        started = time.perf_counter()
        got = 0
        async with contextlib.aclosing(bus.consume(queue)) as deliveries:
            async for delivery in deliveries:
                await delivery.ack()
                got += 1
                if got == n:
                    break
        consumed = time.perf_counter() - started
        await bus.delete_temporary(queue)
    print(
        f"broker alone: {n / published:.0f} confirmed publishes/s one at a time"
        f" ({published / n * 1000:.2f} ms each); {n / consumed:.0f} deliveries/s consumed and"
        " acked (prefetch 50)"
    )


@contextlib.contextmanager
def running_stack(
    log_dir: Path, *, workers: int, concurrency: int = 1, gateway: bool = False
) -> Iterator[tuple[Stack, str, str, str]]:
    """A throwaway stack on this machine's servers, running: a fresh vhost and database,
    the scheduler, ``workers`` symbol workers, portfolio_sim (and the gateway); yields it with
    its AMQP URL, the Mongo URL and the database (load candles there), and removes it all
    afterwards (dumping the services' logs if the block failed).

    :raises ServersUnavailable: RabbitMQ or the Mongo server could not be brought up.
    """
    servers = servers_up(timeout_s=120)
    vhost, amqp_url = create_vhost(servers.amqp_url, prefix="stratorch-bench")
    db = f"stratorch_bench_{uuid.uuid4().hex[:8]}"
    stack = Stack.configure(
        amqp_url=amqp_url,
        mongo_url=servers.mongo_url,
        candles_mongo_url=servers.candles_mongo_url,
        db=db,
        log_dir=log_dir,
    )
    try:
        stack.start("scheduler")
        for _ in range(workers):
            stack.start("symbol_worker", STRATORCH_CONCURRENCY=str(concurrency))
        stack.start("portfolio_sim")
        if gateway:
            stack.start_gateway()
        stack.wait_ready()
        yield stack, amqp_url, servers.mongo_url, db
    except BaseException:
        print(stack.dump(), file=sys.stderr)
        raise
    finally:
        stack.stop()
        delete_vhost(vhost)
        asyncio.run(drop_database(servers.mongo_url, db))


def end_to_end(backtests: int, timeout_s: float, work: Path) -> list[Figure]:
    """The suite's stack rows: throughput with one symbol worker, then two (a few backtests
    at once each); with two, a cold 2-symbol request (publish → result) beside ``stratorch
    run`` of it, the same request again (a cache hit), once :data:`HISTORY` more backtests'
    records are stored (:func:`store_history`) :data:`COLD` cold requests beside as many
    before (medians), and ``backtests`` such requests POSTed at once to the gateway. The
    process sandbox; every request distinct (no cache hits but the one meant)."""
    try:
        with running_stack(work / "logs", workers=1, gateway=True) as (stack, amqp_url, mongo, db):
            asyncio.run(load_sample(mongo, db, **WINDOW))
            measured = _end_to_end(amqp_url, stack, backtests, timeout_s, work, (mongo, db))
            return asyncio.run(measured)
    except ServersUnavailable as exc:
        return [Figure("the stack", f"skipped: servers not up ({str(exc).splitlines()[0]})")]


async def _end_to_end(
    amqp_url: str,
    stack: Stack,
    backtests: int,
    timeout_s: float,
    work: Path,
    database: tuple[str, str],
) -> list[Figure]:
    small = max(2, backtests // 10)
    requests = load.requests(2 * COLD + 2 * small + backtests, prefix="bench")
    request, before, after, one, two, burst = (
        requests[0],
        requests[1:COLD],
        requests[COLD : 2 * COLD],
        requests[2 * COLD : 2 * COLD + small],
        requests[2 * COLD + small : 2 * COLD + 2 * small],
        requests[2 * COLD + 2 * small :],
    )
    shape = "2 symbols × 1 month of 1h bars"
    figures, per_minute = [], []
    for workers, batch in ((1, one), (2, two)):
        if workers == 2:
            stack.start("symbol_worker", STRATORCH_CONCURRENCY="1")
            stack.wait_ready()
        seconds, done = await _burst(stack, amqp_url, batch, timeout_s / 3)
        # Units, not backtests: under a slow Mongo server a capped wait may end none.
        ids = {r["id"] for r in batch}
        units = sum(
            r.get("backtest_id") in ids
            for worker in stack.of("symbol_worker")
            for r in worker.logged("handled")
        )
        per_minute.append(units / seconds * 60)
        scaling = f" ({ratio(per_minute[1], per_minute[0])} one worker)" if workers == 2 else ""
        figures.append(
            Figure(
                f"stack, {small} backtests at once, {workers} symbol worker(s)",
                f"{per_minute[-1]:.1f} units/min{scaling};"
                f" {done} of {small} done in {seconds:.0f} s",
            )
        )

    spec = work / "cold.request.json"
    spec.write_text(json.dumps(request))
    embedded = timed([STRATORCH, "run", str(spec), "--quiet"], env=child_env()).seconds
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        cold = (await timed_backtest(connection, request))["total_s"]
        hit = (await timed_backtest(connection, {**request, "id": f"{request['id']}-again"}))[
            "total_s"
        ]
    figures += [
        Figure(f"stack, cold, {shape}: publish → result", f"{cold:.2f} s"),
        Figure("stratorch run of the same request (whole process)", f"{embedded:.2f} s"),
        Figure(
            "stack cold vs stratorch run", ratio(cold, embedded), "≤ 1.5×", cold <= 1.5 * embedded
        ),
        Figure("stack, the same request again (cache hit)", f"{hit:.2f} s", "≤ 0.3 s", hit <= 0.3),
    ]

    # Before the burst, whose unfinished backtests (a capped wait) would hold up these. A
    # median of a few on each side: one backtest of ~0.2 s on a shared machine is noisy.
    firsts = [cold, *await _one_by_one(amqp_url, before)]
    stored = await store_history(*database, template=request["id"], copies=HISTORY)
    first, nth = statistics.median(firsts), statistics.median(await _one_by_one(amqp_url, after))
    figures.append(
        Figure(
            f"stack: a cold backtest after {HISTORY:,} more stored ({stored:,} documents),"
            f" median of {COLD}",
            f"{nth:.2f} s ({ratio(nth, first)} the first ones', {first:.2f} s)",
            "the same (≤ 1.25×)",
            nth <= 1.25 * first,
        )
    )

    seconds, done = await _burst(stack, amqp_url, burst, timeout_s)
    figures.append(
        Figure(
            f"stack, {backtests} such backtests at once, 2 symbol workers",
            f"{seconds:.1f} s"
            if done == backtests
            else f"{done} of {backtests} done after {seconds:.0f} s (stopped)",
            "≤ 60 s for 30",
            done == backtests and seconds <= 60 if backtests == 30 else None,
        )
    )
    return figures


async def _one_by_one(amqp_url: str, requests: list[dict[str, Any]]) -> list[float]:
    """Seconds publish → result of each request, one at a time, each after a pause: a symbol
    worker starts its next sandbox interpreter when one is taken (~0.4 s of CPU), and a
    request sent at once would wait for it (the cold row above had a pause before it)."""
    seconds = []
    async with await aio_pika.connect(amqp_url) as connection:
        for request in requests:
            await asyncio.sleep(2)
            seconds.append((await timed_backtest(connection, request))["total_s"])
    return seconds


#: Backtests' worth of state stored before the last cold backtests are timed.
HISTORY = 1_000
#: Cold backtests timed before, and after, the history is stored (their median is compared).
COLD = 5


async def store_history(mongo_url: str, db_name: str, *, template: str, copies: int) -> int:
    """Store ``copies`` backtests' worth of state records, cheaply: every document of backtest
    ``template`` (what a completed backtest leaves: its accepted id, result and cached result,
    and their body chunks; its plan, batches, lease and WAL went with its result) copied under
    new ids with ``insert_many``, so each collection holds what ``copies`` more finished
    backtests would (the bodies are the template's, not renamed: only their number and size
    matter here). The number of documents written."""
    from bson import ObjectId

    from shared import mongo

    def renamed(value: Any, copy: str, ids: dict[ObjectId, ObjectId]) -> Any:
        if isinstance(value, str):
            return value.replace(template, copy)
        if isinstance(value, ObjectId):
            return ids.setdefault(value, ObjectId())
        if isinstance(value, list):
            return [renamed(v, copy, ids) for v in value]
        if isinstance(value, dict):
            return {k: renamed(v, copy, ids) for k, v in value.items()}
        return value

    def mentions(value: Any) -> bool:
        """Whether a document is the template's: it names it, or a record of it (a batch's
        ``<id>/<unit>``); not another backtest whose id starts the same (``<id>-again``)."""
        if isinstance(value, str):
            return value == template or value.startswith(f"{template}/")
        if isinstance(value, list):
            return any(mentions(v) for v in value)
        if isinstance(value, dict):
            return any(mentions(v) for v in value.values())
        return False

    connection = await mongo.connect(mongo_url)
    try:
        db = connection[db_name]
        originals: dict[str, list[dict[str, Any]]] = {}
        for name in ["accepted", *mongo.EXPIRING]:
            docs = [d async for d in db[name].find() if mentions(d)]
            chunk_ids = [c for d in docs for c in d.get("body", {}).get("chunks", [])]
            originals[name] = docs
            if chunk_ids:
                chunks = f"{name}.chunks"
                originals[chunks] = [await db[chunks].find_one({"_id": c}) for c in chunk_ids]
        written = 0
        # Per copy: each ObjectId (a chunk's) and its copy's, alike in a record and its chunk.
        ids_of: list[dict[ObjectId, ObjectId]] = [{} for _ in range(copies)]
        for name, docs in originals.items():
            new = []
            for i, ids in enumerate(ids_of):
                copy = f"{template}-h{i:05d}"
                for doc in docs:
                    if isinstance(doc["_id"], str) and template not in doc["_id"]:
                        # A cached result's key holds no backtest id: the copy's is numbered.
                        new.append({**renamed(doc, copy, ids), "_id": f"{doc['_id']}-h{i:05d}"})
                    else:
                        new.append(renamed(doc, copy, ids))
            for start in range(0, len(new), 5_000):
                await db[name].insert_many(new[start : start + 5_000])
            written += len(new)
        return written
    finally:
        await connection.close()


async def _burst(
    stack: Stack, amqp_url: str, batch: list[dict[str, Any]], timeout_s: float
) -> tuple[float, int]:
    """POST ``batch`` at once to the gateway; seconds until the last result (or until
    ``timeout_s``, when some are still missing) and how many results came."""
    done = 0

    def count(n: int) -> None:
        nonlocal done
        done = n

    assert stack.gateway_url is not None
    started = time.perf_counter()
    ids = await load.submit(stack.gateway_url, batch)
    with contextlib.suppress(TimeoutError):
        await load.collect(amqp_url, ids, timeout_s=timeout_s, on_result=count)
    return time.perf_counter() - started, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--concurrency", type=int, default=1, help="units per worker at once")
    parser.add_argument("--symbols", type=int, default=40)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="stratorch-bench-") as logs,
        running_stack(Path(logs), workers=args.workers, concurrency=args.concurrency) as (
            stack,
            amqp_url,
            mongo_url,
            db,
        ),
    ):
        started = time.perf_counter()
        asyncio.run(load_sample(mongo_url, db, client.REQUEST["symbols"], **WINDOW))
        symbols = [f"SYN{i:03d}USDT" for i in range(args.symbols)]
        asyncio.run(load_synthetic(mongo_url, db, symbols, args.days * 24 + 48))
        print(f"candles loaded in {time.perf_counter() - started:.1f} s")
        asyncio.run(measure(args, amqp_url, stack))
    return 0


if __name__ == "__main__":
    sys.exit(main())
