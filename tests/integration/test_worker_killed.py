"""A symbol worker SIGKILLed while its Docker sandbox runs a unit: another worker takes the
unit, the result is what ``stratorch run`` gives, and the orphaned container is removed by
the surviving worker (not only when some sandbox next starts)."""

from __future__ import annotations

import asyncio
import json
import signal
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiodocker
import pytest

from tests.integration import client
from tests.integration.conftest import Reference, make_stack
from tests.integration.docker_support import PLACE, DockerEnv, docker_up, our_containers
from tests.integration.stack import Servers, Service

pytestmark = pytest.mark.integration

#: sma_cross that takes its time: a unit reliably still running when its worker is killed.
SLOW_SMA = textwrap.dedent(
    """
    import time

    from shared.strategy.builtins import SmaCross

    class SlowSma(SmaCross):
        params = {**SmaCross.params, "seconds": 0.0}

        def signals(self, df):
            time.sleep(float(self.params["seconds"]))
            return super().signals(df)
    """
)


@pytest.fixture(scope="module")
def docker_env() -> DockerEnv:
    return docker_up()


@pytest.fixture
async def docker(docker_env: DockerEnv) -> AsyncIterator[aiodocker.Docker]:
    async with aiodocker.Docker(url=docker_env.url) as engine:
        yield engine


async def busy_worker(docker: aiodocker.Docker, workers: list[Service]) -> Service:
    """The worker that has a sandbox container running (a unit in flight)."""
    async with asyncio.timeout(120):
        while True:
            for worker in workers:
                found = await our_containers(docker, f"{PLACE}:{worker.pid}:")
                if any(c["state"] == "running" for c in found):
                    return worker
            await asyncio.sleep(0.2)


async def test_a_worker_killed_mid_unit_loses_nothing_and_leaves_no_container(
    servers: Servers,
    fresh_amqp_url: str,
    mongo_db: str,
    docker_env: DockerEnv,
    docker: aiodocker.Docker,
    reference: Reference,
    tmp_path: Path,
) -> None:
    request = client.request(
        symbols=["BTCUSDT", "ETHUSDT"],
        strategy={"source": SLOW_SMA, "class": "SlowSma", "params": {"seconds": 6.0}},
        initial_cash=44_444,
    )
    stack = make_stack(servers, fresh_amqp_url, mongo_db, tmp_path)
    sandbox = {
        "STRATORCH_SANDBOX": "docker",
        "STRATORCH_SANDBOX_IMAGE": docker_env.image,
        "DOCKER_HOST": docker_env.url,
    }
    stack.start("scheduler", **sandbox)
    workers = [stack.start("symbol_worker", STRATORCH_CONCURRENCY="1", **sandbox) for _ in "ab"]
    stack.start("portfolio_sim")
    try:
        await asyncio.to_thread(stack.wait_ready)
        connection = await aio_pika.connect(fresh_amqp_url)
        async with connection:
            channel = await connection.channel()
            results = await client.listen(channel, request["id"])
            await client.publish(
                channel, json.dumps(request).encode(), correlation_id=request["id"]
            )
            victim = await busy_worker(docker, workers)
            owner = f"{PLACE}:{victim.pid}:"
            orphans = await our_containers(docker, owner)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()  # reaped, as its parent (compose, systemd) would
            killed = time.monotonic()

            result = await client.next_body(results, timeout_s=180)
            finished_s = time.monotonic() - killed

        assert result["status"] == "completed", (result["errors"], stack.dump())
        assert client.comparable(result) == client.comparable(await reference(request))
        [survivor] = [w for w in workers if w is not victim]
        assert survivor.logged("handled"), stack.dump()

        async with asyncio.timeout(60):
            while await our_containers(docker, owner):
                await asyncio.sleep(0.5)
        removed_s = time.monotonic() - killed
        assert orphans, "the killed worker had no container"
        print(
            f"\nworker SIGKILLed mid-unit: result {finished_s:.1f} s later,"
            f" its container removed {removed_s:.1f} s later"
        )
    finally:
        stack.stop()
