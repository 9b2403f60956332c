"""RunnerConnection against a scripted runner: the parent's side of the protocol, no process.

This is the contract any way of starting a runner (a child process, a Docker container) relies
on: give the connection the runner's three streams, a kill and an exit status.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from shared.errors import InvalidOutput, OutputTooLarge, StrategyCrashed, StrategyTimeout
from shared.sandbox import SandboxLimits
from shared.sandbox.connection import RunnerConnection
from shared.sandbox.protocol import PROTOCOL, log_end_marker

Answer = Callable[[str], list[tuple[str, bytes]]]
JOB = {"op": "describe", "strategy": {"builtin": "sma_cross"}, "symbols": ["BTCUSDT"]}


class ScriptedRunner:
    """Answers each job with ``answer(job_id)``: pieces of ``"log"`` or ``"result"`` output,
    fed a few milliseconds apart so that each arrives in a read of its own."""

    def __init__(self, answer: Answer, *, exit_status: int = 0) -> None:
        self.answer = answer
        self.results = asyncio.StreamReader()
        self.log = asyncio.StreamReader()
        self.jobs: list[dict[str, Any]] = []
        self.kills = 0
        self.status = exit_status
        self._playing: set[asyncio.Task[None]] = set()

    def connect(self) -> RunnerConnection:
        return RunnerConnection(
            self, self.results, self.log, kill=self.kill, exit_status=self.exit_status
        )

    def write(self, data: bytes) -> None:
        job = json.loads(data)
        self.jobs.append(job)
        task = asyncio.get_running_loop().create_task(self._play(job["id"]))
        self._playing.add(task)
        task.add_done_callback(self._playing.discard)

    async def drain(self) -> None:
        pass

    async def kill(self) -> None:
        self.kills += 1
        self._end()

    async def exit_status(self) -> int:
        return self.status

    async def _play(self, job_id: str) -> None:
        for stream, data in self.answer(job_id):
            await asyncio.sleep(0.005)
            if self.results.at_eof():
                return
            if stream == "eof":
                self._end()
            else:
                (self.log if stream == "log" else self.results).feed_data(data)

    def _end(self) -> None:
        for stream in (self.results, self.log):
            if not stream.at_eof():
                stream.feed_eof()


def reply(
    job_id: str, *, reusable: bool = True, protocol: int | None = PROTOCOL, **fields: Any
) -> bytes:
    said = {"id": job_id, "reusable": reusable, "protocol": protocol, **fields}
    return json.dumps({k: v for k, v in said.items() if v is not None}).encode() + b"\n"


def crashed(job_id: str) -> bytes:
    error = {"kind": "crashed", "message": "ValueError: boom", "symbol": None, "traceback": ""}
    return reply(job_id, ok=False, error=error)


async def run(connection: RunnerConnection, **limits: Any) -> dict[str, Any]:
    return await connection.run(JOB, label="class 'S'", limits=SandboxLimits(**limits))


async def test_a_job_s_log_ends_at_its_marker_even_split_across_reads() -> None:
    def answer(job_id: str) -> list[tuple[str, bytes]]:
        marker = log_end_marker(job_id)
        return [
            ("log", f"log of {job_id}\n".encode() + marker[:9]),
            ("log", marker[9:]),
            ("result", crashed(job_id)[:10]),
            ("result", crashed(job_id)[10:]),
        ]

    runner = ScriptedRunner(answer)
    connection = runner.connect()

    tails = []
    for _ in range(2):
        with pytest.raises(StrategyCrashed, match="boom") as caught:
            await run(connection)
        tails.append(caught.value.log_tail)

    first, second = (job["id"] for job in runner.jobs)
    assert tails == [f"log of {first}", f"log of {second}"]  # each its own; no marker shows
    assert connection.reusable and runner.kills == 0  # a strategy's error keeps the runner


async def test_an_ok_reply_is_returned() -> None:
    def answer(job_id: str) -> list[tuple[str, bytes]]:
        return [("log", log_end_marker(job_id)), ("result", reply(job_id, ok=True, lookback=3))]

    connection = ScriptedRunner(answer).connect()

    assert (await run(connection))["lookback"] == 3
    assert connection.reusable


async def test_a_reply_the_runner_does_not_vouch_for_ends_it() -> None:
    # Unfit runners may have lost the marker: the kill ends the log instead.
    runner = ScriptedRunner(lambda job_id: [("result", reply(job_id, reusable=False, ok=True))])
    connection = runner.connect()

    assert (await run(connection))["ok"] is True
    assert not connection.reusable and runner.kills >= 1
    with pytest.raises(RuntimeError, match="ended after an earlier job"):
        await run(connection)


@pytest.mark.parametrize("protocol", [None, PROTOCOL - 1, PROTOCOL + 1])
async def test_a_runner_of_another_version_is_refused_saying_to_rebuild_its_image(
    protocol: int | None,
) -> None:
    """A sandbox image bakes in its runner: one built from another stratorch version may
    answer in a shape this one misreads (e.g. signals as records, before protocol 2)."""

    def answer(job_id: str) -> list[tuple[str, bytes]]:
        return [("result", reply(job_id, ok=True, signals={"BTCUSDT": []}, protocol=protocol))]

    runner = ScriptedRunner(answer)
    connection = runner.connect()

    with pytest.raises(StrategyCrashed, match="rebuild it from this one"):
        await run(connection)
    assert not connection.reusable and runner.kills >= 1


@pytest.mark.parametrize(
    "result",
    [b"not json\n", b'{"id": "stale", "reusable": true, "ok": true}\n'],
    ids=["garbage", "another job's id"],
)
async def test_a_result_line_that_is_not_the_job_s_reply_is_invalid_output(
    result: bytes,
) -> None:
    runner = ScriptedRunner(lambda job_id: [("result", result)])
    connection = runner.connect()

    with pytest.raises(InvalidOutput, match="something other than its result"):
        await run(connection)
    assert not connection.reusable and runner.kills == 1


async def test_a_runner_that_dies_is_known_by_its_exit_status() -> None:
    runner = ScriptedRunner(lambda job_id: [("log", b"dying\n"), ("eof", b"")], exit_status=3)
    connection = runner.connect()

    with pytest.raises(StrategyCrashed, match="exited with code 3") as caught:
        await run(connection)
    assert caught.value.log_tail == "dying"
    assert not connection.reusable


async def test_silence_is_a_timeout() -> None:
    runner = ScriptedRunner(lambda job_id: [("log", b"thinking\n")])
    connection = runner.connect()

    with pytest.raises(StrategyTimeout, match=r"within 0\.2 s") as caught:
        await run(connection, timeout_s=0.2)
    assert caught.value.log_tail == "thinking"
    assert runner.kills == 1


async def test_a_log_flood_and_a_result_over_its_cap_are_output_too_large() -> None:
    flood = ScriptedRunner(lambda job_id: [("log", b"x" * 600)] * 3)
    big = ScriptedRunner(lambda job_id: [("result", b"x" * 600)] * 3)

    with pytest.raises(OutputTooLarge, match="printed more than"):
        await run(flood.connect(), log_flood_bytes=1000)
    with pytest.raises(OutputTooLarge, match="returned more than"):
        await run(big.connect(), output_bytes=1000)
    assert flood.kills == big.kills == 1
