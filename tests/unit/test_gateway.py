"""The gateway handler: validation answered at once, uploaded code stored and the id taken
before publishing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.gateway.handler import submit
from shared import topology
from shared.errors import IdTaken, RequestRejected
from shared.messages import BacktestRequest
from shared.store import FileStore

CODE = "from shared.strategy import BaseStrategy\nclass S(BaseStrategy):\n    pass\n"


async def test_a_bad_request_is_rejected_with_every_field_named(tmp_path: Path) -> None:
    with pytest.raises(RequestRejected) as caught:
        await submit(b'{"symbols": [], "interval": "2h30"}', FileStore(tmp_path))
    for field in ("strategy", "symbols", "interval", "start", "end"):
        assert field in caught.value.message


async def test_uploaded_source_is_stored_and_published_by_hash(tmp_path: Path) -> None:
    raw = BacktestRequest.model_validate(
        {
            "strategy": {"source": CODE, "class": "S"},
            "symbols": ["BTCUSDT"],
            "interval": "1h",
            "start": "2021-01-01",
            "end": "2021-02-01",
        }
    ).model_dump_json(by_alias=True)
    store = FileStore(tmp_path)
    request, [out], new = await submit(raw.encode(), store)
    assert new
    sha = hashlib.sha256(CODE.encode()).hexdigest()
    assert request.strategy.source is None and request.strategy.source_sha256 == sha
    assert await store.get_source(sha) == CODE
    assert out.exchange == topology.REQUESTS and out.routing_key == request.id


def body(**overrides: object) -> bytes:
    request = {
        "id": "bt-1",
        "strategy": {"source": CODE, "class": "S"},
        "symbols": ["BTCUSDT"],
        "interval": "1h",
        "start": "2021-01-01",
        "end": "2021-02-01",
        **overrides,
    }
    return BacktestRequest.model_validate(request).model_dump_json(by_alias=True).encode()


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

    await store.put_plan("bt-1", {"units": {}})  # the scheduler planned it
    assert (await submit(body(), store)).outgoing == []


async def test_a_different_request_with_a_taken_id_is_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    first = await submit(body(), store)
    with pytest.raises(IdTaken) as caught:
        await submit(body(initial_cash=5.0), store)
    assert "'bt-1'" in caught.value.message and caught.value.kind == "rejected"
    assert await store.get_accepted("bt-1") == first.request.fingerprint()


async def test_an_invalid_request_takes_no_id(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(RequestRejected):
        await submit(b'{"id": "bt-2", "symbols": []}', store)
    assert await store.get_accepted("bt-2") is None
