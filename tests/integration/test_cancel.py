"""Cancellation and deadlines on the real stack: RabbitMQ, the Mongo wire-protocol server and
Docker sandboxes, driven as a user drives them (HTTP, or plain aio-pika and JSON).

Each test checks the result a user gets (``cancelled``, or ``failed`` with ``timeout``
errors naming the unfinished units, published on ``backtest.results``) and that no sandbox
container of the backtest is left (by their ``org.stratorch.sandbox.session`` label). The
times from the cancel or the deadline to the result are printed (``-s``), not asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import aio_pika
import aiodocker
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue

from shared.sandbox.docker import LABEL, OWNER_LABEL, SESSION_LABEL
from tests.integration import client
from tests.integration.conftest import make_stack, unavailable
from tests.integration.docker_support import DockerEnv, docker_up
from tests.integration.stack import Servers, ServersUnavailable, Stack, create_vhost, delete_vhost

pytestmark = pytest.mark.integration

#: Sleeps in its first ``decide`` call: a unit that is reliably still running.
SLOW = """
import time
from shared.strategy import BaseStrategy

class Slow(BaseStrategy):
    params = {"seconds": 120.0}

    def get_required_lookback(self):
        return 1

    def decide(self, df, interval, **kw):
        time.sleep(self.params["seconds"])
        return None
"""
CANCEL = "backtest.cancel"
EVENTS = "backtest.events"


def slow_request(**fields: Any) -> dict[str, Any]:
    return client.request(strategy={"source": SLOW, "class": "Slow"}, unit_timeout_s=300, **fields)


@pytest.fixture(scope="module")
def docker_env() -> DockerEnv:
    return docker_up()


@pytest.fixture(scope="module")
def docker_stack(
    servers: Servers,
    mongo_db: str,
    docker_env: DockerEnv,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The whole stack with Docker sandboxes, on a vhost of its own: two symbol workers
    taking one unit at a time, so of four units two run and two wait."""
    try:
        vhost, url = create_vhost(servers.amqp_url)
    except (ServersUnavailable, OSError) as exc:
        unavailable(f"cannot create a RabbitMQ vhost: {exc}")
    stack = make_stack(servers, url, mongo_db, tmp_path_factory.mktemp("cancel-logs"))
    docker = {
        "STRATORCH_SANDBOX": "docker",
        "STRATORCH_SANDBOX_IMAGE": docker_env.image,
        "DOCKER_HOST": docker_env.url,
    }
    stack.start("scheduler", **docker)
    stack.start("symbol_worker", STRATORCH_CONCURRENCY="1", **docker)
    stack.start("symbol_worker", STRATORCH_CONCURRENCY="1", **docker)
    stack.start("portfolio_sim")
    stack.start_gateway()
    try:
        stack.wait_ready(timeout_s=120)
        yield stack
    finally:
        stack.stop()
        delete_vhost(vhost)


@pytest.fixture
async def user(docker_stack: Stack) -> AsyncIterator[AbstractChannel]:
    """A plain aio-pika channel on the stack's vhost: what a user's client has."""
    connection: AbstractConnection = await aio_pika.connect(docker_stack.env["STRATORCH_AMQP_URL"])
    async with connection:
        yield await connection.channel()


@pytest.fixture
async def docker(docker_env: DockerEnv) -> AsyncIterator[aiodocker.Docker]:
    async with aiodocker.Docker(url=docker_env.url) as found:
        yield found


async def containers(docker: aiodocker.Docker, backtest_id: str) -> list[dict[str, Any]]:
    """The sandbox containers of one backtest (running or not)."""
    found = await docker.containers.list(
        all=True, filters={"label": [f"{LABEL}=1", f"{SESSION_LABEL}={backtest_id}"]}
    )
    return [{"id": c.id, "owner": c["Labels"][OWNER_LABEL]} for c in found]


async def in_workers(docker: aiodocker.Docker, stack: Stack, backtest_id: str) -> set[str]:
    """The ids of the backtest's containers that symbol workers created."""
    pids = {str(w.pid) for w in stack.of("symbol_worker")}
    found = await containers(docker, backtest_id)
    return {c["id"] for c in found if c["owner"].split(":")[1] in pids}


async def running_in_workers(
    docker: aiodocker.Docker, stack: Stack, backtest_id: str, count: int, timeout_s: float = 120
) -> set[str]:
    """Wait until ``count`` containers of the backtest run in symbol workers, then a little
    longer (so the strategy is inside ``decide``); their ids."""
    deadline = time.monotonic() + timeout_s
    while True:
        ours = await in_workers(docker, stack, backtest_id)
        if len(ours) >= count:
            await asyncio.sleep(2)
            return ours
        assert time.monotonic() < deadline, f"no unit started\n{stack.dump()}"
        await asyncio.sleep(0.1)


async def none_left(docker: aiodocker.Docker, backtest_id: str, timeout_s: float = 30) -> float:
    """Wait until no container of the backtest is left; how long that took."""
    started = time.perf_counter()
    while left := await containers(docker, backtest_id):
        assert time.perf_counter() - started < timeout_s, f"containers left: {left}"
        await asyncio.sleep(0.1)
    return time.perf_counter() - started


async def listen(channel: AbstractChannel, exchange: str, backtest_id: str) -> AbstractQueue:
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key=backtest_id)
    return queue


async def unit_events(
    queue: AbstractQueue, count: int, timeout_s: float = 60
) -> list[dict[str, Any]]:
    """The first ``count`` ``unit_done`` events (in one consumer: the queue is auto-deleted
    when its consumer goes)."""
    found: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            event = json.loads(message.body)
            if event["type"] == "unit_done":
                found.append(event)
                if len(found) == count:
                    break
    return found


async def deadline_of(stack: Stack, backtest_id: str) -> tuple[float, float]:
    """The backtest's absolute deadline and when its plan was stored (epoch seconds): the
    deadline timer starts then."""
    from shared import mongo

    connection = await mongo.connect(stack.env["STRATORCH_MONGO_URL"])
    try:
        db = connection[stack.env["STRATORCH_MONGO_DB"]]
        plan = await mongo.MongoStore(db).get_plan(backtest_id)
        doc = await db["plans"].find_one({"_id": backtest_id})
    finally:
        await connection.close()
    assert plan is not None and doc is not None
    stored = doc["stored_at"].replace(tzinfo=UTC).timestamp()
    return plan.deadline_ms / 1000, stored


async def publish_cancel(channel: AbstractChannel, backtest_id: str, reason: str) -> None:
    """What the README tells a user to publish to cancel a backtest."""
    body = json.dumps({"backtest_id": backtest_id, "reason": reason}).encode()
    await client.publish(
        channel, body, correlation_id=backtest_id, exchange_name=CANCEL, routing_key=backtest_id
    )


async def test_a_published_cancel_stops_running_sandboxes_and_skips_queued_units(
    docker_stack: Stack, user: AbstractChannel, docker: aiodocker.Docker
) -> None:
    request = slow_request()
    backtest_id = request["id"]
    results = await client.listen(user, backtest_id)
    events = await listen(user, EVENTS, backtest_id)
    await client.publish(user, json.dumps(request).encode(), correlation_id=backtest_id)
    ran = await running_in_workers(docker, docker_stack, backtest_id, 2)

    async def watch() -> None:  # every worker container the backtest ever gets
        while True:
            ran.update(await in_workers(docker, docker_stack, backtest_id))
            await asyncio.sleep(0.05)

    watching = asyncio.create_task(watch())
    cancelled_at = time.perf_counter()
    await publish_cancel(user, backtest_id, "wrong parameters")
    result = await client.next_body(results, 60)
    to_result = time.perf_counter() - cancelled_at
    to_clean = await none_left(docker, backtest_id)

    assert result["backtest_id"] == backtest_id
    assert result["status"] == "cancelled", (result["errors"], docker_stack.dump())
    [error] = result["errors"]
    assert error["kind"] == "cancelled" and "wrong parameters" in error["message"]
    # All four units ended cancelled: the two running stopped, the two queued skipped (never
    # run: no worker container beyond the first two was ever created for this backtest).
    units = await unit_events(events, 4)
    watching.cancel()
    assert sorted(e["unit_id"] for e in units) == ["u0000", "u0001", "u0002", "u0003"]
    assert all("cancelled" in e["message"] for e in units), [e["message"] for e in units]
    assert len(ran) == 2, ran
    print(f"\npublished cancel → result {to_result:.2f} s; no container after {to_clean:.2f} s")


async def test_delete_cancels_over_http(
    docker_stack: Stack, user: AbstractChannel, docker: aiodocker.Docker
) -> None:
    assert docker_stack.gateway_url is not None
    request = slow_request(symbols=["BTCUSDT", "ETHUSDT"])
    backtest_id = request["id"]
    results = await client.listen(user, backtest_id)
    async with httpx.AsyncClient(base_url=docker_stack.gateway_url, timeout=30) as http:
        assert (await http.delete("/backtests/no-such-backtest")).status_code == 404
        response = await http.post("/backtests", json=request)
        assert response.status_code == 202, response.text
        await running_in_workers(docker, docker_stack, backtest_id, 2)

        cancelled_at = time.perf_counter()
        response = await http.delete(f"/backtests/{backtest_id}")
        assert response.status_code == 202, response.text
        assert response.json()["status"] in ("queued", "running")
        published = await client.next_body(results, 60)
        to_result = time.perf_counter() - cancelled_at
        to_clean = await none_left(docker, backtest_id)

        assert published["status"] == "cancelled", (published["errors"], docker_stack.dump())
        status = (await http.get(f"/backtests/{backtest_id}")).json()
        assert status["status"] == "cancelled"
        assert status["result"] == published
        again = await http.delete(f"/backtests/{backtest_id}")  # over: nothing changes
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
    print(f"\nDELETE → result {to_result:.2f} s; no container after {to_clean:.2f} s")


async def test_a_deadline_passing_while_units_run_fails_the_backtest_naming_them(
    docker_stack: Stack, user: AbstractChannel, docker: aiodocker.Docker
) -> None:
    # Long enough for both units to be running by then, even when planning and loading
    # candles are slow (FerretDB scans a collection for each query: on a loaded machine that
    # took a minute).
    deadline_s = 120.0
    request = slow_request(deadline_s=deadline_s, symbols=["BTCUSDT", "ETHUSDT"])
    backtest_id = request["id"]
    results = await client.listen(user, backtest_id)
    await client.publish(user, json.dumps(request).encode(), correlation_id=backtest_id)
    await running_in_workers(docker, docker_stack, backtest_id, 2, timeout_s=deadline_s - 5)

    result = await client.next_body(results, deadline_s + 60)
    received = time.time()
    deadline, _ = await deadline_of(docker_stack, backtest_id)
    late = received - deadline
    to_clean = await none_left(docker, backtest_id)

    assert result["status"] == "failed", (result["errors"], docker_stack.dump())
    assert [e["kind"] for e in result["errors"]] == ["timeout"] * 2
    assert [e["unit_id"] for e in result["errors"]] == ["u0000", "u0001"]
    assert [e["symbol"] for e in result["errors"]] == request["symbols"]
    assert all("deadline" in e["message"] for e in result["errors"])
    assert late > 0, "ended before its deadline"
    print(f"\ndeadline → result {late:.2f} s after it; no container {to_clean:.2f} s later")


async def test_the_deadline_ends_a_backtest_with_no_worker_running(
    servers: Servers, fresh_amqp_url: str, mongo_db: str, tmp_path: Path
) -> None:
    stack = make_stack(servers, fresh_amqp_url, mongo_db, tmp_path)
    # The setting (no deadline_s asked); planning takes seconds, up to a minute on a loaded
    # machine (FerretDB), and the timer starts once the plan is stored.
    stack.start("scheduler", STRATORCH_DEADLINE_S="20")
    stack.start("portfolio_sim")
    try:
        await asyncio.to_thread(stack.wait_ready)
        request = client.request()
        connection = await aio_pika.connect(fresh_amqp_url)
        async with connection:
            channel = await connection.channel()
            results = await client.listen(channel, request["id"])
            submitted = time.perf_counter()
            body = json.dumps(request).encode()
            await client.publish(channel, body, correlation_id=request["id"])
            result = await client.next_body(results, 120)
            took = time.perf_counter() - submitted
            received = time.time()
            deadline, planned = await deadline_of(stack, request["id"])
            late = received - max(deadline, planned)

            assert result["status"] == "failed", (result["errors"], stack.dump())
            assert [e["unit_id"] for e in result["errors"]] == ["u0000", "u0001", "u0002", "u0003"]
            assert all(e["kind"] == "timeout" for e in result["errors"])
            # The units are still queued, for no one; the timer queues are empty again.
            work = await channel.declare_queue("backtest.work", passive=True)
            assert work.declaration_result.message_count == 4
    finally:
        stack.stop()
    assert took >= 20 and late > 0
    print(f"\nno worker: result {late:.2f} s after the deadline (or the plan, if later)")
