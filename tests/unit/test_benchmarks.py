"""The benchmark harness's comparison is a fair one: on the harness's own data and runs,
``stratorch run`` makes exactly the trades, and ends with exactly the equity, of the numpy
reference written from the README's rules; vectorbt and backtesting.py (the ``bench`` extra)
make the same trades on one symbol. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import compare
from benchmarks.reference import Outcome
from benchmarks.synthetic import write_store


def run_pair(tmp_path: Path, symbols: int, bars: int, other: str) -> tuple[Outcome, Outcome]:
    store = tmp_path / "candles"
    names = write_store(store, symbols, bars)
    subject = compare.stratorch("stratorch", store, names, tmp_path)
    rival = compare.child(other, other, store, names)
    compare.run_all([subject, rival], tmp_path, repeat=1)
    assert not subject.failure and not rival.failure, (subject.failure, rival.failure)
    assert subject.result is not None and rival.result is not None
    return subject.result, rival.result


@pytest.mark.parametrize(("symbols", "bars"), [(1, 20_000), (3, 4_000)])
def test_stratorch_run_equals_the_numpy_reference(tmp_path: Path, symbols: int, bars: int) -> None:
    ours, reference = run_pair(tmp_path, symbols, bars, "reference")
    assert len(ours.trades) > 20 * symbols  # enough crossings for the check to mean something
    same, how = compare.agreement(ours, reference)
    assert same, how
    assert {t.exit_reason for t in ours.trades} >= {"take_profit", "signal"}


@pytest.mark.parametrize("engine", ["vectorbt-rust", "backtesting"])
def test_other_engines_make_the_same_trades_on_one_symbol(tmp_path: Path, engine: str) -> None:
    pytest.importorskip(engine.split("-")[0], reason="the bench extra is not installed")
    ours, theirs = run_pair(tmp_path, 1, 20_000, engine)
    key = [(t.symbol, t.entry_time, t.exit_time) for t in ours.trades]
    assert sorted(key) == sorted((t.symbol, t.entry_time, t.exit_time) for t in theirs.trades)
    assert theirs.final_equity == pytest.approx(ours.final_equity, rel=0.01)
