"""Sessions, against both sandboxes: warm runners reused within a session, never across
sessions, retired when they may be unfit, idle too long, or the sandbox closes.

A runner is observed through the strategy itself: :data:`PROBE` puts the id of the runner
it runs in (see :data:`~tests.unit.sandbox.kinds.RUNNER_ID`) in each signal's ``meta``; from
outside, ``kind.runners()`` lists the runners that are not yet gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pandas as pd
import pytest

from shared.errors import (
    InvalidOutput,
    OutputTooLarge,
    RequestRejected,
    StrategyCrashed,
    StrategyOutOfMemory,
    StrategyTimeout,
    StratorchError,
)
from shared.sandbox import Sandbox, SandboxLimits
from shared.strategy import ComponentRef
from tests.unit.sandbox.kinds import RUNNER_ID, Kind, ProcessKind
from tests.unit.sandbox.support import MiB, alive, source

PROBE = f"""
{RUNNER_ID}
from shared.strategy import BaseStrategy

class Probe(BaseStrategy):
    def decide(self, df, interval, **kw):
        return {{"signal": "BUY", "meta": {{"runner": runner_id()}}}}
"""


@pytest.fixture
def bars(btc: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, int]]:
    """Five bars of BTCUSDT, one simulated: a call that costs next to nothing."""
    return {"BTCUSDT": (btc.iloc[:5].reset_index(drop=True), 4)}


@pytest.fixture
def probe() -> ComponentRef:
    return source(PROBE, "Probe")


def strategy(body: str) -> ComponentRef:
    """A strategy whose ``decide`` runs ``body``; its imports are at hand."""
    code = f"""
import os, subprocess, sys, threading, time
{RUNNER_ID}
from shared.strategy import BaseStrategy

class S(BaseStrategy):
    def decide(self, df, interval, **kw):
{"".join("        " + line + chr(10) for line in body.strip().splitlines())}
"""
    return source(code)


async def runner_of(
    sandbox: Sandbox,
    probe: ComponentRef,
    bars: dict[str, tuple[pd.DataFrame, int]],
    session: str | None,
    limits: SandboxLimits | None = None,
) -> str:
    """Run the probe; the id of the runner that ran it."""
    signals = await sandbox.signals(
        probe, bars, interval="1h", session=session, limits=limits or SandboxLimits()
    )
    runner: str = signals["BTCUSDT"]["meta"][0]["runner"]
    return runner


async def wait_until_gone(kind: Kind, runner: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while runner in await kind.runners():
        assert time.monotonic() < deadline, f"runner {runner} is still there"
        await asyncio.sleep(0.05)


async def wait_for_runners(kind: Kind, n: int, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(found := await kind.runners()) < n:
        assert time.monotonic() < deadline, f"{len(found)} runners, not {n}"
        await asyncio.sleep(0.05)
    return found


# -- reuse ----------------------------------------------------------------------------------


async def test_calls_of_a_session_reuse_one_warm_runner(
    kind: Kind,
    pooled: Sandbox,
    probe: ComponentRef,
    bars: dict[str, tuple[pd.DataFrame, int]],
) -> None:
    await pooled.describe(probe, ["BTCUSDT"], session="bt")
    [first] = await kind.runners()

    later = [await runner_of(pooled, probe, bars, "bt") for _ in range(3)]

    assert later == [first] * 3
    assert await kind.alive(first)  # kept warm between calls
    assert await kind.runners() == [first]


async def test_without_a_session_each_call_has_a_runner_of_its_own(
    kind: Kind, pooled: Sandbox, probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    first = await runner_of(pooled, probe, bars, None)
    second = await runner_of(pooled, probe, bars, None)

    assert first != second
    assert await kind.runners() == []


async def test_concurrent_calls_of_a_session_never_share_a_runner(
    pooled: Sandbox, probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    warm = await runner_of(pooled, probe, bars, "bt")

    pair = await asyncio.gather(*(runner_of(pooled, probe, bars, "bt") for _ in range(2)))
    again = await asyncio.gather(*(runner_of(pooled, probe, bars, "bt") for _ in range(2)))

    assert warm in pair and len(set(pair)) == 2  # one reused, one started for the other call
    assert set(again) == set(pair)  # the pool is two warm runners now


async def test_sessions_never_share_a_runner(
    pooled: Sandbox, probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    a = await runner_of(pooled, probe, bars, "a")
    b = await runner_of(pooled, probe, bars, "b")  # while a's runner is idle

    assert a != b
    assert await runner_of(pooled, probe, bars, "a") == a
    assert await runner_of(pooled, probe, bars, "b") == b


async def test_with_a_spare_a_new_session_runs_in_a_runner_started_before_it(
    probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    kind = ProcessKind()
    async with kind.new(spare=True) as sandbox:
        a = await runner_of(sandbox, probe, bars, "a")
        ready = set(await wait_for_runners(kind, 2)) - {a}  # a's, idle, and one started ahead

        b = await runner_of(sandbox, probe, bars, "b")
        c = await runner_of(sandbox, probe, bars, "c")

        assert {b} == ready  # running before b's first call, and b's now
        assert len({a, b, c}) == 3  # sessions still never share a runner
        assert await runner_of(sandbox, probe, bars, "b") == b
    assert await kind.runners() == []  # the one started ahead of the next session too


async def test_a_warm_runner_serves_only_calls_with_its_memory_limit(
    pooled: Sandbox, probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    # The memory limit is set when the runner starts; a call asking for another needs another.
    two_gib = await runner_of(pooled, probe, bars, "bt")
    one_gib = await runner_of(pooled, probe, bars, "bt", SandboxLimits(memory_bytes=1024 * MiB))

    assert two_gib != one_gib
    assert await runner_of(pooled, probe, bars, "bt") == two_gib


# -- what a job leaves behind ---------------------------------------------------------------


async def test_uploaded_code_starts_afresh_in_a_warm_runner(
    kind: Kind, pooled: Sandbox, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    code = source(
        f"""
        {RUNNER_ID.strip().replace(chr(10), chr(10) + " " * 8)}
        import os
        from shared.strategy import BaseStrategy

        SEEN = []  # module state: a new module per call, so always empty at first

        class S(BaseStrategy):
            calls = 0  # class state, likewise

            def decide(self, df, interval, **kw):
                SEEN.append(1)
                type(self).calls += 1
                meta = {{
                    "runner": runner_id(),
                    "seen": len(SEEN),
                    "calls": S.calls,
                    "env": os.environ.get("LEFT_BEHIND"),
                    "cwd": os.getcwd(),
                    "files": sorted(os.listdir(os.environ["HOME"])),
                }}
                os.environ["LEFT_BEHIND"] = "1"
                with open(os.path.join(os.environ["HOME"], "left-behind.txt"), "w") as f:
                    f.write("x")
                os.chdir(os.environ["HOME"] if meta["cwd"] == "/" else "/")
                return {{"signal": "BUY", "meta": meta}}
        """
    )

    first, second = [
        (await pooled.signals(code, bars, interval="1h", session="bt"))["BTCUSDT"]["meta"][0]
        for _ in range(2)
    ]

    assert second["runner"] == first["runner"]
    assert (second["seen"], second["calls"], second["env"]) == (1, 1, None)
    assert second["cwd"] == first["cwd"]  # back where it started
    if kind.name == "process":  # a child's directory is emptied; a container's /tmp is not
        [candles] = second["files"]  # only the call's own candles: the first call's are gone
        assert candles.startswith("candles-")


@pytest.mark.parametrize(
    "leftover",
    [
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\nsleep = None",
        "sleep = subprocess.Popen(['sleep', '60']).pid",
    ],
    ids=["thread", "process"],
)
async def test_a_call_that_leaves_something_running_does_not_reuse_its_runner(
    kind: Kind,
    pooled: Sandbox,
    probe: ComponentRef,
    bars: dict[str, tuple[pd.DataFrame, int]],
    leftover: str,
) -> None:
    # Its thread or process would run on into the next call; the result still counts.
    warm = await runner_of(pooled, probe, bars, "bt")
    code = strategy(f"{leftover}\nreturn {{'signal': 'BUY', 'meta': {{'sleep': sleep}}}}")

    signals = await pooled.signals(code, bars, interval="1h", session="bt")

    assert signals["BTCUSDT"]["signal"] == ["BUY"]
    assert await kind.runners() == []  # the warm runner ran it and is gone
    sleep = signals["BTCUSDT"]["meta"][0]["sleep"]
    if sleep is not None and kind.name == "process":  # a container takes all it ran along
        assert not alive(sleep)  # the group was killed
    assert await runner_of(pooled, probe, bars, "bt") != warm


async def test_the_log_of_a_failing_call_is_its_own(
    pooled: Sandbox, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    code = source(
        """
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            params = {"fail": False}

            def decide(self, df, interval, **kw):
                print("printed by the", "failing" if self.params["fail"] else "good", "call")
                if self.params["fail"]:
                    raise ValueError("boom")
                return {"signal": "BUY"}
        """
    )
    failing = dataclasses.replace(code, params={"fail": True})
    await pooled.signals(code, bars, interval="1h", session="bt")

    with pytest.raises(StrategyCrashed, match="boom") as caught:
        await pooled.signals(failing, bars, interval="1h", session="bt")

    assert "printed by the failing call" in caught.value.log_tail
    assert "good call" not in caught.value.log_tail
    assert "stratorch" not in caught.value.log_tail  # no end-of-job marker shows


# -- failures -------------------------------------------------------------------------------

#: Failures that may leave the runner in a bad state: body of decide, error, limits.
BREAKING = {
    "timeout": ("while True:\n    pass", StrategyTimeout, SandboxLimits(timeout_s=1)),
    "out of memory": (
        "blocks = []\nwhile True:\n    blocks.append(bytearray(b'x') * 64 * 2**20)",
        StrategyOutOfMemory,
        SandboxLimits(memory_bytes=512 * MiB),
    ),
    "log flood": (
        "line = 'x' * 2**20\nfor _ in range(40):\n    print(line)",
        OutputTooLarge,
        SandboxLimits(log_flood_bytes=8 * MiB),
    ),
    "result over its cap": (
        "return {'signal': 'BUY', 'meta': {'pad': 'x' * 2**20}}",
        OutputTooLarge,
        SandboxLimits(output_bytes=512 * 1024),
    ),
    "exit": ("os._exit(3)", StrategyCrashed, SandboxLimits()),
}


@pytest.mark.parametrize(("body", "error", "limits"), BREAKING.values(), ids=BREAKING)
async def test_a_failure_that_may_break_the_runner_retires_it(
    kind: Kind,
    pooled: Sandbox,
    probe: ComponentRef,
    bars: dict[str, tuple[pd.DataFrame, int]],
    body: str,
    error: type[StratorchError],
    limits: SandboxLimits,
) -> None:
    # Warmed with the same memory limit (so the runner serves the call), no tight timeout.
    warming = SandboxLimits(memory_bytes=limits.memory_bytes)
    warm = await runner_of(pooled, probe, bars, "bt", warming)

    with pytest.raises(error):
        await pooled.signals(strategy(body), bars, interval="1h", session="bt", limits=limits)

    # It failed in the warm runner (out of memory, then in a new one too), which is gone.
    assert await kind.runners() == []
    after = await runner_of(pooled, probe, bars, "bt", warming)  # and the session goes on
    assert after != warm


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("raise ValueError('boom')", StrategyCrashed),
        ("sys.exit(3)", StrategyCrashed),
        ("return 'BUY'", InvalidOutput),
        ("def broken(:", RequestRejected),
    ],
    ids=["exception", "sys.exit", "invalid output", "syntax error"],
)
async def test_a_strategy_error_keeps_the_runner(
    pooled: Sandbox,
    probe: ComponentRef,
    bars: dict[str, tuple[pd.DataFrame, int]],
    code: str,
    error: type[StratorchError],
) -> None:
    warm = await runner_of(pooled, probe, bars, "bt")

    with pytest.raises(error):
        await pooled.signals(strategy(code), bars, interval="1h", session="bt")

    assert await runner_of(pooled, probe, bars, "bt") == warm


async def test_running_out_of_memory_in_a_warm_runner_is_decided_by_a_new_one(
    kind: Kind, pooled: Sandbox, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    # A warm runner may hold memory earlier calls left behind (here on purpose, in builtins;
    # usually a fragmented heap). Whether a call fits must not depend on which runner ran it.
    # The memory is written to, so it counts against a container's memory limit too.
    def hoarder(hoard_mib: int, need_mib: int) -> ComponentRef:
        code = f"""
            {RUNNER_ID.strip().replace(chr(10), chr(10) + " " * 12)}
            import builtins
            from shared.strategy import BaseStrategy

            class S(BaseStrategy):
                params = {{"hoard": 0, "need": 0}}

                def decide(self, df, interval, **kw):
                    if self.params["hoard"]:
                        builtins.HOARD = bytearray(b"x") * (self.params["hoard"] * 2**20)
                    need = bytearray(b"x") * (self.params["need"] * 2**20)
                    return {{"signal": "BUY", "meta": {{"runner": runner_id()}}}}
            """
        return source(code, hoard=hoard_mib, need=need_mib)

    async def runner(code: ComponentRef) -> str:
        signals = await pooled.signals(code, bars, interval="1h", session="bt", limits=limits)
        value: str = signals["BTCUSDT"]["meta"][0]["runner"]
        return value

    limits = SandboxLimits(memory_bytes=1024 * MiB)
    # A child's limit is its address space, of which pandas maps some 300 MiB at its start; a
    # container's is the memory it uses, some 100 MiB at its start.
    hoard, need = (400, 400) if kind.name == "process" else (700, 300)
    hoarding = await runner(hoarder(hoard, 0))

    fitting = await runner(hoarder(0, need))  # not beside the hoard, but in a new runner

    assert fitting != hoarding and not await kind.alive(hoarding)
    with pytest.raises(StrategyOutOfMemory):  # what fits nowhere still fails
        await runner(hoarder(0, 2048))


# -- lifecycle ------------------------------------------------------------------------------


async def test_idle_runners_are_retired_after_the_ttl(
    kind: Kind, probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    async with kind.new(idle_ttl_s=0.2) as sandbox:
        first = await runner_of(sandbox, probe, bars, "bt")

        await wait_until_gone(kind, first)

        assert await kind.runners() == []
        assert await runner_of(sandbox, probe, bars, "bt") != first


async def test_aclose_retires_every_runner_idle_or_busy(
    kind: Kind, probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    sandbox = kind.new()
    for name in ("a", "b"):
        await runner_of(sandbox, probe, bars, name)
    hang = strategy("while True:\n    pass")
    busy_call = asyncio.create_task(sandbox.signals(hang, bars, interval="1h", session="c"))
    await wait_for_runners(kind, 3)
    await asyncio.sleep(1.0)  # the call is under way

    await sandbox.aclose()

    assert await kind.runners() == []
    with pytest.raises(RuntimeError, match="closed while class 'S' ran"):
        await busy_call


async def test_cancelling_a_call_retires_its_runner(
    kind: Kind, pooled: Sandbox, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    hang = strategy("while True:\n    pass")
    call = asyncio.create_task(pooled.signals(hang, bars, interval="1h", session="bt"))
    await wait_for_runners(kind, 1)
    await asyncio.sleep(1.0)  # the call is under way

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    assert await kind.runners() == []


async def test_a_closed_sandbox_refuses_calls(kind: Kind) -> None:
    sandbox = kind.new()
    await sandbox.aclose()
    await sandbox.aclose()  # idempotent

    with pytest.raises(RuntimeError, match="closed"):
        await sandbox.describe(ComponentRef.from_json("sma_cross"), ["BTCUSDT"])


@pytest.mark.filterwarnings("ignore:.*was never closed:ResourceWarning")
@pytest.mark.filterwarnings("ignore:Unclosed:ResourceWarning")
def test_runners_of_a_sandbox_left_open_end_with_its_event_loop(
    kind: Kind, probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    # What `stratorch run` does: asyncio.run() over a sandbox nobody closes.
    async def backtest() -> str:
        return await runner_of(kind.new(), probe, bars, "bt")

    runner = asyncio.run(backtest())

    assert asyncio.run(kind.runners()) == []
    assert not asyncio.run(kind.alive(runner))
