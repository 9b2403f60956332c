"""Who may see and spend what, on the real servers: API tokens at the gateway, tenants as
RabbitMQ users on the broker, each seeing only its own backtests and sources, within quotas.

A stack of its own (the session's runs with ``STRATORCH_AUTH=off``): its vhost, a services
user tagged ``impersonator`` (the gateway publishes for its tenants), two tenant users with
exactly the permissions README documents, and a quota of one backtest running at once and
four units per tenant. Every user and the vhost are removed afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from shared.broker import BrokerRefused, RabbitBus
from shared.tenancy import hash_token
from tests.integration import client
from tests.integration.conftest import make_stack, unavailable
from tests.integration.stack import (
    ROOT,
    Servers,
    ServersUnavailable,
    Stack,
    add_user,
    create_vhost,
    delete_user,
    delete_vhost,
)
from tests.integration.test_gateway_http import sse

#: Each test runs a few backtests one after another on a loaded test Mongo server.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

#: What a tenant's RabbitMQ user may do (README, "Tenants on the broker"): declare server-named
#: queues, publish requests, bind its queues to results and events — for routing keys that
#: begin with its own name only.
PERMISSIONS = (
    r"^amq\.gen-.*",
    r"^(amq\.gen-.*|backtest\.requests|backtest\.cancel)$",
    r"^(amq\.gen-.*|backtest\.results|backtest\.events)$",
)
TOPIC_PERMISSIONS = {
    "backtest.results": ("^$", r"^(duplicate/)?{username}\."),
    "backtest.events": ("^$", r"^{username}\."),
    "backtest.cancel": (r"^{username}\.", "^$"),
}
QUOTA = {"STRATORCH_TENANT_MAX_RUNNING": "1", "STRATORCH_TENANT_MAX_UNITS": "4"}

QUIET = (
    "from shared.strategy import BaseStrategy\n\n"
    "class Quiet(BaseStrategy):\n"
    "    def decide(self, df, interval, **kw):\n"
    "        return None\n"
)
IGNORED = "request ignored: its backtest id belongs to another tenant"
SLEEPY = {"module": "tests.integration.sleepy", "class": "Sleepy", "params": {"seconds": 4.0}}


def test_the_readme_documents_these_permissions() -> None:
    readme = (ROOT / "README.md").read_text()
    for permission in PERMISSIONS:
        assert f"'{permission}'" in readme, permission
    for exchange, (write, read) in TOPIC_PERMISSIONS.items():
        assert f"{exchange} '{write}' '{read}'" in readme, exchange


@dataclass
class Tenants:
    stack: Stack
    alice: str
    bob: str
    urls: dict[str, str]  # RabbitMQ user: URL
    tokens: dict[str, str]  # tenant: API token

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[tenant]}"}


@pytest.fixture(scope="module")
def tenants(
    servers: Servers, mongo_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tenants]:
    suffix = uuid.uuid4().hex[:8]
    alice, bob, services = f"alice_{suffix}", f"bob_{suffix}", f"stratorch_{suffix}"
    try:
        vhost, _ = create_vhost(servers.amqp_url, prefix="stratorch-tenants")
    except (ServersUnavailable, OSError) as exc:
        unavailable(f"cannot create a RabbitMQ vhost: {exc}")
    users: list[str] = []
    stack = None
    try:
        urls = {}
        urls[services] = add_user(servers.amqp_url, vhost, services, tags=("impersonator",))
        users.append(services)
        for user in (alice, bob):
            urls[user] = add_user(
                servers.amqp_url,
                vhost,
                user,
                permissions=PERMISSIONS,
                topic_permissions=TOPIC_PERMISSIONS,
            )
            users.append(user)
        tokens = {tenant: secrets.token_urlsafe(32) for tenant in (alice, bob)}
        stack = make_stack(servers, urls[services], mongo_db, tmp_path_factory.mktemp("tenants"))
        stack.env = {
            **stack.env,
            "STRATORCH_AUTH": "tokens",
            "STRATORCH_API_TOKENS": ",".join(f"{t}:{hash_token(k)}" for t, k in tokens.items()),
            **QUOTA,
        }
        stack.start("scheduler")
        stack.start("symbol_worker", STRATORCH_CONCURRENCY="2")
        stack.start("portfolio_sim")
        stack.start_gateway()
        stack.wait_ready()
        yield Tenants(stack, alice, bob, urls, tokens)
    finally:
        if stack is not None:
            stack.stop()
        for user in users:
            delete_user(user)
        delete_vhost(vhost)


@pytest.fixture
async def http(tenants: Tenants) -> AsyncIterator[httpx.AsyncClient]:
    assert tenants.stack.gateway_url is not None
    async with httpx.AsyncClient(
        base_url=tenants.stack.gateway_url, timeout=30, trust_env=False
    ) as c:
        yield c


def request(**overrides: Any) -> dict[str, Any]:
    """A small backtest (one symbol: the test Mongo server is slow) with no id: the gateway
    gives one."""
    body = client.request(**{"symbols": ["BTCUSDT"], **overrides})
    del body["id"]
    return body


async def finished(http: httpx.AsyncClient, tenants: Tenants, tenant: str, bid: str) -> str:
    """Follow a backtest's events (as its tenant) to the end; its status."""
    async with httpx.AsyncClient(
        base_url=str(http.base_url), headers=tenants.auth(tenant), trust_env=False
    ) as as_tenant:
        events = await sse(as_tenant, f"/backtests/{bid}/events")
    assert events and events[-1]["event"] == "finished", (events, tenants.stack.dump())
    status: str = events[-1]["data"]["status"]
    return status


async def test_the_http_api_wants_a_token_and_shows_a_tenant_only_its_own(
    tenants: Tenants, http: httpx.AsyncClient
) -> None:
    alice, bob = tenants.alice, tenants.bob
    for method, url in (
        ("POST", "/backtests"),
        ("GET", "/backtests/any-id"),
        ("GET", "/backtests/any-id/events"),
    ):
        body = request() if method == "POST" else None
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = await http.request(method, url, json=body, headers=headers)
            assert response.status_code == 401, (method, url, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert (await http.get("/healthz")).status_code == 200  # open: says nothing of tenants

    upload = request(strategy={"source": QUIET, "class": "Quiet"})
    response = await http.post("/backtests", json=upload, headers=tenants.auth(alice))
    assert response.status_code == 202, response.text
    backtest_id = response.json()["id"]
    assert await finished(http, tenants, alice, backtest_id) == "completed"
    mine = await http.get(f"/backtests/{backtest_id}", headers=tenants.auth(alice))
    assert mine.status_code == 200 and mine.json()["result"]["status"] == "completed"

    # Bob: alice's backtest is as unknown as one that does not exist.
    for url in (f"/backtests/{backtest_id}", f"/backtests/{backtest_id}/events"):
        theirs = await http.get(url, headers=tenants.auth(bob))
        nothing = await http.get(url.replace(backtest_id, "no-such-id"), headers=tenants.auth(bob))
        assert theirs.status_code == nothing.status_code == 404
        assert theirs.json()["detail"] == nothing.json()["detail"].replace(
            "no-such-id", backtest_id
        )
    # ... and so is her source's hash.
    sha = hashlib.sha256(QUIET.encode()).hexdigest()
    by_hash = request(strategy={"source_sha256": sha, "class": "Quiet"})
    theirs = await http.post("/backtests", json=by_hash, headers=tenants.auth(bob))
    never = request(strategy={"source_sha256": "0" * 64, "class": "Quiet"})
    nothing = await http.post("/backtests", json=never, headers=tenants.auth(bob))
    assert theirs.status_code == nothing.status_code == 422
    assert theirs.json()["detail"][0]["msg"] == nothing.json()["detail"][0]["msg"].replace(
        "0" * 64, sha
    )
    # He cannot take over her id either; her result stays hers, unchanged.
    taken = await http.post(
        "/backtests", json={**request(), "id": backtest_id}, headers=tenants.auth(bob)
    )
    assert taken.status_code == 409
    again = await http.get(f"/backtests/{backtest_id}", headers=tenants.auth(alice))
    assert again.json() == mine.json()

    # Her hash is hers to use again.
    response = await http.post("/backtests", json=by_hash, headers=tenants.auth(alice))
    assert response.status_code == 202, response.text
    assert await finished(http, tenants, alice, response.json()["id"]) == "completed"


async def test_past_its_quota_a_tenant_gets_429_and_others_are_not_held_up(
    tenants: Tenants, http: httpx.AsyncClient
) -> None:
    alice, bob = tenants.alice, tenants.bob
    slow = request(strategy=SLEEPY, symbols=["BTCUSDT"])
    first = await http.post("/backtests", json=slow, headers=tenants.auth(alice))
    assert first.status_code == 202, first.text

    refused = await http.post("/backtests", json=request(), headers=tenants.auth(alice))
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) > 0
    assert "1 backtest running at once" in refused.json()["detail"]
    too_big = request(symbols=client.ALL_SYMBOLS[:5])
    answer = await http.post("/backtests", json=too_big, headers=tenants.auth(bob))
    assert answer.status_code == 422 and "split it" in json.dumps(answer.json())

    theirs = await http.post("/backtests", json=request(), headers=tenants.auth(bob))
    assert theirs.status_code == 202, theirs.text
    assert await finished(http, tenants, bob, theirs.json()["id"]) == "completed"

    assert await finished(http, tenants, alice, first.json()["id"]) == "completed"
    # Her backtest ended: its place is free again.
    later = await http.post("/backtests", json=request(), headers=tenants.auth(alice))
    assert later.status_code == 202, later.text
    assert await finished(http, tenants, alice, later.json()["id"]) == "completed"


async def publish(
    channel: AbstractChannel, request: dict[str, Any], *, user_id: str | None
) -> None:
    exchange = await channel.get_exchange("backtest.requests", ensure=False)
    await exchange.publish(
        aio_pika.Message(
            json.dumps(request).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
            correlation_id=request["id"],
            user_id=user_id,
            headers={"x-schema-version": 1},
        ),
        routing_key="client",
    )


async def backtest_as(
    connection: AbstractConnection, request: dict[str, Any], *, user_id: str | None
) -> dict[str, Any]:
    """Publish a request as a tenant client does; its result."""
    channel = await connection.channel()
    try:
        queue = await client.listen(channel, request["id"])
        await publish(channel, request, user_id=user_id)
        return await client.next_body(queue, timeout_s=120)
    finally:
        await channel.close()


async def ignore(message: AbstractIncomingMessage) -> None:
    """A consumer that does nothing (it is never meant to get a message)."""


async def refused(connection: AbstractConnection, action: str, *args: Any) -> str:
    """What the broker says when a channel tries ``action``; fails if it is allowed."""
    channel = await connection.channel()
    try:
        if action == "bind":
            queue = await channel.declare_queue("", exclusive=True)
            await queue.bind(*args)
        elif action == "consume":
            queue = await channel.get_queue(args[0], ensure=False)
            await queue.consume(ignore)
        else:
            await publish(channel, args[0], user_id=args[1])
    except aiormq.exceptions.ChannelClosed as exc:
        return str(exc)
    finally:
        if not channel.is_closed:
            await channel.close()
    raise AssertionError(f"{action} {args} was allowed")


async def test_on_the_broker_tenants_are_rabbitmq_users(
    tenants: Tenants, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    alice, bob = tenants.alice, tenants.bob
    as_alice = await aio_pika.connect(tenants.urls[alice])
    as_bob = await aio_pika.connect(tenants.urls[bob])
    try:
        code = QUIET.replace("Quiet", "Quieter")
        mine = client.request(
            id=f"{alice}.{uuid.uuid4().hex[:8]}",
            symbols=["BTCUSDT"],
            strategy={"source": code, "class": "Quieter"},
        )
        result = await backtest_as(as_alice, mine, user_id=alice)
        assert result["status"] == "completed", (result, tenants.stack.dump())
        # One tenant across both paths: the gateway shows alice what she published.
        seen = await http.get(f"/backtests/{mine['id']}", headers=tenants.auth(alice))
        assert seen.status_code == 200 and seen.json()["status"] == "completed"
        assert (await http.get(f"/backtests/{mine['id']}", headers=tenants.auth(bob))).is_error

        # Bob can neither listen to alice's backtests nor read every result.
        for exchange in ("backtest.results", "backtest.events"):
            for key in (mine["id"], "#", f"{alice}.*", f"duplicate/{mine['id']}"):
                assert "ACCESS_REFUSED" in await refused(as_bob, "bind", exchange, key)
        assert "ACCESS_REFUSED" in await refused(as_bob, "consume", "backtest.results.all")
        # ... nor publish as alice: RabbitMQ checks user_id.
        hers = client.request(id=f"{bob}.as-alice")
        assert "PRECONDITION_FAILED" in await refused(as_bob, "publish", hers, alice)

        # A request without user_id has no tenant: rejected, saying what to do.
        anonymous = client.request(id=f"{bob}.{uuid.uuid4().hex[:8]}")
        result = await backtest_as(as_bob, anonymous, user_id=None)
        assert result["status"] == "rejected" and "user_id" in result["errors"][0]["message"]
        # Alice's source hash is unknown to bob.
        sha = hashlib.sha256(code.encode()).hexdigest()
        by_hash = client.request(
            id=f"{bob}.{uuid.uuid4().hex[:8]}",
            symbols=["BTCUSDT"],
            strategy={"source_sha256": sha, "class": "Quieter"},
        )
        result = await backtest_as(as_bob, by_hash, user_id=bob)
        assert result["status"] == "rejected"
        assert f"no uploaded source has sha256 {sha}" in result["errors"][0]["message"]
        # A request for alice's id changes nothing of hers (and is answered nowhere).
        channel = await as_bob.channel()
        await publish(channel, {**mine, "initial_cash": 1.0}, user_id=bob)
        await channel.close()
        scheduler = tenants.stack.of("scheduler")[0]
        async with asyncio.timeout(60):
            while not any(
                r.get("backtest_id") == mine["id"] and r.get("tenant") == bob
                for r in scheduler.logged(IGNORED)
            ):
                await asyncio.sleep(0.2)
        again = await http.get(f"/backtests/{mine['id']}", headers=tenants.auth(alice))
        assert again.json() == seen.json()
        # Alice's own different request with that id: refused where she (only) may listen.
        channel = await as_alice.channel()
        inbox = await channel.declare_queue("", exclusive=True)
        await inbox.bind("backtest.results", routing_key=f"duplicate/{mine['id']}")
        await publish(channel, {**mine, "initial_cash": 2.0}, user_id=alice)
        refusal = await client.next_body(inbox, timeout_s=120)
        assert refusal["status"] == "rejected", refusal
        assert "is the id of another request" in refusal["errors"][0]["message"]
        await channel.close()
        assert (await http.get(f"/backtests/{mine['id']}", headers=tenants.auth(alice))).json() == (
            seen.json()
        )

        # The quota holds on the broker path too: one backtest running at once.
        channel = await as_alice.channel()
        slow = client.request(
            id=f"{alice}.slow", symbols=["BTCUSDT"], strategy=SLEEPY, initial_cash=4_321
        )
        inbox = await client.listen(channel, slow["id"])
        await inbox.bind("backtest.events", routing_key=slow["id"])
        await publish(channel, slow, user_id=alice)
        refused_second = False
        async with asyncio.timeout(180), inbox.iterator() as messages:
            async for message in messages:  # one consumer: the queue lives as long as it does
                await message.ack()
                body = json.loads(message.body)
                if body.get("type") == "planned":  # admitted, now running: no room for more
                    second = client.request(id=f"{alice}.second", symbols=["BTCUSDT"])
                    result = await backtest_as(as_alice, second, user_id=alice)
                    assert result["status"] == "rejected", result
                    assert "1 backtest running at once" in result["errors"][0]["message"]
                    refused_second = True
                elif "type" not in body:
                    assert body["status"] == "completed", body
                    break
        assert refused_second
        await channel.close()
    finally:
        await as_alice.close()
        await as_bob.close()

    # The README's example client works with exactly these permissions.
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request(symbols=["ETHUSDT"])))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "publish_request.py"),
        str(path),
        env={**tenants.stack.env, "STRATORCH_AMQP_URL": tenants.urls[alice]},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=180)
    assert process.returncode == 0, stdout.decode() + stderr.decode()
    assert stdout.decode().startswith(f"backtest {alice}.") and ": completed" in stdout.decode()


async def test_publishing_for_a_tenant_without_the_impersonator_tag_says_so(
    tenants: Tenants,
) -> None:
    # What a gateway whose RabbitMQ user lacks the tag runs into (the HTTP client gets 503).
    async with RabbitBus(tenants.urls[tenants.alice]) as bus:
        with pytest.raises(BrokerRefused, match="impersonator"):
            await bus.publish(
                "backtest.requests",
                "client",
                b"{}",
                message_id="m",
                correlation_id="c",
                user_id=tenants.bob,
            )


def test_stratorch_connect_as_a_tenant_on_either_path(tenants: Tenants) -> None:
    """The client with a tenant's own credentials: a RabbitMQ user with exactly the README's
    permissions (its ids, queues and bindings all `<user>.`), and the API token."""
    import stratorch  # here: the rest of this module is what a client of its own does

    alice, gateway = tenants.alice, tenants.stack.gateway_url
    week = {"start": "2021-05-01", "end": "2021-05-08"}
    with stratorch.connect(tenants.urls[alice]) as stack:
        done = stack.backtest("sma_cross", ["BTCUSDT"], params={"fast": 6}, **week)
    assert done.status == "completed" and done.id.startswith(f"{alice}.")

    with stratorch.connect(gateway, token=tenants.tokens[alice]) as stack:
        assert stack.status(done.id).status == "completed"  # hers, through the gateway too
    bob = tenants.tokens[tenants.bob]
    with stratorch.connect(gateway, token=bob) as stack, pytest.raises(stratorch.UnknownBacktest):
        stack.status(done.id)  # not bob's
    wrong = pytest.raises(stratorch.StackRefused, match="STRATORCH_API_TOKEN")
    with stratorch.connect(gateway, token="not-a-token") as stack, wrong:
        stack.status(done.id)
