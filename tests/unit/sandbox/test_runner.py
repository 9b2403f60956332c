"""The runner's serve protocol on the wire, as any parent (a process, a container) sees it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from shared.sandbox.protocol import log_end_marker

ROOT = Path(__file__).resolve().parents[3]

FAILS_AT_IMPORT = """
print("about to fail")
raise RuntimeError("at import")
"""

SETS_STATE = """
import os
from shared.strategy import BaseStrategy

COUNT = [0]  # 1 after the first call; 2 if the module were reused

class S(BaseStrategy):
    def get_required_lookback(self):
        COUNT[0] += 1
        left_behind = 100 if "LEFT_BEHIND" in os.environ else 0  # by an earlier job
        os.environ["LEFT_BEHIND"] = "1"
        return COUNT[0] + left_behind
"""


def serve(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m shared.sandbox.runner --serve`` on ``stdin`` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "shared.sandbox.runner", "--serve"],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )


def describe(job_id: str, strategy: dict[str, Any]) -> bytes:
    job = {"id": job_id, "op": "describe", "strategy": strategy, "symbols": ["BTCUSDT"]}
    return json.dumps(job).encode() + b"\n"


def test_the_runner_serves_one_job_a_line_and_survives_a_failing_one() -> None:
    jobs = (
        describe("j1", {"builtin": "sma_cross"})
        + describe("j2", {"source": FAILS_AT_IMPORT, "class": "S"})
        + b"not json\n"
        + describe("j3", {"source": SETS_STATE, "class": "S"})
        + describe("j4", {"source": SETS_STATE, "class": "S"})
    )

    done = serve(jobs)

    assert done.returncode == 0  # at the end of stdin
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["id"], r["ok"], r["reusable"]) for r in replies] == [
        ("j1", True, True),
        ("j2", False, True),  # the strategy failed; the runner is fine
        (None, False, True),
        ("j3", True, True),
        ("j4", True, True),
    ]
    assert replies[0]["lookback"] == 51
    assert replies[1]["error"]["kind"] == "crashed"
    assert "malformed job" in replies[2]["error"]["message"]
    assert replies[3]["lookback"] == replies[4]["lookback"] == 1  # no state from j3 in j4


def test_each_job_log_ends_with_its_marker_before_its_result() -> None:
    done = serve(
        describe("j1", {"source": FAILS_AT_IMPORT, "class": "S"})
        + describe("j2", {"builtin": "sma_cross"})
    )

    log = done.stderr
    first, second = log_end_marker("j1"), log_end_marker("j2")
    assert b"about to fail" in log[: log.index(first)]
    assert log.index(first) < log.index(second)
    assert log.endswith(second)


def test_a_job_that_leaves_a_thread_running_says_the_runner_is_unfit() -> None:
    leaky = (
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "from shared.strategy import BaseStrategy\n"
        "class S(BaseStrategy): pass\n"
    )

    done = serve(describe("j1", {"source": leaky, "class": "S"}))

    [reply] = [json.loads(line) for line in done.stdout.splitlines()]
    assert (reply["ok"], reply["reusable"]) == (True, False)


def test_the_runner_has_one_mode() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shared.sandbox.runner"],
        input=b"",
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2
    assert b"--serve" in done.stderr
