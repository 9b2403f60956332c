"""The gateway: validation answered at once, uploaded code stored and the id taken before
publishing; API tokens, each tenant seeing only its own backtests, quotas."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.gateway.app import create_app
from services.gateway.handler import submit
from services.runtime import Context
from shared import topology
from shared.bus import Delivery, InMemoryBus
from shared.errors import IdTaken, RequestRejected
from shared.messages import BacktestRequest, BacktestResult
from shared.outcome import finish
from shared.settings import Settings
from shared.store import FileStore, Owner
from shared.tenancy import ANONYMOUS, hash_token
from tests import store_contract

CODE = "from shared.strategy import BaseStrategy\nclass S(BaseStrategy):\n    pass\n"


async def test_uploaded_source_is_stored_and_published_by_hash(tmp_path: Path) -> None:
    sent = BacktestRequest.model_validate(
        {
            "strategy": {"source": CODE, "class": "S"},
            "symbols": ["BTCUSDT"],
            "interval": "1h",
            "start": "2021-01-01",
            "end": "2021-02-01",
        }
    )
    store = FileStore(tmp_path)
    request, [out], new = await submit(sent, store)
    assert new
    sha = hashlib.sha256(CODE.encode()).hexdigest()
    assert request.strategy.source is None and request.strategy.source_sha256 == sha
    assert await store.get_source(sha) == CODE
    assert out.exchange == topology.REQUESTS and out.routing_key == request.id


def body(**overrides: object) -> BacktestRequest:
    request = {
        "id": "bt-1",
        "strategy": {"source": CODE, "class": "S"},
        "symbols": ["BTCUSDT"],
        "interval": "1h",
        "start": "2021-01-01",
        "end": "2021-02-01",
        **overrides,
    }
    return BacktestRequest.model_validate(request)


async def test_the_same_request_again_is_the_same_backtest(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    first = await submit(body(), store)
    # The same request, the code named by hash this time: a client's retry.
    sha = hashlib.sha256(CODE.encode()).hexdigest()
    again = await submit(body(strategy={"source_sha256": sha, "class": "S"}), store)
    assert first.new and not again.new
    assert again.request == first.request
    # Still queued: published again (the first publish may have been lost).
    assert [o.message for o in again.outgoing] == [first.request]

    await store.put_plan(store_contract.plan("bt-1"))  # the scheduler planned it
    assert (await submit(body(), store)).outgoing == []


async def test_a_different_request_with_a_taken_id_is_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    first = await submit(body(), store)
    with pytest.raises(IdTaken) as caught:
        await submit(body(initial_cash=5.0), store)
    assert "'bt-1'" in caught.value.message and caught.value.kind == "rejected"
    assert await store.get_accepted("bt-1") == Owner(first.request.fingerprint(), ANONYMOUS)


async def test_code_never_uploaded_is_rejected_naming_the_field(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(RequestRejected) as caught:
        await submit(body(id="bt-2", strategy={"source_sha256": "0" * 64, "class": "S"}), store)
    [field] = caught.value.fields
    assert field.loc == ("strategy", "source_sha256") and "send the code" in field.message
    assert caught.value.message == f"strategy.source_sha256: {field.message}"
    assert await store.get_accepted("bt-2") is None


# -- tenants: tokens, scoping, quotas (the app in process, on a file store and in-memory bus) --

TOKENS = {"alice": "alice-secret-token", "bob": "bob-secret-token"}


def settings(**overrides: Any) -> Settings:
    tokens = ",".join(f"{tenant}:{hash_token(token)}" for tenant, token in TOKENS.items())
    return Settings(auth="tokens", api_tokens=tokens, **overrides)


def request_body(**overrides: Any) -> dict[str, Any]:
    return {
        "strategy": "sma_cross",
        "symbols": ["BTCUSDT", "ETHUSDT"],
        "interval": "1h",
        "start": "2021-01-01",
        "end": "2021-02-01",
        **overrides,
    }


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


class Gateway:
    """The app, what it published, and its store."""

    def __init__(self, http: httpx.AsyncClient, bus: InMemoryBus, store: FileStore) -> None:
        self.http, self.bus, self.store = http, bus, store
        bus.bind("published", topology.REQUESTS, "#")

    async def published(self) -> list[Delivery]:
        found = []
        async with contextlib.aclosing(self.bus.consume("published")) as deliveries:
            while self.bus._queues["published"].qsize():
                delivery = await anext(deliveries)
                await delivery.ack()
                found.append(delivery)
        return found


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, config: Settings) -> AsyncIterator[Gateway]:
    bus, store = InMemoryBus(), FileStore(tmp_path)

    @contextlib.asynccontextmanager
    async def resources(s: Settings) -> AsyncIterator[Context]:
        yield Context(s, bus=bus, store=store)  # type: ignore[arg-type]

    app = create_app(config, resources=resources)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            yield Gateway(http, bus, store)


async def test_every_backtest_endpoint_wants_a_valid_token(tmp_path: Path) -> None:
    async with gateway(tmp_path, settings()) as gw:
        calls = [
            ("POST", "/backtests", request_body()),
            ("GET", "/backtests/some-id", None),
            ("GET", "/backtests/some-id/events", None),
            ("DELETE", "/backtests/some-id", None),
        ]
        for method, url, body in calls:
            for headers in (
                {},
                {"Authorization": "Bearer not-a-token"},
                {"Authorization": f"Basic {TOKENS['alice']}"},
                {"Authorization": f"Bearer {hash_token(TOKENS['alice'])}"},  # the hash is no token
            ):
                response = await gw.http.request(method, url, json=body, headers=headers)
                assert response.status_code == 401, (method, url, headers, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")
        assert await gw.published() == []
        # Open: they tell nothing about any tenant.
        assert (await gw.http.get("/openapi.json")).status_code == 200
        assert (await gw.http.get("/docs")).status_code == 200


async def test_a_tenant_sees_its_own_backtests_and_another_tenant_gets_404(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, settings()) as gw:
        response = await gw.http.post("/backtests", json=request_body(), headers=auth("alice"))
        assert response.status_code == 202, response.text
        backtest_id = response.json()["id"]
        assert backtest_id.startswith("alice.")  # a generated id names its tenant
        [sent] = await gw.published()
        assert sent.user_id == "alice"  # the scheduler learns the tenant from the broker

        mine = await gw.http.get(f"/backtests/{backtest_id}", headers=auth("alice"))
        assert mine.status_code == 200 and mine.json()["status"] == "queued"
        for url in (f"/backtests/{backtest_id}", f"/backtests/{backtest_id}/events"):
            theirs = await gw.http.get(url, headers=auth("bob"))
            unknown = await gw.http.get(url.replace(backtest_id, "no-such-id"), headers=auth("bob"))
            assert theirs.status_code == unknown.status_code == 404
            assert theirs.json()["detail"] == unknown.json()["detail"].replace(
                "no-such-id", backtest_id
            )

        # Bob may not take over alice's id either, and alice's backtest stays hers.
        taken = await gw.http.post(
            "/backtests", json=request_body(id=backtest_id), headers=auth("bob")
        )
        assert taken.status_code == 409
        owner = await gw.store.get_accepted(backtest_id)
        assert owner is not None and owner.tenant == "alice"
        assert await gw.published() == []

        # Nor cancel it: 404, and no cancel goes out; alice's own goes out as hers.
        gw.bus.bind("cancels", topology.CANCEL, "#")
        assert (
            await gw.http.delete(f"/backtests/{backtest_id}", headers=auth("bob"))
        ).status_code == 404
        assert gw.bus._queues["cancels"].qsize() == 0
        cancel = await gw.http.delete(f"/backtests/{backtest_id}", headers=auth("alice"))
        assert cancel.status_code == 202
        sent = gw.bus._queues["cancels"].get_nowait()
        assert sent.user_id == "alice" and sent.correlation_id == backtest_id


async def test_a_tenants_retry_is_its_backtest_and_a_taken_id_is_409_whoever_has_it(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, settings()) as gw:
        body = request_body(id="alice.mine")
        first = await gw.http.post("/backtests", json=body, headers=auth("alice"))
        assert first.status_code == 202, first.text
        again = await gw.http.post("/backtests", json=body, headers=auth("alice"))
        assert again.status_code == 200 and again.json() == first.json()
        # Still queued, so published again (the first publish may have been lost).
        assert [d.user_id for d in await gw.published()] == ["alice", "alice"]

        different = {**body, "initial_cash": 5.0}
        mine = await gw.http.post("/backtests", json=different, headers=auth("alice"))
        theirs = await gw.http.post("/backtests", json=body, headers=auth("bob"))
        assert mine.status_code == theirs.status_code == 409
        assert mine.json() == theirs.json()  # the same words: nothing of whose id it is
        assert mine.json()["detail"][0]["loc"] == ["id"]
        assert await gw.published() == []


async def test_another_tenants_source_hash_is_unknown(tmp_path: Path) -> None:
    async with gateway(tmp_path, settings()) as gw:
        upload = request_body(strategy={"source": CODE, "class": "S"})
        assert (await gw.http.post("/backtests", json=upload, headers=auth("alice"))).is_success
        sha = hashlib.sha256(CODE.encode()).hexdigest()
        never = "0" * 64

        by_hash = request_body(strategy={"source_sha256": sha, "class": "S"})
        assert (await gw.http.post("/backtests", json=by_hash, headers=auth("alice"))).is_success

        theirs = await gw.http.post("/backtests", json=by_hash, headers=auth("bob"))
        unknown = await gw.http.post(
            "/backtests",
            json=request_body(strategy={"source_sha256": never, "class": "S"}),
            headers=auth("bob"),
        )
        assert theirs.status_code == unknown.status_code == 422
        assert theirs.json()["detail"][0]["msg"] == unknown.json()["detail"][0]["msg"].replace(
            never, sha
        )
        # Uploading the same code makes it bob's too.
        assert (await gw.http.post("/backtests", json=upload, headers=auth("bob"))).is_success
        assert (await gw.http.post("/backtests", json=by_hash, headers=auth("bob"))).is_success


async def test_past_a_quota_the_answer_is_429_until_a_backtest_ends(tmp_path: Path) -> None:
    async with gateway(tmp_path, settings(tenant_max_running=2, tenant_max_units=3)) as gw:
        first = await gw.http.post("/backtests", json=request_body(), headers=auth("alice"))
        assert first.status_code == 202
        one = request_body(symbols=["BTCUSDT"])
        # 2 + 1 units fit; a third backtest is over "running at once".
        assert (await gw.http.post("/backtests", json=one, headers=auth("alice"))).is_success
        again = {**one, "id": "alice.again"}
        refused = await gw.http.post("/backtests", json=again, headers=auth("alice"))
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert "2 backtests running at once" in refused.json()["detail"]
        # Refused is not accepted: the id is unknown (and free for a later try).
        unknown = await gw.http.get("/backtests/alice.again", headers=auth("alice"))
        assert unknown.status_code == 404
        # Another tenant is not held up by alice's.
        assert (await gw.http.post("/backtests", json=one, headers=auth("bob"))).is_success

        # The first one ends: alice has room for 1 backtest of at most 2 units again.
        result = BacktestResult(backtest_id=first.json()["id"], status="cancelled")
        await finish(gw.store, result)
        too_many = request_body(symbols=["BTCUSDT", "ETHUSDT", "SOLUSDT"])
        refused = await gw.http.post("/backtests", json=too_many, headers=auth("alice"))
        assert refused.status_code == 429 and "3 units queued" in refused.json()["detail"]
        assert (await gw.http.post("/backtests", json=again, headers=auth("alice"))).is_success

        # A backtest bigger than the whole quota can never run: 422, not "retry later".
        huge = request_body(symbols=["BTCUSDT", "ETHUSDT", "SOLUSDT", "ADAUSDT"])
        answer = await gw.http.post("/backtests", json=huge, headers=auth("bob"))
        assert answer.status_code == 422 and "split it" in answer.json()["detail"][0]["msg"]


async def test_without_tokens_the_gateway_refuses_to_start_unless_auth_is_off(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError, match="STRATORCH_API_TOKENS"):
        create_app(Settings(auth="tokens", api_tokens=""))
    with pytest.raises(ValueError, match="tenant:sha256hex"):
        Settings(api_tokens="alice:plaintext-token")
    async with gateway(tmp_path, Settings(auth="off")) as gw:
        response = await gw.http.post("/backtests", json=request_body())
        assert response.status_code == 202
        [sent] = await gw.published()
        assert sent.user_id is None  # the scheduler takes it as "anonymous"
        assert (await gw.http.get(response.json()["status_url"])).status_code == 200
        # A backtest stored before owners were recorded is anonymous's; an unknown id is 404.
        await gw.store.finish(BacktestResult(backtest_id="legacy-1", status="completed"))
        assert (await gw.http.get("/backtests/legacy-1")).status_code == 200
        assert (await gw.http.get("/backtests/never-1")).status_code == 404


async def test_a_backtest_without_an_owner_is_no_tenants(tmp_path: Path) -> None:
    async with gateway(tmp_path, settings()) as gw:
        await gw.store.finish(BacktestResult(backtest_id="legacy-1", status="completed"))
        for url in ("/backtests/legacy-1", "/backtests/legacy-1/events"):
            assert (await gw.http.get(url, headers=auth("alice"))).status_code == 404


# -- the body: a BacktestRequest, validated by FastAPI, refused one entry per field --------------


async def test_a_bad_body_is_422_naming_every_field_and_takes_no_id(tmp_path: Path) -> None:
    async with gateway(tmp_path, settings()) as gw:
        bad = {"id": "alice.bad", "strategy": {"module": "m"}, "symbols": [], "interval": "2h30"}
        # Who may not submit learns nothing of what is wrong with the request.
        assert (await gw.http.post("/backtests", json=bad)).status_code == 401

        answer = await gw.http.post("/backtests", json=bad, headers=auth("alice"))
        assert answer.status_code == 422
        detail = answer.json()["detail"]
        locs = [e["loc"] for e in detail]
        assert locs == [["strategy"], ["symbols"], ["interval"], ["start"], ["end"]]
        assert detail[0]["msg"] == "'module' needs 'class': the name of the class to load"
        together = await gw.http.post(
            "/backtests", json=request_body(end="2020-01-01"), headers=auth("alice")
        )
        assert together.status_code == 422
        [whole] = together.json()["detail"]
        assert whole["loc"] == ["body"] and "must be after 'start'" in whole["msg"]

        not_json = {"content-type": "application/json", **auth("alice")}
        garbled = await gw.http.post("/backtests", content=b"{nope", headers=not_json)
        assert garbled.status_code == 422
        assert garbled.json()["detail"][0]["msg"].startswith("Invalid JSON")
        as_text = {"content-type": "text/plain", **auth("alice")}
        text = await gw.http.post("/backtests", content=b"{}", headers=as_text)
        assert text.status_code == 422
        assert "content-type: application/json" in text.json()["detail"][0]["msg"]

        huge = request_body(strategy={"source": "#" * 2_000_000, "class": "S"})
        assert (
            await gw.http.post("/backtests", json=huge, headers=auth("alice"))
        ).status_code == 413

        assert await gw.store.get_accepted("alice.bad") is None
        assert await gw.published() == []


async def test_the_api_document_describes_the_request_and_the_rejection(tmp_path: Path) -> None:
    async with gateway(tmp_path, settings()) as gw:
        doc = (await gw.http.get("/openapi.json")).json()
    post = doc["paths"]["/backtests"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/BacktestRequest"}
    schemas = doc["components"]["schemas"]
    assert set(schemas["BacktestRequest"]["properties"]) == set(BacktestRequest.model_fields)
    rejection = post["responses"]["422"]["content"]["application/json"]["schema"]
    assert rejection == {"$ref": "#/components/schemas/Rejection"}
    status = doc["paths"]["/backtests/{backtest_id}"]["get"]["responses"]["200"]
    assert status["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/BacktestStatus"
    }
    assert "fields" in schemas["ErrorInfo"]["properties"]
