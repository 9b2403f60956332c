"""The gateway handler: validation answered at once, uploaded code stored before publishing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.gateway.handler import submit
from shared import topology
from shared.errors import RequestRejected
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
    request, [out] = await submit(raw.encode(), store)
    sha = hashlib.sha256(CODE.encode()).hexdigest()
    assert request.strategy.source is None and request.strategy.source_sha256 == sha
    assert await store.get_source(sha) == CODE
    assert out.exchange == topology.REQUESTS and out.routing_key == request.id
