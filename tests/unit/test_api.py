"""``stratorch.backtest`` as a notebook or a script calls it."""

from __future__ import annotations

import json
import linecache
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import pytest

import stratorch
from shared.messages import BacktestEvent, BacktestResult
from shared.strategy import BaseStrategy
from tests.conftest import EXAMPLE, ROOT

if TYPE_CHECKING:  # a name only annotations use: the uploaded class must not evaluate them
    from pandas import DataFrame as Frame

WEEK = {"interval": "1h", "start": "2021-05-01", "end": "2021-05-08"}


class EveryTenth(BaseStrategy):
    """BUY on every tenth bar, with a 1 % target and stop: a class from a test module."""

    params: ClassVar[dict[str, Any]] = {"every": 10}

    def signals(self, df: Frame) -> Frame:
        close = df["close"].to_numpy()
        buy = np.arange(len(df)) % self.params["every"] == 0
        return pd.DataFrame(
            {
                "signal": np.where(buy, "BUY", ""),
                "tp_price": close * 1.01,
                "sl_price": close * 0.99,
            },
            index=df.index,
        )


class Crashing(BaseStrategy):
    def decide(self, df: pd.DataFrame, interval: str, **kw: Any) -> None:
        print("about to fail")
        raise ZeroDivisionError("the strategy's own bug")


def helper(x: float) -> float:
    return x


class UsesAHelper(BaseStrategy):
    def decide(self, df: pd.DataFrame, interval: str, **kw: Any) -> None:
        helper(1.0)


@pytest.fixture(scope="module")
def week() -> stratorch.Backtest:
    events: list[BacktestEvent] = []
    done = stratorch.backtest(
        "sma_cross", ["BTCUSDT", "ETHUSDT"], **WEEK, params={"fast": 5}, on_event=events.append
    )
    assert events[-1].units_done == events[-1].unit_count == 2  # progress, as the CLI's bar
    return done


def test_a_builtin_by_name_gives_what_stratorch_run_gives(run_cli: Any) -> None:
    request: dict[str, Any] = json.loads(EXAMPLE.read_text()) | {"id": "api-vs-cli"}
    _, by_cli = run_cli(request)
    strategy = request.pop("strategy")
    by_api = stratorch.backtest(strategy["builtin"], params=strategy["params"], **request)
    assert by_api.status == "completed"
    assert by_api.result.model_dump(exclude={"timings"}) == by_cli.model_dump(exclude={"timings"})
    assert by_api.metrics["trade_count"] == 423  # the pinned golden run


def test_results_are_pandas_objects(week: stratorch.Backtest) -> None:
    trades, equity = week.trades, week.equity
    assert len(trades) == week.metrics["trade_count"] > 0
    assert isinstance(trades["entry_time"].dtype, pd.DatetimeTZDtype)
    assert (trades["exit_time"] >= trades["entry_time"]).all()
    assert trades["entry_time"].min() >= pd.Timestamp("2021-05-01", tz="UTC")
    assert isinstance(equity.index, pd.DatetimeIndex) and str(equity.index.tz) == "UTC"
    assert equity.iloc[-1] == week.metrics["final_equity"]
    assert sorted(week.per_symbol.index) == ["BTCUSDT", "ETHUSDT"]
    assert week.per_symbol["trade_count"].sum() == len(trades)
    assert BacktestResult.model_validate_json(week.to_json()) == week.result


def test_repr_is_the_summary_table(week: stratorch.Backtest) -> None:
    text = repr(week)
    assert f"backtest {week.id}: completed" in text
    assert "final equity" in text and "BTCUSDT" in text


def test_report_writes_the_html_page(week: stratorch.Backtest, tmp_path: Path) -> None:
    path = week.report(tmp_path / "report.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "BTCUSDT" in page


def test_a_class_from_this_module_runs_as_uploaded_source() -> None:
    done = stratorch.backtest(EveryTenth, ["BTCUSDT"], **WEEK, params={"every": 12})
    assert done.status == "completed"
    assert 0 < len(done.trades) <= 7 * 24 // 12 + 1


def test_a_class_from_a_notebook_cell_runs(tmp_path: Path) -> None:
    # What Jupyter does: the cell's code is compiled under a name whose lines linecache
    # holds, into a __main__ with no file, where inspect.getsource(cls) cannot find it.
    cell = (
        "import numpy as np\nfrom shared.strategy import BaseStrategy\nRATIO = 1.01\n\n"
        "class Cell(BaseStrategy):\n    def decide(self, df, interval, **kw):\n"
        "        c = float(df['close'].iloc[-1])\n"
        "        return {'signal': 'BUY', 'tp_price': c * RATIO, 'sl_price': c / RATIO}\n"
    )
    name = "<ipython-input-1-cell>"
    linecache.cache[name] = (len(cell), None, cell.splitlines(True), name)
    notebook = types.ModuleType("notebook_main")
    sys.modules["notebook_main"] = notebook
    try:
        exec(compile(cell, name, "exec"), notebook.__dict__)
        done = stratorch.backtest(notebook.Cell, ["ETHUSDT"], **WEEK)
    finally:
        del sys.modules["notebook_main"], linecache.cache[name]
    assert done.status == "completed" and len(done.trades) > 0


def test_a_class_without_source_says_what_to_do() -> None:
    namespace: dict[str, Any] = {"BaseStrategy": BaseStrategy, "__name__": "__main__"}
    exec("class Typed(BaseStrategy):\n    pass\n", namespace)  # as at a bare >>> prompt
    with pytest.raises(TypeError, match=r"cannot find the source of Typed.*Put the class in a"):
        stratorch.backtest(namespace["Typed"], ["BTCUSDT"], **WEEK)


def test_a_class_using_a_helper_beside_it_names_the_helper() -> None:
    with pytest.raises(TypeError, match=r"UsesAHelper uses 'helper'.*move it into the class"):
        stratorch.backtest(UsesAHelper, ["BTCUSDT"], **WEEK)


@pytest.mark.parametrize(
    ("fields", "loc", "words"),
    [
        ({"fee_rate": 2}, ("fee_rate",), "fee_rate: Input should be less than 1"),
        ({"fees": 0.1}, ("fees",), "fees: Extra inputs are not permitted"),
        ({"symbols": ["btcusdt"]}, ("symbols", 0), "symbols.0: String should match"),
        ({"start": "May 1st"}, ("start",), "'May 1st' is not an ISO 8601 time"),
    ],
)
def test_a_bad_field_is_a_value_error_naming_it(
    fields: dict[str, Any], loc: tuple[str | int, ...], words: str
) -> None:
    arguments = {"symbols": ["BTCUSDT"], **WEEK, **fields}
    with pytest.raises(ValueError, match=r"^backtest rejected: ") as caught:
        stratorch.backtest("sma_cross", **arguments)
    assert isinstance(caught.value, stratorch.BacktestRejected)
    assert words in str(caught.value)
    assert [f.loc for f in caught.value.fields] == [loc]
    assert caught.value.backtest.status == "rejected" and caught.value.backtest.trades.empty


def test_an_unknown_parameter_is_rejected_by_name() -> None:
    with pytest.raises(stratorch.BacktestRejected, match="fastest"):
        stratorch.backtest("sma_cross", ["BTCUSDT"], **WEEK, params={"fastest": 3})


def test_a_failing_strategy_raises_with_its_output() -> None:
    with pytest.raises(stratorch.BacktestFailed) as caught:
        stratorch.backtest(Crashing, ["BTCUSDT"], **WEEK)
    message = str(caught.value)
    assert "crashed BTCUSDT" in message and "ZeroDivisionError" in message
    assert "about to fail" in message
    failed = caught.value.backtest
    assert failed.status == "failed" and failed.metrics.empty and failed.trades.empty
    assert failed.errors[0].kind == "crashed"


async def test_it_runs_inside_a_running_event_loop(week: stratorch.Backtest) -> None:
    arguments: dict[str, Any] = {"symbols": ["BTCUSDT", "ETHUSDT"], **WEEK, "params": {"fast": 5}}
    blocking = stratorch.backtest("sma_cross", **arguments)  # as in a Jupyter cell
    awaited = await stratorch.backtest_async("sma_cross", **arguments)
    for done in (blocking, awaited):
        assert done.result.model_dump(exclude={"timings", "backtest_id"}) == week.result.model_dump(
            exclude={"timings", "backtest_id"}
        )


def test_the_readme_example_runs_as_a_script(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    example = readme.split("<!-- python-api-example: tests/unit/test_api.py runs it -->\n")[1]
    script = tmp_path / "example.py"
    script.write_text(example.split("```python\n", 1)[1].split("```", 1)[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATORCH_")}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert ": completed" in done.stdout and "sharpe" in done.stdout
    assert (tmp_path / "report.html").stat().st_size > 0


@pytest.fixture(autouse=True)
def _no_candles_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("STRATORCH_CANDLES", raising=False)
    yield


def test_audit_first_refuses_a_leaking_strategy_before_backtesting() -> None:
    request = json.loads((ROOT / "examples" / "lookahead.json").read_text())
    strategy = request.pop("strategy")
    with pytest.raises(stratorch.LookAheadFound) as found:
        stratorch.backtest(strategy, audit=True, **request | {"end": "2021-02-01"})
    assert not found.value.audit.clean
    message = str(found.value)
    assert message.startswith("look-ahead found, so no backtest was run")
    assert "BTCUSDT: look-ahead" in message and "the first 2021-01-" in message


def test_a_clean_audit_is_on_the_result(week: stratorch.Backtest) -> None:
    audited = stratorch.backtest(
        "sma_cross", ["BTCUSDT", "ETHUSDT"], **WEEK, params={"fast": 5}, audit=True
    )
    assert week.audit is None
    assert audited.audit is not None and audited.audit.clean
    assert [s.symbol for s in audited.audit.symbols] == ["BTCUSDT", "ETHUSDT"]
    assert audited.result.model_dump(exclude={"timings", "backtest_id"}) == week.result.model_dump(
        exclude={"timings", "backtest_id"}
    )
