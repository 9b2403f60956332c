"""Many backtests at once through the gateway, as a user would submit them: what the load test
(``test_load.py``) and ``benchmarks/load.py`` share.

- :func:`requests` makes distinct requests (2 symbols each, different strategy params, so
  none is a cache hit of another);
- :func:`submit` POSTs them all at once to the gateway;
- :func:`collect` reads their results from the durable ``backtest.results.all`` queue (the
  operator's consumer: it drains that queue, results of other backtests included);
- :func:`queue_depths` and :func:`settled_queues` say what is left in the vhost's queues;
- :func:`peak_rss` is a process's peak resident set size.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import httpx

from shared import topology
from tests.integration import client

#: Symbol pairs the requests take in turn.
PAIRS = [client.ALL_SYMBOLS[i : i + 2] for i in range(0, len(client.ALL_SYMBOLS), 2)]


def requests(n: int, *, prefix: str = "load") -> list[dict[str, Any]]:
    """``n`` distinct requests: ``sma_cross`` with ``fast`` 5-14 and ``slow`` from 30 up
    (unique up to 10 x 170), each on one of :data:`PAIRS`, over the tests' month."""
    return [
        client.request(
            id=f"{prefix}-{i:04d}-{uuid.uuid4().hex[:8]}",
            symbols=PAIRS[i % len(PAIRS)],
            strategy={
                "builtin": "sma_cross",
                "params": {"fast": 5 + i % 10, "slow": 30 + i // 10, "tp_pct": 0.03},
            },
        )
        for i in range(n)
    ]


async def submit(gateway_url: str, batch: list[dict[str, Any]]) -> list[str]:
    """POST every request at once; the ids the gateway accepted (202), in order."""
    limits = httpx.Limits(max_connections=len(batch))
    async with httpx.AsyncClient(
        base_url=gateway_url, timeout=120, trust_env=False, limits=limits
    ) as http:
        answers = await asyncio.gather(*(http.post("/backtests", json=r) for r in batch))
    for answer in answers:
        if answer.status_code != 202:
            raise AssertionError(f"POST /backtests answered {answer.status_code}: {answer.text}")
    return [str(answer.json()["id"]) for answer in answers]


async def collect(
    amqp_url: str,
    ids: list[str],
    *,
    timeout_s: float,
    on_result: Callable[[int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The results of ``ids``, read (and acked) from the ``backtest.results.all`` queue;
    ``on_result`` is called with the count so far after each."""
    wanted = set(ids)
    got: dict[str, dict[str, Any]] = {}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=50)
        queue = await channel.declare_queue(topology.RESULTS_QUEUE, passive=True)
        async with asyncio.timeout(timeout_s), queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                body = json.loads(message.body)
                if body["backtest_id"] in wanted:
                    got[body["backtest_id"]] = body
                    if on_result is not None:
                        on_result(len(got))
                    if len(got) == len(wanted):
                        break
    return got


def _vhost(amqp_url: str) -> str:
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def queue_depths(amqp_url: str) -> dict[str, tuple[int, int]]:
    """Every queue of the URL's vhost: ``{name: (ready, unacknowledged)}``."""
    out = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_queues",
            "-p",
            _vhost(amqp_url),
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "--formatter=json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {
        row["name"]: (int(row["messages_ready"]), int(row["messages_unacknowledged"]))
        for row in json.loads(out.stdout)
    }


def settled_queues(amqp_url: str, *, timeout_s: float = 30) -> dict[str, tuple[int, int]]:
    """:func:`queue_depths` once every queue is empty, or as they are after ``timeout_s`` (a
    service acks its delivery a moment after publishing what it produced). Deadline timers'
    hold queues do not count: a timer waits there until due, however its backtest ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        depths = queue_depths(amqp_url)
        working = {q: d for q, d in depths.items() if not q.startswith(f"{topology.TIMERS}.")}
        if not any(ready or unacked for ready, unacked in working.values()):
            return depths
        if time.monotonic() > deadline:
            return depths
        time.sleep(1)


def peak_rss(pid: int) -> int:
    """The peak resident set size of process ``pid`` so far, in bytes (``VmHWM``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")
