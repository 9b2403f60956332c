"""Session fixtures on real servers: RabbitMQ, a Mongo wire-protocol server, the services.

The servers come up through ``scripts/services-up.sh`` (idempotent). Where they cannot be
started these tests SKIP, saying why — unless ``STRATORCH_REQUIRE_SERVICES=1`` (CI), which
turns that into a failure. Each test session gets its own RabbitMQ vhost (the topology's queue
names are fixed) and its own Mongo database with the bundled sample candles, both removed at
the end; the services run as separate OS processes against them.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import aio_pika
import pytest

from shared.messages import BacktestResult
from tests.integration import client
from tests.integration.stack import (
    Servers,
    ServersUnavailable,
    Stack,
    create_vhost,
    delete_vhost,
    drop_database,
    load_sample,
    servers_up,
)

REQUIRE = os.environ.get("STRATORCH_REQUIRE_SERVICES") == "1"


def unavailable(reason: str) -> NoReturn:
    if REQUIRE:
        pytest.fail(f"{reason} (STRATORCH_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def servers() -> Servers:
    try:
        return servers_up()
    except ServersUnavailable as exc:
        unavailable(f"the integration servers could not be started: {exc}")


@pytest.fixture(scope="session")
def amqp_url(servers: Servers) -> Iterator[str]:
    """A fresh vhost for the session's stack."""
    try:
        name, url = create_vhost(servers.amqp_url)
    except (ServersUnavailable, OSError) as exc:
        unavailable(f"cannot create a RabbitMQ vhost: {exc}")
    yield url
    delete_vhost(name)


@pytest.fixture
def fresh_amqp_url(servers: Servers) -> Iterator[str]:
    """A vhost of the test's own, for tests that need empty queues."""
    try:
        name, url = create_vhost(servers.amqp_url)
    except (ServersUnavailable, OSError) as exc:
        unavailable(f"cannot create a RabbitMQ vhost: {exc}")
    yield url
    delete_vhost(name)


def _ms(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000)


#: The sample's bars the tests use: the requests' month and a warm-up longer than any
#: strategy of the tests needs (sma_cross: 51 bars). Not the whole sample: FerretDB (the
#: tests' Mongo wire-protocol server, on SQLite) scans the whole collection on every candle
#: query, so every bar loaded makes every query slower.
WINDOW = {
    "start_ms": _ms(client.REQUEST["start"]),
    "end_ms": _ms(client.REQUEST["end"]),
    "warm_up": 200,
}


@pytest.fixture(scope="session")
def mongo_db(servers: Servers) -> Iterator[str]:
    """A database of the session's own, holding the bundled sample's candles (all eight
    symbols, :data:`WINDOW` of them)."""
    name = f"stratorch_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(load_sample(servers.mongo_url, name, **WINDOW))
    yield name
    asyncio.run(drop_database(servers.mongo_url, name))


def make_stack(servers: Servers, amqp_url: str, mongo_db: str, log_dir: Path) -> Stack:
    return Stack.configure(
        amqp_url=amqp_url,
        mongo_url=servers.mongo_url,
        candles_mongo_url=servers.candles_mongo_url,
        db=mongo_db,
        log_dir=log_dir,
    )


@pytest.fixture(scope="session")
def stack(
    servers: Servers, amqp_url: str, mongo_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """scheduler, two symbol workers (one unit at a time each), portfolio_sim and the
    gateway, consuming and answering, as separate processes."""
    stack = make_stack(servers, amqp_url, mongo_db, tmp_path_factory.mktemp("stack-logs"))
    stack.start("scheduler")
    stack.start("symbol_worker", STRATORCH_CONCURRENCY="1")
    stack.start("symbol_worker", STRATORCH_CONCURRENCY="1")
    stack.start("portfolio_sim")
    stack.start_gateway()
    try:
        stack.wait_ready()
    except BaseException:
        stack.stop()
        raise
    yield stack
    stack.stop()


@pytest.fixture
async def amqp(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A plain aio-pika connection to the stack's vhost: what a user's client has."""
    connection = await aio_pika.connect(amqp_url)
    try:
        yield connection
    finally:
        await connection.close()


Reference = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@pytest.fixture
def reference(run_cli: Callable[..., tuple[int, BacktestResult]]) -> Reference:
    """What ``stratorch run`` (in-process, on the bundled Parquet sample) gives for a
    request, as the JSON document the broker carries."""

    async def run(request: dict[str, Any]) -> dict[str, Any]:
        _, result = await asyncio.to_thread(run_cli, request)
        as_json: dict[str, Any] = json.loads(result.model_dump_json())
        return as_json

    return run
