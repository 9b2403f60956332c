"""``stratorch submit/status/result`` and ``stratorch.connect`` against the running stack,
through the gateway and through the broker: the same results as ``stratorch.backtest``."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stratorch
from shared.messages import BacktestEvent, BacktestResult
from tests.integration import client
from tests.integration.stack import ROOT, Stack

pytestmark = pytest.mark.integration

#: The example request of the integration tests, shorter (two symbols, two weeks), without an
#: id (the stack gives one). Tests that watch progress vary ``initial_cash``: the same request
#: again is a result-cache hit, answered at once, without units.
REQUEST = {k: v for k, v in client.REQUEST.items() if k != "id"} | {
    "symbols": ["BTCUSDT", "ETHUSDT"],
    "end": "2021-05-15",
}


def stratorch_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The ``stratorch`` command as a user runs it (no STRATORCH_* of the test run)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRATORCH_")}
    return subprocess.run(
        [sys.executable, "-m", "stratorch.cli", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def fields(initial_cash: float = 10_000) -> dict[str, Any]:
    """``REQUEST`` as ``stratorch.backtest``'s keywords (the strategy apart)."""
    return {k: v for k, v in REQUEST.items() if k != "strategy"} | {"initial_cash": initial_cash}


STRATEGY = ("sma_cross", REQUEST["strategy"]["params"])


@functools.cache
def local(initial_cash: float = 10_000) -> stratorch.Backtest:
    """The request run in this process, on the bundled sample: what the stack must give."""
    builtin, params = STRATEGY
    return stratorch.backtest(builtin, params=params, **fields(initial_cash))


def request_file(tmp_path: Path, initial_cash: float = 10_000) -> Path:
    path = tmp_path / f"request-{initial_cash}.json"
    path.write_text(json.dumps(REQUEST | {"initial_cash": initial_cash}))
    return path


def same_backtest(result: BacktestResult, initial_cash: float = 10_000) -> None:
    keep = {"metrics", "per_symbol", "trades", "equity_curve", "status"}
    assert result.model_dump(include=keep) == local(initial_cash).result.model_dump(include=keep)


@pytest.mark.parametrize(("via", "cash"), [("--gateway", 10_001), ("--amqp", 10_002)])
def test_submit_wait_shows_progress_then_the_summary_of_stratorch_run(
    stack: Stack, amqp_url: str, via: str, cash: int, tmp_path: Path
) -> None:
    url = stack.gateway_url if via == "--gateway" else amqp_url
    assert url is not None
    out, report = tmp_path / "result.json", tmp_path / "report.html"
    request = str(request_file(tmp_path, cash))
    done = stratorch_cli(
        "submit", request, via, url, "--wait", "--out", str(out), "--report", str(report),
        TTY_COMPATIBLE="1", NO_COLOR="1", COLUMNS="120",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    stdout = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)  # bold, even with NO_COLOR
    backtest_id = stdout.splitlines()[0]
    assert f"backtest {backtest_id}: completed" in stdout
    assert "final equity" in stdout and "per symbol" in stdout
    assert "units" in done.stderr and "2/2" in done.stderr  # the live bar: units done / total
    result = BacktestResult.model_validate_json(out.read_text())
    assert result.backtest_id == backtest_id
    same_backtest(result, cash)
    assert report.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_submit_then_status_and_result_through_the_gateway(stack: Stack, tmp_path: Path) -> None:
    assert stack.gateway_url is not None
    gateway = {"STRATORCH_GATEWAY_URL": stack.gateway_url}
    # The request of the --wait test: a result-cache hit if that ran first (fewer backtests).
    submitted = stratorch_cli("submit", str(request_file(tmp_path, 10_001)), **gateway)
    assert submitted.returncode == 0, submitted.stderr
    [backtest_id] = submitted.stdout.split()

    out = tmp_path / "result.json"
    result = stratorch_cli("result", backtest_id, "--out", str(out), **gateway)
    assert result.returncode == 0, result.stderr
    assert f"backtest {backtest_id}: completed" in result.stdout
    same_backtest(BacktestResult.model_validate_json(out.read_text()), 10_001)

    status = stratorch_cli("status", backtest_id, **gateway)
    assert status.returncode == 0
    assert status.stdout in (
        f"{backtest_id}: completed (2/2 units)\n",
        f"{backtest_id}: completed (from the result cache)\n",
    )


def test_an_unknown_id_says_so(stack: Stack) -> None:
    assert stack.gateway_url is not None
    for command in ("status", "result"):
        done = stratorch_cli(command, "no-such-backtest", "--gateway", stack.gateway_url)
        assert done.returncode == 3, done.stderr
        assert "unknown backtest: no backtest with id 'no-such-backtest'" in done.stderr


@pytest.fixture
def bad_request(tmp_path: Path) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**REQUEST, "fee_rate": 2, "interval": "2h30"}))
    return path


@pytest.mark.parametrize("via", ["--gateway", "--amqp"])
def test_a_rejected_request_names_each_field(
    stack: Stack, amqp_url: str, via: str, bad_request: Path
) -> None:
    url = stack.gateway_url if via == "--gateway" else amqp_url
    assert url is not None
    done = stratorch_cli("submit", str(bad_request), via, url)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""  # no id: nothing was submitted
    assert ": rejected" in done.stderr
    assert "fee_rate" in done.stderr and "interval" in done.stderr


@pytest.fixture(params=["gateway", "amqp"])
def connected(request: pytest.FixtureRequest, stack: Stack, amqp_url: str) -> Iterator[Any]:
    url = stack.gateway_url if request.param == "gateway" else amqp_url
    with stratorch.connect(url) as stack_client:
        yield stack_client


def test_connect_backtest_is_stratorch_backtest_bit_for_bit(connected: stratorch.Client) -> None:
    # The requests of the --wait tests: result-cache hits if those ran first (no units then,
    # only the `finished` event), so that fewer backtests run.
    cash = 10_001 if connected.url.startswith("http") else 10_002
    events: list[BacktestEvent] = []
    builtin, params = STRATEGY
    remote = connected.backtest(builtin, params=params, on_event=events.append, **fields(cash))
    here = local(cash)
    assert remote.status == "completed"
    assert remote.metrics.equals(here.metrics)
    assert remote.trades.equals(here.trades)
    assert remote.equity.equals(here.equity)
    assert remote.per_symbol.equals(here.per_symbol)
    assert events[-1].type == "finished"
    if remote.result.cache_hit is False:
        assert events[-1].units_done == events[-1].unit_count == 2
    assert f"backtest {remote.id}: completed" in repr(remote)


def test_connect_submit_status_result_cancel(connected: stratorch.Client) -> None:
    builtin, params = STRATEGY
    backtest_id = connected.submit(builtin, params=params, **fields())
    assert connected.status(backtest_id).status in ("queued", "running", "completed")
    done = connected.result(backtest_id)
    assert done.id == backtest_id and done.status == "completed"
    same_backtest(done.result)
    assert connected.status(backtest_id).status == "completed"
    connected.cancel(backtest_id)  # it has ended: it keeps its result
    assert connected.result(backtest_id).status == "completed"

    with pytest.raises(stratorch.UnknownBacktest):
        connected.status("no-such-backtest")
    with pytest.raises(stratorch.BacktestRejected, match="fee_rate"):
        connected.submit("sma_cross", ["BTCUSDT"], start="2021-05-01", end="2021-06-01", fee_rate=2)


async def test_connect_async_gives_the_same_backtest(stack: Stack) -> None:
    builtin, params = STRATEGY
    async with await stratorch.connect_async(stack.gateway_url) as remote:
        done = await remote.backtest(builtin, params=params, **fields())
    assert done.trades.equals(local().trades)


def readme_block(marker: str, language: str) -> str:
    readme = (ROOT / "README.md").read_text()
    after = readme.split(f"<!-- {marker}: tests/integration/test_remote.py runs")[1]
    return after.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readme_command_line_example_runs(stack: Stack, amqp_url: str, tmp_path: Path) -> None:
    assert stack.gateway_url is not None
    script = readme_block("stack-cli-example", "sh").replace(
        "http://127.0.0.1:8000", stack.gateway_url
    )
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "stack.json").write_bytes(
        (ROOT / "examples" / "stack.json").read_bytes()
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRATORCH_")}
    path = f"{Path(sys.executable).parent}{os.pathsep}{clean.get('PATH', '')}"
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env={**clean, "PATH": path, "TOKEN": "", "STRATORCH_AMQP_URL": amqp_url},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The summaries of submit --wait, result and submit --amqp --wait (status says
    # "<id>: completed (...)" too when the request was a cache hit: not counted).
    summaries = re.findall(r"^backtest \S+: completed$", done.stdout, flags=re.MULTILINE)
    assert len(summaries) == 3, done.stdout
    # The second one's status: a result-cache hit, at once or after its planning.
    assert re.search(r": (queued|running|completed) \(.+\)\n", done.stdout), done.stdout
    assert (tmp_path / "result.json").stat().st_size and (tmp_path / "report.html").stat().st_size


def test_the_readme_python_example_runs(stack: Stack, tmp_path: Path) -> None:
    assert stack.gateway_url is not None
    script = tmp_path / "example.py"
    script.write_text(readme_block("python-connect-example", "python"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRATORCH_")}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**clean, "STRATORCH_GATEWAY_URL": stack.gateway_url},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ": completed" in done.stdout and "StackStatus(id=" in done.stdout
