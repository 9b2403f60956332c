"""A portfolio_sim SIGKILLed in the middle of a replay: another one takes the replay over
from the write-ahead log once the lease lapses, and the result is ``stratorch run``'s.

Only portfolio_sim is under test, so the test feeds it directly: ``stratorch run --state``
gives the reference result and leaves the plan and the units' proposal batches behind; the
test stores that plan in Mongo and publishes those batches to ``backtest.proposals``, as the
scheduler and the symbol workers would (they would take minutes to load the candles of this
many bars from the test's Mongo server).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from shared import mongo, topology
from shared.broker import RabbitBus
from shared.bus import Outgoing, publish
from shared.messages import BacktestResult, Plan, ProposalBatch
from tests import every_bar
from tests.integration import client
from tests.integration.conftest import make_stack
from tests.integration.stack import Servers, Service

pytestmark = pytest.mark.integration

#: Four symbols over the whole bundled sample, a BUY on every bar: ~44k WAL events, which the
#: test server (FerretDB on SQLite) takes seconds to store.
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "ADAUSDT"]
#: Short, so the test does not wait 30 s (the default) for the dead owner's lease to lapse.
LEASE_S = 3.0

Db = AsyncDatabase[dict[str, Any]]


@pytest.fixture
async def db(servers: Servers) -> AsyncIterator[Db]:
    """A database of the test's own (no candles: only portfolio_sim runs)."""
    connection = await mongo.connect(servers.mongo_url, retries=0)
    database = connection[f"stratorch_test_{uuid.uuid4().hex[:12]}"]
    try:
        yield database
    finally:
        await connection.drop_database(database.name)
        await connection.close()


async def replaying(sims: list[Service], timeout_s: float = 120) -> Service:
    """The portfolio_sim that started the replay (it logs ``replaying``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for sim in sims:
            assert sim.process.poll() is None, sim.text()
            if sim.logged("replaying"):
                return sim
        assert time.monotonic() < deadline, "no replay started"
        await asyncio.sleep(0.02)


async def test_a_replay_whose_portfolio_sim_is_killed_is_finished_by_another(
    servers: Servers,
    fresh_amqp_url: str,
    db: Db,
    tmp_path: Path,
    run_cli: Callable[..., tuple[int, BacktestResult]],
) -> None:
    request = every_bar.request(f"it-{uuid.uuid4().hex[:16]}", SYMBOLS)
    backtest_id = request["id"]
    state = tmp_path / "state"
    _, want = await asyncio.to_thread(run_cli, request, "--state", str(state))
    assert want.status == "completed" and want.wal is not None
    events = want.wal.events
    left = state / "backtests" / backtest_id
    batches = [
        ProposalBatch.model_validate_json(p.read_bytes())
        for p in sorted((left / "batches").glob("*.json"))
    ]
    await mongo.MongoStore(db).put_plan(Plan.model_validate_json((left / "plan.json").read_bytes()))

    stack = make_stack(servers, fresh_amqp_url, db.name, tmp_path / "logs")
    lease = {"STRATORCH_CLAIM_LEASE_S": str(LEASE_S)}
    sims = [stack.start("portfolio_sim", **lease), stack.start("portfolio_sim", **lease)]
    try:
        await asyncio.to_thread(stack.wait_ready)
        connection = await aio_pika.connect(fresh_amqp_url)
        async with connection, RabbitBus(fresh_amqp_url) as bus:
            channel = await connection.channel()
            results = await client.listen(channel, backtest_id)
            for batch in batches:
                await publish(bus, Outgoing(topology.PROPOSALS, batch, backtest_id))

            # Kill the owner once it has stored some of the WAL, well before all of it.
            owner = await replaying(sims)
            while not (stored := await db.wal.count_documents({"backtest_id": backtest_id})):
                assert owner.process.poll() is None, owner.text()
                await asyncio.sleep(0.02)
            owner.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            owner.stop()

            got = await client.next_body(results, timeout_s=240)
            recovery_s = time.monotonic() - killed_at

        assert got["status"] == "completed", (got["errors"], stack.dump())
        assert client.comparable(got) == client.comparable(json.loads(want.model_dump_json()))
        [taker] = [s for s in sims if s is not owner]
        [killed] = owner.logged("replaying")
        [started] = taker.logged("replaying")
        [done] = taker.logged("replayed")
        assert killed["owner"] != started["owner"]
        # It resumed where the dead owner's log ends (a write in flight when the owner died
        # may have landed after the test looked): checked that much, wrote the rest.
        resumed_at = done["wal_verified"]
        assert 0 < stored <= resumed_at == started["wal_stored"] < events, (stored, done, events)
        assert done["wal_appended"] == events - resumed_at
        # Completed: its batches, leases and WAL went with its result (they are read by
        # nothing after), so no later backtest pays for them.
        for collection in ("batches", "claims", "wal"):
            assert await db[collection].count_documents({"backtest_id": backtest_id}) == 0
        print(
            f"\nkilled the replay's owner after {resumed_at}/{events} WAL records were stored; "
            f"the result came {recovery_s:.1f} s later (lease {LEASE_S:g} s)"
        )
    finally:
        stack.stop()
