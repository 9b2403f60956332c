"""The file store of ``stratorch run``: what a finished backtest leaves behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from shared.messages import BacktestResult, ProposalBatch, SymbolBars
from shared.store import FileStore
from shared.tenancy import ANONYMOUS
from tests import store_contract


async def test_a_backtest_ends_once_and_the_first_outcome_stands(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    first = BacktestResult(backtest_id="bt1", status="cancelled")
    later = BacktestResult(backtest_id="bt1", status="completed")

    assert await store.finish(first) == first
    assert await store.finish(later) == first
    assert await store.get_result("bt1") == first
    assert sorted(p.name for p in (tmp_path / "backtests" / "bt1").iterdir()) == ["result.json"]


async def test_racing_outcomes_leave_exactly_one(tmp_path: Path) -> None:
    stores = [FileStore(tmp_path) for _ in range(3)]
    outcomes = [BacktestResult(backtest_id="bt1", status=s) for s in ("failed", "cancelled")]
    stood = await asyncio.gather(*(st.finish(o) for st in stores for o in outcomes))
    assert len({r.status for r in stood}) == 1
    assert await stores[0].get_result("bt1") == stood[0]


async def test_a_lease_is_taken_by_exactly_one_caller(tmp_path: Path) -> None:
    await store_contract.lease_is_taken_by_exactly_one(
        [FileStore(tmp_path, lease_s=1.0) for _ in range(3)]
    )


async def test_a_lease_is_renewed_by_its_owner_and_taken_over_once_it_lapses(
    tmp_path: Path,
) -> None:
    await store_contract.lease_is_renewed_by_its_owner_and_lost_after_it_lapses(
        [FileStore(tmp_path, lease_s=1.0) for _ in range(2)]
    )


async def test_a_plan_and_a_description_are_read_back_as_stored(tmp_path: Path) -> None:
    await store_contract.plan_is_read_back_as_stored_and_replaced(FileStore(tmp_path))
    await store_contract.description_is_read_back(FileStore(tmp_path))
    await store_contract.sweep_children_are_counted_once(FileStore(tmp_path))


async def test_the_wal_is_appended_in_order_and_kept(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store_contract.wal_is_appended_in_order_and_kept(store)
    # A crash mid-write leaves a torn last line: it is not part of the log, and the next
    # append replaces it.
    path = tmp_path / "backtests" / "bt2" / "wal.jsonl"
    with path.open("ab") as wal:
        wal.write(b'{"seq": 3, "time": 16')
    assert [r["seq"] for r in await store.get_wal("bt2")] == [0, 1, 2]
    await store.put_wal("bt2", [{"seq": 3, "event": "exit"}])
    assert [r["seq"] for r in await store.get_wal("bt2")] == [0, 1, 2, 3]
    assert path.read_bytes().endswith(b'{"seq": 3, "event": "exit"}\n')


async def test_an_ephemeral_store_keeps_its_wal_in_memory_until_the_backtest_ends(
    tmp_path: Path,
) -> None:
    """``stratorch run`` without ``--state``: the WAL holds as it does on disk, but nothing is
    written that no one could read after the run; the result is stored, its WAL let go."""
    store = FileStore(tmp_path, ephemeral=True)
    await store_contract.wal_is_appended_in_order_and_kept(store)
    assert not list(tmp_path.rglob("wal.jsonl"))
    result = BacktestResult(backtest_id="bt1", status="completed")
    assert await store.finish(result) == result
    assert await store.get_wal("bt1") == []
    assert len(await store.get_wal("bt2")) == 3  # another backtest's log stays
    await store.put_cached("key", result)
    assert await store.get_cached("key") is None  # no later run could look it up


async def test_the_same_code_uploaded_at_once_is_stored_whole(tmp_path: Path) -> None:
    """Uploads run in threads of one process: writes of one file must not share a temp file."""
    store = FileStore(tmp_path)
    code = "# the same strategy\n" * 50_000
    await asyncio.gather(*(store.put_source("a" * 64, code, tenant=ANONYMOUS) for _ in range(16)))
    assert await store.get_source("a" * 64) == code
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind


def _batch(unit_id: str, elapsed_s: float = 0.0) -> ProposalBatch:
    bars = SymbolBars.pack(np.array([0, 60_000]), np.array([1.5, 2.5]))
    return ProposalBatch(
        backtest_id="bt1",
        unit_id=unit_id,
        unit_count=3,
        symbols=["BTCUSDT"],
        bars={"BTCUSDT": bars},
        elapsed_s=elapsed_s,
    )


@pytest.mark.parametrize("ephemeral", [False, True])
async def test_batches_are_counted_once_per_unit_and_given_back_in_unit_order(
    tmp_path: Path, ephemeral: bool
) -> None:
    store = FileStore(tmp_path, ephemeral=ephemeral)
    assert [await store.add_batch(_batch(u)) for u in ("u2", "u1", "u2")] == [1, 2, 2]
    assert await store.units_done("bt1") == 2
    assert await store.batches("bt1") == [_batch("u1"), _batch("u2")]
    assert await store.batches("bt1") == [_batch("u1"), _batch("u2")]  # again: the same
    written = (tmp_path / "backtests" / "bt1" / "batches").exists()
    assert written is not ephemeral  # an ephemeral store's directory goes with the process


async def test_a_batch_rewritten_by_another_process_is_read_as_stored(tmp_path: Path) -> None:
    store, other = FileStore(tmp_path), FileStore(tmp_path)
    await store.add_batch(_batch("u1", elapsed_s=1.0))
    await other.add_batch(_batch("u1", elapsed_s=2.0))  # a redelivery handled elsewhere
    assert [b.elapsed_s for b in await store.batches("bt1")] == [2.0]
