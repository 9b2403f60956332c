"""``stratorch submit/status/result`` and ``stratorch.connect`` without a stack: argument
errors and servers that are not there (the stack itself: tests/integration/test_remote.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import stratorch
from stratorch.cli import main
from tests.conftest import EXAMPLE
from tests.integration.stack import free_port


@pytest.fixture(autouse=True)
def _no_stack_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STRATORCH_GATEWAY_URL", "STRATORCH_API_TOKEN", "STRATORCH_AMQP_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def nowhere() -> str:
    """A gateway URL nothing answers on."""
    return f"http://127.0.0.1:{free_port()}"


def test_out_and_report_need_wait(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", str(EXAMPLE), "--out", "result.json"]) == 2
    assert "--out and --report need --wait" in capsys.readouterr().err


def test_an_unreadable_request_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", str(tmp_path / "missing.json")]) == 2
    assert "cannot read the request" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["status", "result"])
def test_status_and_result_need_a_gateway(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "some-id"]) == 2
    assert "no gateway: give --gateway URL or set STRATORCH_GATEWAY_URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # the broker keeps nothing to ask for
        main([command, "some-id", "--amqp", "amqp://127.0.0.1/"])
    assert exited.value.code == 2


def test_gateway_and_amqp_exclude_each_other() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["submit", str(EXAMPLE), "--gateway", "http://a", "--amqp", "amqp://b"])
    assert exited.value.code == 2


def test_a_url_of_neither_kind_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", str(EXAMPLE), "--gateway", "ftp://host/"]) == 2
    assert "give the gateway's (http:// or https://)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="amqp://"):
        stratorch.connect("localhost:8000")


@pytest.mark.parametrize(
    "args",
    [
        ["status", "an-id"],
        ["result", "an-id"],
        ["submit", str(EXAMPLE)],
        ["submit", str(EXAMPLE), "--wait"],
    ],
)
def test_an_unreachable_gateway_exits_4_saying_so(
    args: list[str], nowhere: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args, "--gateway", nowhere]) == 4
    err = capsys.readouterr().err
    assert f"unreachable: cannot reach the gateway at {nowhere}" in err
    assert "STRATORCH_GATEWAY_URL" in err


def test_an_unreachable_broker_exits_4_saying_so(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    assert main(["submit", str(EXAMPLE), "--amqp", url]) == 4
    err = capsys.readouterr().err
    assert "unreachable: cannot connect to RabbitMQ at amqp://guest@127.0.0.1" in err
    assert "guest:guest" not in err  # no password in messages
    with pytest.raises(stratorch.StackUnreachable):
        stratorch.connect(url)


def test_the_gateway_url_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, nowhere: str, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STRATORCH_GATEWAY_URL", nowhere)
    assert main(["status", "an-id"]) == 4
    assert nowhere in capsys.readouterr().err


def test_the_stack_keeps_its_own_state(nowhere: str, tmp_path: Path) -> None:
    request = json.loads(EXAMPLE.read_text())
    with stratorch.connect(nowhere) as stack, pytest.raises(TypeError, match="MongoDB"):
        stack.backtest("sma_cross", request["symbols"], state=tmp_path)
    with stratorch.connect(nowhere) as stack, pytest.raises(stratorch.StackUnreachable):
        stack.status("an-id")


def test_the_audit_runs_here_before_anything_is_sent(nowhere: str) -> None:
    request = json.loads((EXAMPLE.parent / "lookahead.json").read_text())
    strategy = request.pop("strategy")
    with stratorch.connect(nowhere) as stack, pytest.raises(stratorch.LookAheadFound):
        stack.backtest(strategy, audit=True, **request | {"end": "2021-02-01"})
    with stratorch.connect(nowhere) as stack, pytest.raises(stratorch.StackUnreachable):
        stack.backtest("sma_cross", ["BTCUSDT"], start="2021-05-01", end="2021-05-08", audit=True)
