"""The scheduler's tenant checks: what it answers before it plans anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from services.scheduler.handler import handle
from shared import topology
from shared.messages import BacktestResult
from shared.ports import CandleSource, Ports
from shared.sandbox.port import Sandbox
from shared.store import FileStore
from shared.tenancy import Admission, Quota


def raw(backtest_id: str, **overrides: Any) -> bytes:
    request = {
        "id": backtest_id,
        "strategy": "sma_cross",
        "symbols": ["BTCUSDT", "ETHUSDT"],
        "interval": "1h",
        "start": "2021-01-01",
        "end": "2021-02-01",
        **overrides,
    }
    return json.dumps(request).encode()


def ports(tmp_path: Path) -> Ports:
    """No candles, no sandbox: every answer here comes before planning needs them."""
    nothing = cast(Any, None)
    return Ports(
        candles=cast(CandleSource, nothing),
        sandbox=cast(Sandbox, nothing),
        store=FileStore(tmp_path),
    )


def result_of(out: list[Any]) -> BacktestResult:
    [result] = [o.message for o in out if o.exchange == topology.RESULTS]
    assert isinstance(result, BacktestResult)
    return result


async def test_a_request_without_a_tenant_is_rejected_and_claims_no_id(tmp_path: Path) -> None:
    p = ports(tmp_path)
    result = result_of(await handle(raw("bt-1"), p, tenant=None))
    assert result.status == "rejected" and "user_id" in result.errors[0].message
    assert await p.store.owner("bt-1") is None and await p.store.get_result("bt-1") is None


async def test_another_tenants_id_is_left_alone_and_answered_nowhere(tmp_path: Path) -> None:
    p = ports(tmp_path)
    await p.store.admit("alice", "bt-1", 2, Quota())
    for body in (raw("bt-1"), raw("bt-1", symbols=[]), b"{not json"):
        assert await handle(body, p, tenant="bob", correlation_id="bt-1") == []
        assert await handle(body, p, tenant=None, correlation_id="bt-1") == []
    assert await p.store.owner("bt-1") == "alice" and await p.store.get_result("bt-1") is None


async def test_past_its_quota_a_request_is_rejected_saying_which_limit(tmp_path: Path) -> None:
    p = ports(tmp_path)
    await p.store.admit("alice", "bt-1", 2, Quota(running=1))
    result = result_of(await handle(raw("bt-2"), p, tenant="alice", quota=Quota(running=1)))
    assert result.status == "rejected" and "1 backtest running at once" in result.errors[0].message
    assert await p.store.owner("bt-2") == "alice"  # its rejection is alice's to read
    result = result_of(await handle(raw("bt-3"), p, tenant="bob", quota=Quota(units=1)))
    assert result.status == "rejected" and "split it" in result.errors[0].message
    # A backtest admitted and then rejected (an unknown hash) ends: it no longer counts.
    unknown = {"source_sha256": "0" * 64, "class": "S"}
    result = result_of(
        await handle(raw("bt-4", strategy=unknown), p, tenant="bob", quota=Quota(running=1))
    )
    assert result.status == "rejected" and "no uploaded source" in result.errors[0].message
    assert await p.store.owner("bt-4") == "bob"
    assert await p.store.admit("bob", "bt-5", 1, Quota(running=1)) is Admission.ADMITTED
