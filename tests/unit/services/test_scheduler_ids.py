"""The scheduler's id and tenant rules, answered before it plans anything: the first request
with an id owns it; another request with that id is answered on its own routing key and can
neither end nor join the owner's backtest; another tenant's id is left alone; quotas hold."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from services.scheduler.handler import handle
from shared import topology
from shared.candles import ParquetCandleStore
from shared.messages import BacktestResult, WorkUnit
from shared.ports import CandleSource, Ports
from shared.sandbox.port import Sandbox
from shared.sandbox.process import ProcessSandbox
from shared.store import FileStore
from shared.tenancy import Admission, Quota
from stratorch.paths import SAMPLE_STORE

REQUEST: dict[str, Any] = {
    "id": "owned",
    "strategy": {"builtin": "sma_cross"},
    "symbols": ["BTCUSDT", "ETHUSDT"],
    "interval": "1h",
    "start": "2021-01-01",
    "end": "2021-01-15",
}


@pytest.fixture
async def ports(tmp_path: Path) -> AsyncIterator[Ports]:
    async with ProcessSandbox() as sandbox:
        yield Ports(ParquetCandleStore(SAMPLE_STORE), sandbox, FileStore(tmp_path))


def raw(**overrides: Any) -> bytes:
    return json.dumps({**REQUEST, **overrides}).encode()


async def test_another_request_with_a_taken_id_never_touches_the_owner(ports: Ports) -> None:
    owner = await handle(raw(), ports, correlation_id="owned")
    units = [o.message for o in owner if o.exchange == topology.WORK]
    assert [u.symbols for u in units if isinstance(u, WorkUnit)] == [["BTCUSDT"], ["ETHUSDT"]]
    plan = await ports.store.get_plan("owned")

    for other in (raw(symbols=["SOLUSDT"]), raw(symbols="not a list"), b"{oops"):
        [answer] = await handle(other, ports, correlation_id="owned")
        assert answer.exchange == topology.RESULTS
        assert answer.routing_key == "duplicate/owned"  # not "owned": the owner's listeners
        assert isinstance(answer.message, BacktestResult)
        assert answer.message.status == "rejected" and answer.message.backtest_id == "owned"
        assert "'owned' is the id of another request" in answer.message.errors[0].message

    # Nothing of the others was stored: the owner is still running, with its own plan.
    assert await ports.store.get_result("owned") is None
    assert await ports.store.get_plan("owned") == plan


async def test_the_same_request_again_gets_the_outcome_that_stands(ports: Ports) -> None:
    first = await handle(raw(strategy={"builtin": "nope"}), ports)
    [result, _finished] = first
    assert isinstance(result.message, BacktestResult) and result.message.status == "rejected"
    again = await handle(raw(strategy={"builtin": "nope"}), ports)
    assert [(o.exchange, o.routing_key, o.message) for o in again] == [
        (o.exchange, o.routing_key, o.message) for o in first
    ]


async def test_a_request_without_id_takes_its_messages_correlation_id(ports: Ports) -> None:
    body = {k: v for k, v in REQUEST.items() if k != "id"}
    out = await handle(json.dumps(body).encode(), ports, correlation_id="from-message")
    assert {o.backtest_id for o in out} == {"from-message"}


def tenant_raw(backtest_id: str, **overrides: Any) -> bytes:
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


def bare_ports(tmp_path: Path) -> Ports:
    """No candles, no sandbox: every answer here comes before planning needs them."""
    nothing = cast(Any, None)
    return Ports(
        candles=cast(CandleSource, nothing),
        sandbox=cast(Sandbox, nothing),
        store=FileStore(tmp_path),
    )


async def tenant_of(p: Ports, backtest_id: str) -> str | None:
    owner = await p.store.get_accepted(backtest_id)
    return None if owner is None else owner.tenant


def result_of(out: list[Any]) -> BacktestResult:
    [result] = [o.message for o in out if o.exchange == topology.RESULTS]
    assert isinstance(result, BacktestResult)
    return result


async def test_a_request_without_a_tenant_is_rejected_and_claims_no_id(tmp_path: Path) -> None:
    p = bare_ports(tmp_path)
    result = result_of(await handle(tenant_raw("bt-1"), p, tenant=None))
    assert result.status == "rejected" and "user_id" in result.errors[0].message
    assert await p.store.get_accepted("bt-1") is None and await p.store.get_result("bt-1") is None


async def test_another_tenants_id_is_left_alone_and_answered_nowhere(tmp_path: Path) -> None:
    p = bare_ports(tmp_path)
    await p.store.accept("bt-1", "0" * 64, tenant="alice")
    for body in (tenant_raw("bt-1"), tenant_raw("bt-1", symbols=[]), b"{not json"):
        assert await handle(body, p, tenant="bob", correlation_id="bt-1") == []
        assert await handle(body, p, tenant=None, correlation_id="bt-1") == []
    assert await tenant_of(p, "bt-1") == "alice" and await p.store.get_result("bt-1") is None


async def test_past_its_quota_a_request_is_rejected_saying_which_limit(tmp_path: Path) -> None:
    p = bare_ports(tmp_path)
    await p.store.admit("alice", "bt-1", 2, Quota(running=1))
    result = result_of(await handle(tenant_raw("bt-2"), p, tenant="alice", quota=Quota(running=1)))
    assert result.status == "rejected" and "1 backtest running at once" in result.errors[0].message
    assert await tenant_of(p, "bt-2") == "alice"  # its rejection is alice's to read
    result = result_of(await handle(tenant_raw("bt-3"), p, tenant="bob", quota=Quota(units=1)))
    assert result.status == "rejected" and "split it" in result.errors[0].message
    # A backtest admitted and then rejected (an unknown hash) ends: it no longer counts.
    unknown = {"source_sha256": "0" * 64, "class": "S"}
    result = result_of(
        await handle(tenant_raw("bt-4", strategy=unknown), p, tenant="bob", quota=Quota(running=1))
    )
    assert result.status == "rejected" and "no uploaded source" in result.errors[0].message
    assert await tenant_of(p, "bt-4") == "bob"
    assert await p.store.admit("bob", "bt-5", 1, Quota(running=1)) is Admission.ADMITTED


async def test_a_sweep_counts_every_combinations_units_against_the_quota(
    tmp_path: Path,
) -> None:
    p = bare_ports(tmp_path)
    grid = {"grid": {"fast": [5, 10, 15], "slow": [30, 50]}}  # 6 combinations × 2 symbols
    result = result_of(
        await handle(tenant_raw("sw-1", sweep=grid), p, tenant="bob", quota=Quota(units=11))
    )
    assert result.status == "rejected"
    assert "a backtest of 12 units (one per symbol, per combination" in result.errors[0].message
    assert await p.store.admit("bob", "sw-2", 12, Quota(units=12)) is Admission.ADMITTED


async def test_a_tenants_other_request_with_its_own_id_is_refused_where_it_can_listen(
    tmp_path: Path,
) -> None:
    p = bare_ports(tmp_path)
    await p.store.accept("alice.1", "0" * 64, tenant="alice")
    [answer] = await handle(tenant_raw("alice.1"), p, tenant="alice")
    assert answer.routing_key == "duplicate/alice.1"  # alice may bind it; bob may not
    assert result_of([answer]).status == "rejected"
    assert await handle(tenant_raw("alice.1"), p, tenant="bob") == []
    assert await p.store.get_result("alice.1") is None
