"""The README's complete client, ``examples/publish_request.py``, run as a user runs it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from tests.integration import client
from tests.integration.conftest import Reference
from tests.integration.stack import ROOT, Stack

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "examples" / "publish_request.py"


async def run_script(stack: Stack, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        *args,
        env={**stack.env, "STRATORCH_AMQP_URL": stack.env["STRATORCH_AMQP_URL"]},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=180)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_the_example_client_gets_the_result(
    stack: Stack, tmp_path: Path, reference: Reference
) -> None:
    request = client.request(initial_cash=9_876)
    del request["id"]  # the script gives one
    path, out = tmp_path / "request.json", tmp_path / "result.json"
    path.write_text(json.dumps(request))

    code, stdout, stderr = await run_script(stack, str(path), "--out", str(out))

    assert code == 0, stdout + stderr + stack.dump()
    result = json.loads(out.read_text())
    assert stdout.startswith(f"backtest {result['backtest_id']}: completed")
    assert f"trades         {result['metrics']['trade_count']} " in stdout
    for symbol in request["symbols"]:
        assert symbol in stdout
    assert "units done" in stderr or result["cache_hit"]
    want = await reference({**request, "id": result["backtest_id"]})
    assert client.comparable(result) == client.comparable(want)


async def test_the_example_client_reports_a_rejection(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(client.request(strategy={"builtin": "no_such_strategy"})))

    code, stdout, stderr = await run_script(stack, str(path))

    assert code == 2, stdout + stderr
    assert ": rejected" in stdout and "[rejected]" in stdout and "no_such_strategy" in stdout


async def test_the_example_client_reports_an_id_taken_by_another_request(
    stack: Stack, tmp_path: Path
) -> None:
    first = client.request(symbols=["BTCUSDT"])
    path = tmp_path / "request.json"
    path.write_text(json.dumps(first))
    code, stdout, stderr = await run_script(stack, str(path))
    assert code == 0, stdout + stderr

    path.write_text(json.dumps({**first, "initial_cash": 3_333}))  # another request, same id
    code, stdout, stderr = await run_script(stack, str(path))
    assert code == 2, stdout + stderr
    assert f"backtest {first['id']}: rejected" in stdout
    assert "is the id of another request" in stdout
