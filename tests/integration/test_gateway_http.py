"""The gateway's HTTP API in front of the running stack, with httpx as the client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.integration import client
from tests.integration.conftest import Reference
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    assert stack.gateway_url is not None
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30, trust_env=False) as c:
        yield c


async def sse(http: httpx.AsyncClient, url: str, *, timeout_s: float = 120) -> list[dict[str, Any]]:
    """Every event of a server-sent event stream until the server ends it."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async with http.stream("GET", url, timeout=timeout_s) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
            elif line.startswith("event:"):
                current["event"] = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                current["data"] = json.loads(line.partition(":")[2])
    if current:
        events.append(current)
    return events


async def test_submit_follow_the_events_and_fetch_the_result(
    stack: Stack, http: httpx.AsyncClient, reference: Reference
) -> None:
    request = client.request(initial_cash=11_111)
    del request["id"]  # the gateway gives one

    response = await http.post("/backtests", json=request)
    assert response.status_code == 202, response.text
    accepted = response.json()
    backtest_id = accepted["id"]
    assert accepted["status_url"].endswith(f"/backtests/{backtest_id}")
    assert accepted["events_url"] == accepted["status_url"] + "/events"
    assert response.headers["location"] == accepted["status_url"]

    events = await sse(http, accepted["events_url"])
    assert events, "the stream ended without an event"
    assert all(e["data"]["backtest_id"] == backtest_id for e in events)
    assert [e["event"] for e in events][-1] == "finished"
    assert all(e["event"] == e["data"]["type"] for e in events)
    finished = events[-1]["data"]
    assert finished["status"] == "completed"
    done = [e["data"]["units_done"] for e in events if e["event"] == "unit_done"]
    assert done == sorted(done)

    response = await http.get(accepted["status_url"])
    assert response.status_code == 200
    status = response.json()
    assert status["id"] == backtest_id and status["status"] == "completed"
    assert status["progress"] == {"units_done": 4, "unit_count": 4}
    result = status["result"]
    want = await reference({**request, "id": backtest_id})
    for field in ("metrics", "per_symbol", "trades", "equity_curve"):
        assert result[field] == want[field], field
    assert client.comparable(result) == client.comparable(want)

    # Following a finished backtest: one `finished` event, at once.
    [again] = await sse(http, accepted["events_url"], timeout_s=10)
    assert again["event"] == "finished" and again["data"]["status"] == "completed"


async def test_a_bad_request_is_answered_422_naming_each_field(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/backtests",
        json={
            "strategy": {"builtin": "sma_cross"},
            "symbols": [],
            "interval": "2h30",
            "start": "2021-02-01",
        },
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    fields = {e["loc"][0] for e in detail}
    assert {"symbols", "interval", "end"} <= fields, detail
    assert all(e["msg"] for e in detail)

    as_json = {"content-type": "application/json"}
    response = await http.post("/backtests", content=b"{nope", headers=as_json)
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"].startswith("Invalid JSON")
    response = await http.post("/backtests", content=b"{}", headers={"content-type": "x"})
    assert response.status_code == 422
    assert "content-type: application/json" in response.json()["detail"][0]["msg"]

    backwards = {**client.request(start="2021-06-01", end="2021-01-01")}
    response = await http.post("/backtests", json=backwards)
    assert response.status_code == 422
    assert "after" in json.dumps(response.json())

    huge = client.request(strategy={"source": "#" * 2_000_000, "class": "S"})
    response = await http.post("/backtests", json=huge)
    assert response.status_code == 413


async def test_health_unknown_ids_and_the_api_document(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"broker": "ok", "mongo": "ok"}

    assert (await http.get("/backtests/no-such-backtest")).status_code == 404
    assert (await http.get("/backtests/no-such-backtest/events")).status_code == 404

    doc = (await http.get("/openapi.json")).json()
    body = doc["paths"]["/backtests"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/BacktestRequest"}
    schemas = doc["components"]["schemas"]
    assert {"symbols", "strategy", "interval", "start", "end"} <= set(
        schemas["BacktestRequest"]["properties"]
    )
    assert "BacktestResult" in schemas and "BacktestStatus" in schemas
