"""Parameter sweeps as a user runs them: expansion, ranking, walk-forward, `stratorch run`."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from shared.messages import BacktestEvent, BacktestRequest, BacktestResult, Sweep
from shared.outcome import finish
from shared.store import FileStore, accept_id
from shared.sweep.expand import combinations, expand
from stratorch.cli import _progress, main
from tests.conftest import ROOT
from tests.unit.test_cli import Run, example

SWEEP_EXAMPLE = ROOT / "examples" / "sweep.json"
WALK_FORWARD_EXAMPLE = ROOT / "examples" / "walk_forward.json"
GRID = {"fast": [5, 10], "slow": [30, 50]}


def small(**overrides: Any) -> dict[str, Any]:
    """The README's example on two symbols and two months: quick to run many times."""
    return example(**{"symbols": ["BTCUSDT", "ETHUSDT"], "end": "2021-03-01", **overrides})


def request_of(request: dict[str, Any]) -> BacktestRequest:
    return BacktestRequest.model_validate_json(json.dumps(request))


def sweep_of(spec: dict[str, Any]) -> Sweep:
    return Sweep.model_validate_json(json.dumps(spec))


def params_of(request: dict[str, Any], combo: dict[str, Any]) -> dict[str, Any]:
    return {**request["strategy"]["params"], **combo}


# -- expansion --------------------------------------------------------------------------------


def test_a_grid_runs_every_combination_the_last_param_fastest() -> None:
    sweep = sweep_of({"grid": {"a": [1, 2], "b": ["x", "y", "z"]}})
    assert combinations(sweep) == [{"a": a, "b": b} for a in (1, 2) for b in ("x", "y", "z")]


def test_a_random_sweep_is_reproducible_and_keeps_ints_ints() -> None:
    spec = {"random": {"n_bars": [5, 8], "pct": [0.01, 0.05]}, "n": 200, "seed": 7}
    drawn = combinations(sweep_of(spec))
    assert drawn == combinations(sweep_of(spec))
    assert drawn != combinations(sweep_of({**spec, "seed": 8}))
    assert len(drawn) == 200
    assert all(type(c["n_bars"]) is int and 5 <= c["n_bars"] <= 8 for c in drawn)
    assert all(type(c["pct"]) is float and 0.01 <= c["pct"] <= 0.05 for c in drawn)
    assert {c["n_bars"] for c in drawn} == {5, 6, 7, 8}  # both ends included


def test_children_are_ordinary_requests_with_the_combinations_params() -> None:
    request = request_of(small(id="sw", sweep={"grid": GRID}))
    plan, children = expand(request)
    assert [c.id for c in children] == ["sw:c0000", "sw:c0001", "sw:c0002", "sw:c0003"]
    assert [c.strategy.params for c in children] == [
        params_of(small(), {"fast": f, "slow": s}) for f in (5, 10) for s in (30, 50)
    ]
    assert all(c.sweep is None and c.start == request.start for c in children)
    assert plan.combinations == 4 and plan.metric == "sharpe"


@pytest.mark.parametrize(
    ("sweep", "metric", "field", "words"),
    [
        ({"random": {"fast": [10, 5]}, "n": 3}, None, "sweep", ["low <= high"]),
        ({"random": {"fast": [5, 10]}}, None, "sweep", ["'n'"]),
        ({"grid": {"fast": []}}, None, "sweep.grid.fast", ["at least 1"]),
        ({"grid": {"fast": [5]}, "random": {"slow": [1, 2]}}, None, "sweep", ["exactly one"]),
        ({"grid": {"fast": [5]}}, "shrape", "metric", ["sharpe"]),
        ({"grid": {"fast": list(range(100)), "slow": list(range(60))}}, None, "sweep", ["6000"]),
        ({"grid": {"fsat": [5, 10]}}, None, "sweep", ["fsat", "did you mean 'fast'"]),
        (
            {"grid": {"fast": [5]}, "walk_forward": {"train": "90d", "test": "30d", "step": "30d"}},
            None,
            "sweep.walk_forward",
            ["shorter than one train window"],
        ),
        (
            {"grid": {"fast": [5]}, "walk_forward": {"train": "9d", "test": "3d", "step": "1d"}},
            None,
            "sweep.walk_forward",
            ["may not overlap"],
        ),
    ],
)
def test_a_bad_sweep_is_rejected_naming_the_field(
    run_cli: Run, sweep: dict[str, Any], metric: str | None, field: str, words: list[str]
) -> None:
    request = small(sweep=sweep) if metric is None else small(sweep=sweep, metric=metric)
    code, result = run_cli(request)
    assert code == 2 and result.status == "rejected"
    [error] = result.errors
    assert any(".".join(map(str, f.loc)).startswith(field) for f in error.fields), error
    for word in words:
        assert word in error.message


# -- through stratorch run ------------------------------------------------------------------


def test_a_sweep_equals_running_each_combination_and_ranks_by_the_metric(run_cli: Run) -> None:
    code, swept = run_cli(small(sweep={"grid": GRID}))
    assert code == 0 and swept.status == "completed" and swept.sweep is not None
    ranking = swept.sweep.ranking
    assert [r.rank for r in ranking] == [1, 2, 3, 4]
    for entry in ranking:
        _, alone = run_cli(
            small(strategy={"builtin": "sma_cross", "params": params_of(small(), entry.params)})
        )
        assert entry.status == alone.status == "completed"
        assert entry.metrics == alone.metrics  # bit for bit
        assert entry.value == alone.metrics.sharpe
    values = [r.value for r in ranking]
    assert values == sorted(values, reverse=True)
    # The sweep's own tables are its best combination's.
    best_alone = run_cli(
        small(strategy={"builtin": "sma_cross", "params": params_of(small(), ranking[0].params)})
    )[1]
    for field in ("metrics", "per_symbol", "trades", "equity_curve"):
        assert getattr(swept, field) == getattr(best_alone, field), field


def test_a_lower_is_better_metric_ranks_lowest_first(run_cli: Run) -> None:
    _, swept = run_cli(small(sweep={"grid": GRID}, metric="max_drawdown"))
    assert swept.sweep is not None and swept.sweep.metric == "max_drawdown"
    values = [r.value for r in swept.sweep.ranking]
    assert values == sorted(values) and all(v is not None for v in values)


FLAKY = """
from shared.strategy import BaseStrategy

class Flaky(BaseStrategy):
    params = {"every": 3, "fail": False}

    def decide(self, df, interval, **kw):
        if self.params["fail"]:
            raise RuntimeError("this combination fails")
        if int(df["open_time"].iloc[-1] // 3_600_000) % self.params["every"] == 0:
            return {"signal": "BUY", "tp_price": float(df["close"].iloc[-1]) * 1.01}
        return {"signal": "HOLD"}
"""


def test_a_failed_combination_ranks_last_with_its_error_and_the_sweep_completes(
    run_cli: Run,
) -> None:
    request = example(
        strategy={"source": FLAKY, "class": "Flaky"},
        symbols=["BTCUSDT"],
        end="2021-01-08",
        sweep={"grid": {"fail": [False, True], "every": [3, 5]}},
    )
    code, result = run_cli(request)
    assert code == 0 and result.status == "completed" and result.sweep is not None
    last = result.sweep.ranking[2:]
    assert [r.params["fail"] for r in last] == [True, True]
    assert [r.params["every"] for r in last] == [3, 5]  # ties keep the combinations' order
    assert all(
        r.status == "failed"
        and "this combination fails" in r.errors[0].message + r.errors[0].log_tail
        for r in last
    )


def test_walk_forward_chooses_on_train_and_reports_the_test_window(run_cli: Run) -> None:
    wf = {"train": "30d", "test": "14d", "step": "14d"}
    request = small(sweep={"grid": GRID, "walk_forward": wf}, end="2021-03-15")
    code, result = run_cli(request)
    assert code == 0 and result.status == "completed" and result.sweep is not None
    folds = result.sweep.walk_forward
    assert folds is not None
    day = 86_400_000
    start = request_of(request).start_ms
    # Windows: train 30 days from start + k·14 days, then test the 14 days after; the last
    # fold's test window ends by 'end' (73 days: three folds).
    assert [(f.train_start, f.train_end, f.test_start, f.test_end) for f in folds] == [
        (
            start + k * 14 * day,
            start + (k * 14 + 30) * day,
            start + (k * 14 + 30) * day,
            start + (k * 14 + 44) * day,
        )
        for k in range(3)
    ]
    curves = []
    for fold in folds:
        assert fold.params == fold.ranking[0].params and fold.test is not None
        _, alone = run_cli(
            small(
                strategy={"builtin": "sma_cross", "params": params_of(small(), fold.params)},
                start=_iso(fold.test_start),
                end=_iso(fold.test_end),
            )
        )
        assert fold.test.metrics == alone.metrics
        curves.append(alone.equity_curve)
    # Stitched: each test curve scaled to start where the one before ended.
    stitched = result.sweep.oos_equity
    assert result.equity_curve == stitched
    assert len(stitched) == sum(len(c) for c in curves)
    assert stitched[: len(curves[0])] == curves[0]
    scale = curves[0][-1][1] / 10_000
    assert stitched[len(curves[0])][1] == pytest.approx(curves[1][0][1] * scale)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def test_the_sweep_example_prints_its_ranking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    assert main(["run", str(SWEEP_EXAMPLE), "--out", str(out)]) == 0
    result = BacktestResult.model_validate_json(out.read_bytes())
    assert result.sweep is not None and len(result.sweep.ranking) == 8
    printed = capsys.readouterr().out
    assert "sweep: 8 combinations by sharpe" in printed
    best = result.sweep.ranking[0].params
    assert " ".join(f"{k}={v}" for k, v in best.items()) in printed


# -- cancelling -------------------------------------------------------------------------------


async def test_cancelling_a_sweep_cancels_its_started_children(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    request = request_of(small(id="sw", sweep={"grid": GRID}))
    plan, children = expand(request)
    await store.put_sweep(plan)
    for child in children[:2]:
        await accept_id(store, child.id, child.fingerprint(), tenant="alice")
    done = BacktestResult(backtest_id="sw:c0000", status="completed")
    await finish(store, done)
    cancelled = BacktestResult(backtest_id="sw", status="cancelled")
    _, out = await finish(store, cancelled)
    assert await store.ended("sw:c0000") == "completed"
    assert await store.ended("sw:c0001") == "cancelled"  # started, not ended: cancelled
    assert await store.ended("sw:c0002") is None  # never started: nothing to cancel
    published = {o.backtest_id for o in out if o.exchange == "backtest.results"}
    assert published == {"sw", "sw:c0001"}


def test_the_walk_forward_example_prints_its_folds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    assert main(["run", str(WALK_FORWARD_EXAMPLE), "--out", str(out)]) == 0
    result = BacktestResult.model_validate_json(out.read_bytes())
    assert result.sweep is not None and result.sweep.walk_forward is not None
    assert len(result.sweep.walk_forward) == 4
    assert result.equity_curve == result.sweep.oos_equity
    printed = capsys.readouterr().out
    assert "walk-forward: best by total_return on train" in printed
    assert "out-of-sample equity, stitched" in printed


def test_the_readme_shows_the_sweep_examples_as_they_are() -> None:
    readme = (ROOT / "README.md").read_text()
    assert SWEEP_EXAMPLE.read_text().strip() in readme
    assert WALK_FORWARD_EXAMPLE.read_text().strip() in readme


def test_the_progress_bar_counts_a_sweeps_backtests() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, color_system=None, width=120)
    with _progress(console, quiet=False) as on_event:
        assert on_event is not None
        on_event(BacktestEvent.planned("sw", unit_count=8, symbols=["BTCUSDT"]))
        done = BacktestEvent(
            backtest_id="sw", type="unit_done", units_done=3, unit_count=8, unit_id="sw:c0002"
        )
        on_event(done)
    assert "3/8 backtests" in screen.getvalue()
