"""The file store of ``stratorch run``: what a finished backtest leaves behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shared.messages import BacktestResult
from shared.store import FileStore


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
