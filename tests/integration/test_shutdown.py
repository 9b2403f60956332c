"""SIGTERM, as a service gets it from Docker or systemd: stop taking work, let what is in
flight finish within the grace period, requeue what cannot, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from shared import topology
from shared.broker import RabbitBus
from shared.bus import Outgoing, publish
from shared.messages import ComponentSpec, ExecutionRules, ProposalBatch, WorkUnit
from tests.integration.conftest import make_stack
from tests.integration.stack import Servers, Service

pytestmark = pytest.mark.integration

START_MS = 1_619_827_200_000  # 2021-05-01, in the tests' candle window


def sleepy_unit(backtest_id: str, seconds: float) -> WorkUnit:
    return WorkUnit(
        backtest_id=backtest_id,
        unit_id="u0000",
        unit_count=1,
        symbols=["BTCUSDT"],
        interval="1h",
        start_ms=START_MS,
        end_ms=START_MS + 7 * 86_400_000,
        lookback=1,
        strategy=ComponentSpec.model_validate(
            {
                "module": "tests.integration.sleepy",
                "class": "Sleepy",
                "params": {"seconds": seconds},
            }
        ),
        rules=ExecutionRules(),
        timeout_s=60,
    )


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


async def in_flight(worker: Service, timeout_s: float = 30) -> list[int]:
    """Wait until the worker has started a sandbox (so a unit is being worked on)."""
    deadline = time.monotonic() + timeout_s
    while not (kids := children(worker.pid)):
        assert worker.process.poll() is None, worker.text()
        assert time.monotonic() < deadline, f"no unit started\n{worker.text()}"
        await asyncio.sleep(0.02)
    return kids


async def message_count(url: str, queue: str) -> int:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def test_sigterm_lets_the_unit_in_flight_finish_then_exits_0(
    servers: Servers, fresh_amqp_url: str, mongo_db: str, tmp_path: Path
) -> None:
    stack = make_stack(servers, fresh_amqp_url, mongo_db, tmp_path)
    worker = stack.start(
        "symbol_worker", STRATORCH_CONCURRENCY="1", STRATORCH_SHUTDOWN_GRACE_S="30"
    )
    try:
        await asyncio.to_thread(stack.wait_ready)
        async with RabbitBus(fresh_amqp_url) as bus:
            await publish(bus, Outgoing(topology.WORK, sleepy_unit("stop-1", 2.0), "stop-1"))
            await in_flight(worker)
            worker.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(worker.stop, 60, signalled=True)

            assert code == 0, worker.text()
            events = [r["event"] for r in worker.records()]
            assert events.index("handled") > events.index(
                "stopping: no new deliveries; in-flight ones may finish"
            ), events
            assert events[-1] == "stopped"
            # The unit was acked (not requeued) and its batch published.
            assert await message_count(fresh_amqp_url, topology.WORK) == 0
            assert await message_count(fresh_amqp_url, topology.PROPOSALS) == 1
            async with contextlib.aclosing(bus.consume(topology.PROPOSALS)) as deliveries:
                async for delivery in deliveries:
                    batch = ProposalBatch.model_validate_json(delivery.body)
                    await delivery.ack()
                    break
            assert batch.backtest_id == "stop-1" and batch.error is None
    finally:
        stack.stop()


async def test_a_unit_that_outlasts_the_grace_period_is_requeued_not_lost(
    servers: Servers, fresh_amqp_url: str, mongo_db: str, tmp_path: Path
) -> None:
    stack = make_stack(servers, fresh_amqp_url, mongo_db, tmp_path)
    worker = stack.start(
        "symbol_worker", STRATORCH_CONCURRENCY="1", STRATORCH_SHUTDOWN_GRACE_S="0.5"
    )
    try:
        await asyncio.to_thread(stack.wait_ready)
        async with RabbitBus(fresh_amqp_url) as bus:
            await publish(bus, Outgoing(topology.WORK, sleepy_unit("stop-2", 30.0), "stop-2"))
            sandboxes = await in_flight(worker)
            started = time.monotonic()
            worker.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(worker.stop, 60, signalled=True)

            assert code == 0, worker.text()
            assert time.monotonic() - started < 15, "the grace period was not applied"
            assert not [p for p in sandboxes if os.path.exists(f"/proc/{p}")], "sandbox left"
            assert "handled" not in [r["event"] for r in worker.records()]
            assert await message_count(fresh_amqp_url, topology.WORK) == 1
            assert await message_count(fresh_amqp_url, topology.PROPOSALS) == 0
    finally:
        stack.stop()
