"""``stratorch run`` as a user drives it: the README's example, bad requests, failing code."""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.candles import ParquetCandleStore
from shared.messages import BacktestResult
from stratorch.cli import main
from tests.conftest import EXAMPLE, ROOT
from tests.unit.candles._klines import rows, write_csv

README = (ROOT / "README.md").read_text()

Run = Callable[..., tuple[int, BacktestResult]]


def example(**overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = json.loads(EXAMPLE.read_text())
    request.update(overrides)
    return request


def test_readme_example_completes_with_the_pinned_metrics(run_cli: Run) -> None:
    code, result = run_cli(example())
    assert code == 0 and result.status == "completed" and result.errors == []
    m = result.metrics
    assert m is not None
    assert sorted(result.per_symbol) == sorted(example()["symbols"])
    # Golden numbers: the same run as the README's summary. A change here is a change of
    # semantics or of the bundled data, and must be explained.
    assert m.trade_count == 423
    assert m.rejected_entries == 23
    assert m.final_equity == pytest.approx(8522.66, abs=0.01)
    assert m.max_drawdown == pytest.approx(0.1514, abs=1e-4)
    assert m.sharpe == pytest.approx(-2.05, abs=0.01)
    assert sum(s.trade_count for s in result.per_symbol.values()) == m.trade_count
    assert result.equity_curve[-1][1] == m.final_equity
    assert all(t.exit_time >= t.entry_time for t in result.trades)


def test_same_request_gives_the_same_result_bit_for_bit(run_cli: Run) -> None:
    request = example(symbols=["BTCUSDT", "ETHUSDT"], id="same")
    _, first = run_cli(request)
    _, second = run_cli(request)
    assert first.model_dump(exclude={"timings"}) == second.model_dump(exclude={"timings"})


PROBE = '''
from shared.strategy import BaseStrategy

class Probe(BaseStrategy):
    """BUY on every bar; fails loudly if decide ever sees other than its lookback."""
    params = {"lookback": 5}

    def get_required_lookback(self):
        return self.params["lookback"]

    def decide(self, df, interval, **kw):
        if len(df) != self.params["lookback"]:
            raise AssertionError(f"decide saw {len(df)} bars")
        return {"signal": "BUY"}
'''


def test_only_simulated_bars_signal_and_warm_up_is_loaded(run_cli: Run) -> None:
    # 2021-01-01 00:00 ≤ open_time < 2021-01-02 00:00: 24 simulated bars, warm-up before them.
    request = example(
        strategy={"source": PROBE, "class": "Probe"},
        symbols=["BTCUSDT"],
        start="2021-01-01T00:00:00Z",
        end="2021-01-02T00:00:00Z",
        portfolio={"builtin": "fixed_fraction", "params": {"fraction": 1.0, "max_positions": 1}},
    )
    code, result = run_cli(request)
    assert code == 0, result.errors
    [trade] = result.trades  # the first BUY holds to the end; the others are rejected
    assert trade.entry_time == 1_609_459_200_000 + 3_600_000  # the 2nd simulated bar's open
    assert trade.exit_time == 1_609_459_200_000 + 23 * 3_600_000
    assert trade.exit_reason == "end_of_data"
    assert result.metrics is not None
    assert result.metrics.rejected_entries == 22  # 24 BUYs − 1 taken − 1 on the last bar
    assert result.equity_curve[0][0] == 1_609_459_200_000
    assert len(result.equity_curve) == 24


MEAN_CROSS = README.split("```python\n", 1)[1].split("```", 1)[0]  # "Writing a strategy"
NOT_A_STRATEGY = """
class Plain:
    def decide(self, df, interval, **kw):
        return None
"""


@pytest.mark.parametrize(
    ("overrides", "status", "kind", "words"),
    [
        ({"symbols": ["NOPEUSDT"]}, "failed", "no_data", ["NOPEUSDT", "BTCUSDT"]),
        ({"symbols": []}, "rejected", "rejected", ["symbols"]),
        ({"start": "2021-02-01", "end": "2021-01-01"}, "rejected", "rejected", ["end", "after"]),
        (
            {"start": "2030-01-01", "end": "2030-02-01", "symbols": ["BTCUSDT"]},
            "failed",
            "no_data",
            ["BTCUSDT", "2021-07-17"],
        ),
        ({"strategy": {"builtin": "nope"}}, "rejected", "rejected", ["nope", "sma_cross"]),
        (
            {"strategy": {"builtin": "sma_cross", "params": {"fats": 5}}},
            "rejected",
            "rejected",
            ["fats", "fast"],
        ),
        (
            {"strategy": {"source": "class S(:\n  pass", "class": "S"}},
            "rejected",
            "rejected",
            ["line 1"],
        ),
        ({"initial_cash": "lots"}, "rejected", "rejected", ["initial_cash"]),
        (
            {"portfolio": {"builtin": "fixed_fraction", "params": {"fraction": 2}}},
            "rejected",
            "rejected",
            ["fraction"],
        ),
        (
            {"portfolio": {"builtin": "fixed_fraction", "params": {"frac": 0.5}}},
            "rejected",
            "rejected",
            ["'frac'", "did you mean 'fraction'", "fraction, max_positions"],
        ),
        (
            {"portfolio": {"builtin": "fixed_fractoin"}},
            "rejected",
            "rejected",
            ["'fixed_fractoin'", "builtin portfolios are: fixed_fraction"],
        ),
        (
            {"strategy": {"source": MEAN_CROSS, "class": "MeanCross", "params": {"n": "30"}}},
            "rejected",
            "rejected",
            ["MeanCross", "'n'", "an integer", "str '30'"],
        ),
        (
            {"strategy": {"source": NOT_A_STRATEGY, "class": "Plain"}},
            "rejected",
            "rejected",
            ["'Plain' is not a BaseStrategy"],
        ),
        (
            {"strategy": {"source": "import requests\n" + MEAN_CROSS, "class": "MeanCross"}},
            "failed",
            "crashed",
            ["'requests'", "only the standard library and numpy, pandas"],
        ),
    ],
)
def test_bad_requests_come_back_with_a_clear_message(
    run_cli: Run, overrides: dict[str, Any], status: str, kind: str, words: list[str]
) -> None:
    code, result = run_cli(example(**overrides))
    assert result.status == status
    assert code == (2 if status == "rejected" else 1)
    [error] = result.errors
    assert error.kind == kind
    for word in words:
        assert word in error.message
    assert "Traceback" not in error.message


def test_malformed_json_is_rejected_not_lost(run_cli: Run) -> None:
    code, result = run_cli(b"{not json")
    assert code == 2 and result.status == "rejected"
    assert "JSON" in result.errors[0].message or "json" in result.errors[0].message


CRASH = """
from shared.strategy import BaseStrategy

class Crash(BaseStrategy):
    def decide(self, df, interval, **kw):
        print("about to divide")
        return {"signal": "BUY", "tp_price": 1 / 0}
"""


def test_a_crashing_strategy_fails_with_its_symbol_and_output(run_cli: Run) -> None:
    code, result = run_cli(
        example(strategy={"source": CRASH, "class": "Crash"}, symbols=["ETHUSDT"])
    )
    assert code == 1 and result.status == "failed"
    [error] = result.errors
    assert error.kind == "crashed" and error.symbol == "ETHUSDT" and error.unit_id
    assert "ZeroDivisionError" in error.message + error.log_tail
    assert "about to divide" in error.log_tail


FORGER = """
from shared.strategy import BaseStrategy

class Forger(BaseStrategy):
    def decide(self, df, interval, **kw):
        return {"signal": "BUY", "tp_price": -5.0}
"""


def test_invalid_signals_fail_the_unit(run_cli: Run) -> None:
    code, result = run_cli(
        example(strategy={"source": FORGER, "class": "Forger"}, symbols=["BTCUSDT"])
    )
    assert code == 1
    assert result.errors[0].kind == "invalid_output"
    assert "tp_price" in result.errors[0].message


def test_missing_request_file_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["run", str(tmp_path / "nope.json"), "--quiet"]) == 2


def test_state_dir_keeps_plan_wal_and_result(run_cli: Run, tmp_path: Path) -> None:
    state = tmp_path / "state"
    code, result = run_cli(example(symbols=["BTCUSDT"], id="kept"), "--state", str(state))
    assert code == 0
    folder = state / "backtests" / "kept"
    assert (folder / "plan.json").exists() and (folder / "result.json").exists()
    wal = [json.loads(line) for line in (folder / "wal.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in wal] == list(range(len(wal)))
    assert result.wal is not None and len(wal) == result.wal.events


def test_same_request_again_is_a_cache_hit_with_the_same_result(
    run_cli: Run, tmp_path: Path
) -> None:
    state = tmp_path / "cache-state"
    request = example(symbols=["BTCUSDT", "SOLUSDT"])
    _, first = run_cli(request, "--state", str(state))
    request["parallel_symbols"] = 1  # cannot change a result, so not part of the key
    code, second = run_cli(request, "--state", str(state))
    assert code == 0 and not first.cache_hit and second.cache_hit
    assert second.backtest_id != first.backtest_id
    assert second.model_dump(exclude={"backtest_id", "cache_hit", "timings"}) == first.model_dump(
        exclude={"backtest_id", "cache_hit", "timings"}
    )
    _, third = run_cli(
        example(symbols=["BTCUSDT", "SOLUSDT"], fee_rate=0.002), "--state", str(state)
    )
    assert not third.cache_hit


@pytest.mark.parametrize("bad_id", ["", "a/b", "../../escaped", 123, None, "x" * 65])
def test_an_invalid_id_is_rejected_and_nothing_leaves_the_state_dir(
    run_cli: Run, tmp_path: Path, bad_id: object
) -> None:
    root = tmp_path / "root"
    state = root / "inner"
    code, result = run_cli(example(symbols=["BTCUSDT"], id=bad_id), "--state", str(state))
    assert code == 2 and result.status == "rejected"
    [error] = result.errors
    assert error.kind == "rejected" and error.message.startswith("id: ")
    assert result.backtest_id != bad_id  # a fresh id: the bad one is never used
    assert [p.name for p in root.iterdir()] == ["inner"]
    assert [p.name for p in (state / "backtests").iterdir()] == [result.backtest_id]


def test_an_id_in_the_state_dir_is_taken_by_its_request(run_cli: Run, tmp_path: Path) -> None:
    state = tmp_path / "state"
    request = example(symbols=["BTCUSDT"], id="mine", start="2021-01-01", end="2021-02-01")
    code, first = run_cli(request, "--state", str(state))
    assert code == 0

    # The same request again is the same backtest: its result, not a second run.
    code, again = run_cli(request, "--state", str(state))
    assert code == 0 and again == first

    # A different request cannot have the id, and cannot change what is stored under it.
    code, other = run_cli({**request, "initial_cash": 500}, "--state", str(state))
    assert code == 2 and other.status == "rejected" and other.backtest_id == "mine"
    assert "'mine' is the id of another request" in other.errors[0].message
    stored = BacktestResult.model_validate_json(
        (state / "backtests" / "mine" / "result.json").read_bytes()
    )
    assert stored == first


def test_out_is_written_when_the_request_cannot_be_read(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    code = main(["run", str(tmp_path / "nope.json"), "--out", str(out), "--quiet"])
    result = BacktestResult.model_validate_json(out.read_bytes())
    assert code == 2 and result.status == "rejected"
    assert "cannot read the request" in result.errors[0].message
    assert "nope.json" in result.errors[0].message


def test_out_is_written_when_docker_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    path, out = tmp_path / "request.json", tmp_path / "result.json"
    path.write_text(json.dumps(example(symbols=["BTCUSDT"], id="needs-docker")))
    code = main(["run", str(path), "--sandbox", "docker", "--out", str(out), "--quiet"])
    result = BacktestResult.model_validate_json(out.read_bytes())
    assert code == 2 and result.status == "rejected" and result.backtest_id == "needs-docker"
    assert "Docker sandbox is unavailable" in result.errors[0].message


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("STRATORCH_SANDBOX", "dokcer", "'process' or 'docker'"),
        ("STRATORCH_LOG_LEVEL", "loud", "'debug', 'info', 'warning' or 'error'"),
    ],
)
def test_a_bad_setting_is_a_one_line_usage_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    allowed: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["run", str(EXAMPLE), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{variable}='{value}'" in err and allowed in err


def test_quiet_prints_nothing_at_all(tmp_path: Path) -> None:
    # A fresh process: the process sandbox's notice is printed once per process.
    path = tmp_path / "request.json"
    path.write_text(json.dumps(example(symbols=["BTCUSDT"], end="2021-01-15")))
    done = subprocess.run(
        [sys.executable, "-m", "stratorch.cli", "run", str(path), "--quiet"],
        capture_output=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("STRATORCH_")},
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_the_readme_strategy_runs_with_its_params(run_cli: Run) -> None:
    strategy = {"source": MEAN_CROSS, "class": "MeanCross", "params": {"n": 30}}
    code, result = run_cli(example(strategy=strategy, symbols=["BTCUSDT"]))
    assert code == 0 and result.status == "completed", result.errors


def test_equity_curve_points_are_open_times_and_daily_returns_group_by_them(
    run_cli: Run,
) -> None:
    # As the README says: [open time of a bar, equity at its close]; a day's equity is that
    # of its last bar (opening at 23:00 for 1h bars), the first day against initial_cash.
    request = example(symbols=["BTCUSDT", "ETHUSDT"], start="2021-01-01", end="2021-01-21")
    code, result = run_cli(request)
    assert code == 0 and result.metrics is not None
    times = [t for t, _ in result.equity_curve]
    assert times == [1_609_459_200_000 + i * 3_600_000 for i in range(20 * 24)]
    assert result.equity_curve[-1][1] == result.metrics.final_equity
    days: dict[int, float] = {}
    for t, equity in result.equity_curve:
        days[t // 86_400_000] = equity
    closes = [result.metrics.initial_cash, *days.values()]
    r = [b / a - 1 for a, b in itertools.pairwise(closes)]
    mean = statistics.fmean(r)
    assert result.metrics.sharpe == pytest.approx(mean / statistics.stdev(r) * math.sqrt(365))


RENAMED = "{old} is deprecated and will be removed in the next release; use {new}"


@pytest.mark.parametrize(
    ("name", "old_name_of"),
    [
        ("--candles", None),
        ("STRATORCH_CANDLES", None),
        ("--store", "--candles"),
        ("STRATORCH_STORE", "STRATORCH_CANDLES"),
    ],
)
def test_the_candle_store_is_read_from_candles_and_still_from_its_old_name(
    run_cli: Run,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    old_name_of: str | None,
) -> None:
    candles = tmp_path / "my-candles"  # empty: the backtest fails naming it
    if name.startswith("--"):
        code, result = run_cli(example(symbols=["BTCUSDT"]), name, str(candles))
    else:
        monkeypatch.setenv(name, str(candles))
        code, result = run_cli(example(symbols=["BTCUSDT"]))
    assert code == 1 and result.errors[0].kind == "no_data"
    assert f"in the candle store at {candles}" in result.errors[0].message
    assert f"--candles {candles}`" in result.errors[0].message  # the ingest command to run
    err = capsys.readouterr().err
    if old_name_of is None:
        assert "deprecated" not in err
    else:
        assert f"stratorch: {RENAMED.format(old=name, new=old_name_of)}\n" in err


def test_ingest_writes_to_candles_and_still_to_its_old_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_csv(tmp_path / "ADABTC-1m.csv", rows())
    ingest = ["ingest", "binance", str(csv), "--symbol", "ADABTC", "--interval", "1m"]
    assert main([*ingest, "--candles", str(tmp_path / "new")]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main([*ingest, "--store", str(tmp_path / "old")]) == 0
    assert RENAMED.format(old="--store", new="--candles") in capsys.readouterr().err
    new, old = (
        ParquetCandleStore(tmp_path / d).read("ADABTC", "1m", start_ms=0, end_ms=2**62)
        for d in ("new", "old")
    )
    assert len(new) == 10 and new.equals(old)
    with pytest.raises(SystemExit):
        main([*ingest, "--help"])
    assert "--store" not in capsys.readouterr().out  # the old name is not advertised


def test_the_stratorch_command_gives_the_same_result_and_leaves_nothing_behind(
    run_cli: Run, tmp_path: Path
) -> None:
    """The installed command (``stratorch.cli_start``) starts its sandbox child ahead and
    ends its process early: the same result, every temporary directory removed."""
    request = example(symbols=["BTCUSDT"], end="2021-01-15")
    path, out, temp = tmp_path / "request.json", tmp_path / "result.json", tmp_path / "tmp"
    path.write_text(json.dumps(request))
    temp.mkdir()
    command = "import sys; from stratorch.cli_start import main; sys.argv[0] = 'stratorch'; main()"
    done = subprocess.run(
        [sys.executable, "-c", command, "run", str(path), "--quiet", "--out", str(out)],
        capture_output=True,
        timeout=300,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("STRATORCH_")},
            "TMPDIR": str(temp),
        },
    )
    assert (done.returncode, done.stderr) == (0, b"")
    code, expected = run_cli(request)
    result = BacktestResult.model_validate_json(out.read_text())
    assert code == 0 and result.metrics == expected.metrics and result.trades == expected.trades
    assert list(temp.iterdir()) == []
