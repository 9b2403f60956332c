"""What every :class:`shared.store.Store` promises about leases and the WAL, as checks that
``tests/unit/test_store.py`` (the file store) and ``tests/integration/test_mongo.py`` (MongoDB)
run on their own stores. Each ``stores`` list is several stores on the same state, as several
portfolio_sim processes would have."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from shared.messages import BacktestRequest, Plan
from shared.sandbox.port import StrategyInfo
from shared.store import Store


def plan(backtest_id: str = "bt1", **fields: Any) -> Plan:
    """A plan as the scheduler stores it, with ``fields`` changed."""
    request = BacktestRequest.model_validate(
        {
            "id": backtest_id,
            "strategy": {"source_sha256": "ab" * 32, "class": "S", "params": {"n": 3}},
            "symbols": ["BTCUSDT", "ETHUSDT"],
            "interval": "1h",
            "start": "2021-01-01",
            "end": "2021-02-01",
        }
    )
    values: dict[str, Any] = {
        "request": request,
        "lookback": 50,
        "cache_key": "cd" * 32,
        "units": {"u0000": ["BTCUSDT"], "u0001": ["ETHUSDT"]},
        "deadline_ms": 1_700_000_000_000,
    }
    return Plan.model_validate({**values, **fields})


async def plan_is_read_back_as_stored_and_replaced(store: Store) -> None:
    assert await store.get_plan("bt1") is None
    first = plan()
    await store.put_plan(first)
    assert await store.get_plan("bt1") == first
    again = plan(lookback=51)
    await store.put_plan(again)
    assert await store.get_plan("bt1") == again
    assert await store.get_plan("bt2") is None


async def description_is_read_back(store: Store) -> None:
    assert await store.get_described("k1") is None
    info = StrategyInfo(lookback=51, units=[["BTCUSDT", "ETHUSDT"], ["SOLUSDT"]], vectorized=False)
    await store.put_described("k1", info)
    await store.put_described("k1", info)  # described again: the same answer
    assert await store.get_described("k1") == info
    assert await store.get_described("k2") is None


async def sweep_children_are_counted_once(store: Store) -> None:
    assert await store.sweep_children_done("sw") == 0
    assert await store.sweep_child_done("sw", "sw:c0000") == 1
    assert await store.sweep_child_done("sw", "sw:c0000") == 1  # a redelivered ending
    assert await store.sweep_child_done("sw", "sw:c0001") == 2
    assert await store.sweep_children_done("sw") == 2


async def lease_is_taken_by_exactly_one(stores: list[Store]) -> None:
    """Of many callers racing for a free lease, or for a lapsed one, one gets it; another
    gets it only once that one's lease has lapsed (a claim slower than the lease, on a
    loaded machine, may take over legitimately)."""
    for backtest_id in ("free", "lapsed"):
        if backtest_id == "lapsed":
            await stores[0].claim(backtest_id, "crashed")
            await asyncio.sleep(stores[0].lease_s + 0.2)
        owners = [f"owner{i}" for i in range(12)]
        leases = await asyncio.gather(
            *(stores[i % len(stores)].claim(backtest_id, o) for i, o in enumerate(owners))
        )
        won = sorted(
            {lease for o, lease in zip(owners, leases, strict=True) if lease.owner == o},
            key=lambda lease: lease.expires_at,
        )
        assert won, (backtest_id, leases)
        for before, after in itertools.pairwise(won):  # never two unlapsed leases at once
            taken_at = after.expires_at - stores[0].lease_s
            assert taken_at >= before.expires_at - 0.002, (backtest_id, leases)  # BSON: ms
        assert {lease.owner for lease in leases} <= {lease.owner for lease in won}
        # Whoever looks now sees the last winner's lease, until it lapses.
        again = await stores[-1].claim(backtest_id, "latecomer")
        assert again.owner == won[-1].owner, (again, won)


async def lease_is_renewed_by_its_owner_and_lost_after_it_lapses(stores: list[Store]) -> None:
    a, b = stores[0], stores[-1]
    first = await a.claim("bt1", "A")
    assert first.owner == "A"
    assert first.expires_at <= time.time() + a.lease_s + 1
    assert (await b.claim("bt1", "B")).owner == "A"  # held: B may only wait
    await asyncio.sleep(a.lease_s / 2)
    renewed = await a.claim("bt1", "A")
    assert renewed.owner == "A" and renewed.expires_at > first.expires_at
    await asyncio.sleep(a.lease_s / 2 + 0.2)
    assert (await b.claim("bt1", "B")).owner == "A"  # renewed: still A's
    await asyncio.sleep(a.lease_s + 0.2)  # A stops renewing: it crashed
    taken = await b.claim("bt1", "B")
    assert taken.owner == "B"
    assert (await a.claim("bt1", "A")).owner == "B"  # A's renewal finds it lost
    assert (await b.claim("bt1", "B")).owner == "B"
    assert (await a.claim("bt2", "A")).owner == "A"  # leases are per backtest


def _records(seqs: range) -> list[dict[str, Any]]:
    return [
        {"seq": i, "time": 1_600_000_000_000 + i, "event": "entry", "price": i / 3, "n": None}
        for i in seqs
    ]


async def wal_is_appended_in_order_and_kept(store: Store) -> None:
    assert await store.get_wal("bt1") == []
    await store.put_wal("bt1", _records(range(0, 7000)))
    await store.put_wal("bt1", _records(range(7000, 12_000)))
    # A replay that lost its lease may write what a taker wrote too: nothing changes.
    await store.put_wal("bt1", _records(range(10_000, 12_000)))
    await store.put_wal("bt1", [])
    await store.put_wal("bt2", _records(range(3)))
    assert await store.get_wal("bt1") == _records(range(12_000))
    assert await store.get_wal("bt2") == _records(range(3))
