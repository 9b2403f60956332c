"""Load: many backtests submitted at once through the gateway, on the real stack.

Starts its own throwaway stack on this machine's servers (``scripts/services-up.sh``): a fresh
RabbitMQ vhost, a fresh Mongo database holding the month of the bundled sample the integration
tests use (all 8 symbols), and the services as OS processes with the process sandbox (see
``tests/integration/stack.py``); removes it all afterwards. Run:

    .venv/bin/python benchmarks/load.py                    # 200 backtests, 2 symbol workers
    .venv/bin/python benchmarks/load.py --backtests 50 --workers 4

Each backtest is ``sma_cross`` on 2 symbols, 1h bars, 2021-05-01 to 2021-06-01, with its own
params (``fast``, ``slow``), so none is a cache hit. All are POSTed to the gateway at once; the
benchmark then reads their results from ``backtest.results.all`` (as an operator's consumer).

What it prints:

- **wall time** from the first POST to the last result, and **backtests per minute**;
- **peak RSS** of each service process (``VmHWM``), and the peak total RSS of their sandbox
  children (sampled every second);
- **queue depths** of every queue of the vhost at the end (ready, unacknowledged): all zero
  when nothing was left behind;
- **identical results**: every result compared with ``stratorch run``'s for the same request
  (run afterwards, in this process, on the bundled Parquet sample; not timed).

The Mongo server of this machine is FerretDB on SQLite, which scans a whole collection for
every candle query: candle loads and fingerprints cost far more here than on MongoDB, and
dominate the time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.procs import descendants, rss
from benchmarks.stack import running_stack
from tests.integration import client, load
from tests.integration.conftest import WINDOW
from tests.integration.stack import Stack, load_sample

MiB = 1024 * 1024


class ChildrenRss:
    """Samples, every second, the total RSS of each service's descendants (its sandboxes)."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChildrenRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for service in self._stack.services:
                key = f"{service.name}[{service.pid}]"
                total = sum(rss(pid) for pid in descendants(service.pid))
                self.peak[key] = max(self.peak.get(key, 0), total)


def reference(request: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """``stratorch run``'s result for ``request``, as the JSON document the broker carries."""
    from stratorch.cli import main

    path, out = workdir / f"{request['id']}.json", workdir / f"{request['id']}.result.json"
    path.write_text(json.dumps(request))
    main(["run", str(path), "--out", str(out), "--quiet"])
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def measure(args: argparse.Namespace, amqp_url: str, stack: Stack, workdir: Path) -> bool:
    assert stack.gateway_url is not None
    batch = load.requests(args.backtests, prefix="bench")
    with ChildrenRss(stack) as children:
        started = time.perf_counter()
        ids = asyncio.run(load.submit(stack.gateway_url, batch))
        submitted = time.perf_counter() - started

        def progress(done: int) -> None:
            if done % 10 == 0:
                print(f"  {done} results after {time.perf_counter() - started:.0f} s", flush=True)

        results = asyncio.run(
            load.collect(amqp_url, ids, timeout_s=args.timeout, on_result=progress)
        )
        wall = time.perf_counter() - started
    depths = load.settled_queues(amqp_url)
    peaks = {f"{s.name}[{s.pid}]": load.peak_rss(s.pid) for s in stack.services}

    statuses: dict[str, int] = {}
    for result in results.values():
        statuses[result["status"]] = statuses.get(result["status"], 0) + 1
    print(
        f"{len(results)} backtests (2 symbols each, 1 month of 1h bars) with {args.workers}"
        f" symbol_worker(s): wall {wall:.1f} s (all {len(ids)} POSTed in {submitted:.1f} s),"
        f" {len(results) / wall * 60:.1f} backtests/min; statuses {statuses}"
    )
    print("peak RSS (service process; its sandbox children, sampled):")
    for key, peak in peaks.items():
        sandboxes = children.peak.get(key, 0) / MiB
        print(f"  {key:28} {peak / MiB:7.1f} MiB; children {sandboxes:7.1f} MiB")
    print("queues at the end (ready, unacked):", depths)

    started = time.perf_counter()
    differ = [
        r["id"]
        for r in batch
        if client.comparable(results[r["id"]]) != client.comparable(reference(r, workdir))
    ]
    print(
        f"identical to stratorch run: {len(batch) - len(differ)}/{len(batch)}"
        f" (references computed in {time.perf_counter() - started:.1f} s)"
        + (f"; DIFFERENT: {differ}" if differ else "")
    )
    empty = not any(ready or unacked for ready, unacked in depths.values())
    return not differ and empty and statuses == {"completed": len(batch)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backtests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="symbol_worker processes")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for all results")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="stratorch-load-") as tmp,
        running_stack(Path(tmp) / "logs", workers=args.workers, gateway=True) as (
            stack,
            amqp_url,
            mongo_url,
            db,
        ),
    ):
        asyncio.run(load_sample(mongo_url, db, **WINDOW))
        ok = measure(args, amqp_url, stack, Path(tmp))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
