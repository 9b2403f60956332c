"""The gateway's ids, on the real broker and Mongo: a backtest is known to every replica as
soon as it is accepted; an id belongs to its first request; Mongo down at start is a 503.

The gateways here run in this process (``create_app`` under its own lifespan, served through
httpx's ASGI transport) on a vhost and database of the test's own, with no scheduler: what a
gateway stored and published is all there is to see.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import httpx
import pytest

from services.gateway.app import create_app
from shared.messages import BacktestRequest
from shared.settings import Settings
from tests.integration import client
from tests.integration.stack import Servers, drop_database

pytestmark = pytest.mark.integration


@pytest.fixture
async def settings(servers: Servers, fresh_amqp_url: str) -> AsyncIterator[Settings]:
    db = f"stratorch_test_{uuid.uuid4().hex[:12]}"
    yield Settings(amqp_url=fresh_amqp_url, mongo_url=servers.mongo_url, mongo_db=db, auth="off")
    await drop_database(servers.mongo_url, db)


@asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """One gateway replica, started as uvicorn starts it (its lifespan first)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            yield http


async def published(amqp_url: str) -> list[dict[str, Any]]:
    """The requests waiting in ``backtest.requests`` (nothing consumes it here)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("backtest.requests", passive=True)
        bodies = []
        while (message := await queue.get(fail=False)) is not None:
            bodies.append(BacktestRequest.model_validate_json(message.body).model_dump())
        return bodies


async def test_every_replica_knows_an_accepted_backtest_at_once(settings: Settings) -> None:
    request = client.request()
    async with gateway(settings) as one, gateway(settings) as two:
        response = await one.post("/backtests", json=request)
        assert response.status_code == 202, response.text
        status = await two.get(f"/backtests/{request['id']}")  # no scheduler: never planned
        assert status.status_code == 200, status.text
        assert status.json()["status"] == "queued"


async def test_an_id_belongs_to_its_first_request(settings: Settings) -> None:
    request = client.request()
    async with gateway(settings) as one, gateway(settings) as two:
        first = await one.post("/backtests", json=request)
        assert first.status_code == 202, first.text

        # The same request again (a retry, on any replica): the same backtest.
        again = await two.post("/backtests", json=request)
        assert again.status_code == 200, again.text
        assert again.json() == first.json()

        # Another request with that id: refused, naming the id.
        other = await two.post("/backtests", json={**request, "initial_cash": 1234})
        assert other.status_code == 409, other.text
        [error] = other.json()["detail"]
        assert error["loc"] == ["id"] and repr(request["id"]) in error["msg"]

    # Only the first request was ever published (twice: still queued when retried).
    bodies = await published(settings.amqp_url.get_secret_value())
    assert [b["initial_cash"] for b in bodies] == [request["initial_cash"]] * 2
    assert {b["id"] for b in bodies} == {request["id"]}


async def test_a_gateway_started_while_mongo_is_down_answers_503(settings: Settings) -> None:
    down = settings.model_copy(
        update={"mongo_url": settings.mongo_url.__class__("mongodb://127.0.0.1:9/")}
    )
    async with gateway(down) as http:  # starts: it does not wait for Mongo
        health = await http.get("/healthz", timeout=30)
        assert health.status_code == 503
        assert health.json()["broker"] == "ok"
        assert health.json()["mongo"].startswith("down")
        submitted = await http.post("/backtests", json=client.request(), timeout=30)
        assert submitted.status_code == 503
        assert "MongoDB" in submitted.json()["detail"]
