"""ProcessSandbox sessions: warm children reused within a session, never across sessions.

A child is observed through the strategy itself: :data:`PROBE` appends the pid it runs in to a
file each time it is created (once per call, describe or signals) and puts it in each signal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

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
from shared.sandbox import ProcessSandbox, SandboxLimits
from shared.strategy import ComponentRef
from tests.unit.sandbox.support import MiB, alive, runners, source

PROBE = """
import os
from shared.strategy import BaseStrategy

class Probe(BaseStrategy):
    params = {"pids": ""}

    def __init__(self, **params):
        super().__init__(**params)
        with open(self.params["pids"], "a") as f:
            f.write(f"{os.getpid()}\\n")

    def decide(self, df, interval, **kw):
        return {"signal": "BUY", "meta": {"pid": os.getpid()}}
"""


@pytest.fixture
def bars(btc: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, int]]:
    """Five bars of BTCUSDT, one simulated: a call that costs next to nothing."""
    return {"BTCUSDT": (btc.iloc[:5].reset_index(drop=True), 4)}


@pytest.fixture
def pids(tmp_path: Path) -> Path:
    return tmp_path / "pids"


@pytest.fixture
def probe(pids: Path) -> ComponentRef:
    return source(PROBE, "Probe", pids=str(pids))


def strategy(body: str, pids: Path) -> ComponentRef:
    """A strategy whose ``decide`` first records its pid in ``pids``, then runs ``body``."""
    code = f"""
import os, subprocess, sys, threading, time
from shared.strategy import BaseStrategy

class S(BaseStrategy):
    params = {{"pids": ""}}

    def decide(self, df, interval, **kw):
        with open(self.params["pids"], "a") as f:
            f.write(f"{{os.getpid()}}\\n")
{"".join("        " + line + chr(10) for line in body.strip().splitlines())}
"""
    return source(code, pids=str(pids))


def last_pid(pids: Path) -> int:
    return int(pids.read_text().split()[-1])


async def pid_of(
    sandbox: ProcessSandbox,
    probe: ComponentRef,
    bars: dict[str, tuple[pd.DataFrame, int]],
    session: str | None,
    limits: SandboxLimits | None = None,
) -> int:
    """Run the probe; the pid of the child that ran it."""
    signals = await sandbox.signals(
        probe, bars, interval="1h", session=session, limits=limits or SandboxLimits()
    )
    pid: int = signals["BTCUSDT"][0]["meta"]["pid"]
    return pid


async def wait_until_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"child {pid} is still alive"
        await asyncio.sleep(0.02)


# -- reuse ----------------------------------------------------------------------------------


async def test_calls_of_a_session_reuse_one_warm_child(
    sandbox: ProcessSandbox,
    probe: ComponentRef,
    bars: dict[str, tuple[pd.DataFrame, int]],
    pids: Path,
) -> None:
    await sandbox.describe(probe, ["BTCUSDT"], session="bt")
    first = last_pid(pids)

    later = [await pid_of(sandbox, probe, bars, "bt") for _ in range(3)]

    assert later == [first] * 3
    assert alive(first)  # kept warm between calls
    assert runners() == [first]


async def test_without_a_session_each_call_has_a_child_of_its_own(
    sandbox: ProcessSandbox, probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    first = await pid_of(sandbox, probe, bars, None)
    second = await pid_of(sandbox, probe, bars, None)

    assert first != second
    assert not alive(first) and not alive(second)
    assert runners() == []


async def test_concurrent_calls_of_a_session_never_share_a_child(
    sandbox: ProcessSandbox, probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    warm = await pid_of(sandbox, probe, bars, "bt")

    pair = await asyncio.gather(*(pid_of(sandbox, probe, bars, "bt") for _ in range(2)))
    again = await asyncio.gather(*(pid_of(sandbox, probe, bars, "bt") for _ in range(2)))

    assert warm in pair and len(set(pair)) == 2  # one reused, one started for the other call
    assert set(again) == set(pair)  # the pool is two warm children now


async def test_sessions_never_share_a_child(
    sandbox: ProcessSandbox, probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    a = await pid_of(sandbox, probe, bars, "a")
    b = await pid_of(sandbox, probe, bars, "b")  # while a's child is idle

    assert a != b
    assert await pid_of(sandbox, probe, bars, "a") == a
    assert await pid_of(sandbox, probe, bars, "b") == b


async def test_a_warm_child_serves_only_calls_with_its_memory_limit(
    sandbox: ProcessSandbox, probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    # RLIMIT_AS is set when the child starts; a call asking for another limit needs another.
    two_gib = await pid_of(sandbox, probe, bars, "bt")
    one_gib = await pid_of(sandbox, probe, bars, "bt", SandboxLimits(memory_bytes=1024 * MiB))

    assert two_gib != one_gib
    assert await pid_of(sandbox, probe, bars, "bt") == two_gib


# -- what a job leaves behind ---------------------------------------------------------------


async def test_uploaded_code_starts_afresh_in_a_warm_child(
    sandbox: ProcessSandbox, bars: dict[str, tuple[pd.DataFrame, int]], tmp_path: Path
) -> None:
    code = source(
        """
        import os
        from shared.strategy import BaseStrategy

        SEEN = []  # module state: a new module per call, so always empty at first

        class S(BaseStrategy):
            calls = 0  # class state, likewise

            def decide(self, df, interval, **kw):
                SEEN.append(1)
                type(self).calls += 1
                meta = {
                    "pid": os.getpid(),
                    "seen": len(SEEN),
                    "calls": S.calls,
                    "env": os.environ.get("LEFT_BEHIND"),
                    "cwd": os.getcwd(),
                    "home": os.environ["HOME"],
                    "files": sorted(os.listdir(os.environ["HOME"])),
                }
                os.environ["LEFT_BEHIND"] = "1"
                with open("left-behind.txt", "w") as f:
                    f.write("x")
                os.chdir("/")
                return {"signal": "BUY", "meta": meta}
        """
    )

    first, second = [
        (await sandbox.signals(code, bars, interval="1h", session="bt"))["BTCUSDT"][0]["meta"]
        for _ in range(2)
    ]

    assert second["pid"] == first["pid"]
    assert (second["seen"], second["calls"], second["env"]) == (1, 1, None)
    assert second["cwd"] == second["home"]  # back in its own directory
    [candles] = second["files"]  # only the call's own candles: the first call's files are gone
    assert candles.startswith("candles-")


@pytest.mark.parametrize(
    "leftover",
    [
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()",
        "sleep = subprocess.Popen(['sleep', '60'])\n"
        "with open(self.params['pids'], 'a') as f:\n"
        "    f.write(f'{sleep.pid}\\n')",
    ],
    ids=["thread", "process"],
)
async def test_a_call_that_leaves_something_running_does_not_reuse_its_child(
    sandbox: ProcessSandbox,
    probe: ComponentRef,
    bars: dict[str, tuple[pd.DataFrame, int]],
    pids: Path,
    tmp_path: Path,
    leftover: str,
) -> None:
    # Its thread or process would run on into the next call; the result still counts.
    warm = await pid_of(sandbox, probe, bars, "bt")
    code = strategy(f"{leftover}\nreturn {{'signal': 'BUY'}}", tmp_path / "leaky")

    signals = await sandbox.signals(code, bars, interval="1h", session="bt")

    assert [record["signal"] for record in signals["BTCUSDT"]] == ["BUY"]
    recorded = [int(pid) for pid in (tmp_path / "leaky").read_text().split()]
    assert recorded[0] == warm
    assert not any(alive(pid) for pid in recorded)  # the sleep too: the group was killed
    assert await pid_of(sandbox, probe, bars, "bt") != warm


async def test_the_log_of_a_failing_call_is_its_own(
    sandbox: ProcessSandbox, bars: dict[str, tuple[pd.DataFrame, int]]
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
    await sandbox.signals(code, bars, interval="1h", session="bt")

    with pytest.raises(StrategyCrashed, match="boom") as caught:
        await sandbox.signals(failing, bars, interval="1h", session="bt")

    assert "printed by the failing call" in caught.value.log_tail
    assert "good call" not in caught.value.log_tail
    assert "stratorch" not in caught.value.log_tail  # no end-of-job marker shows


# -- failures -------------------------------------------------------------------------------

#: Failures that may leave the child in a bad state: body of decide, error, limits.
BREAKING = {
    "timeout": ("while True:\n    pass", StrategyTimeout, SandboxLimits(timeout_s=1)),
    "out of memory": (
        "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 2**20))",
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
async def test_a_failure_that_may_break_the_child_retires_it(
    sandbox: ProcessSandbox,
    probe: ComponentRef,
    bars: dict[str, tuple[pd.DataFrame, int]],
    tmp_path: Path,
    body: str,
    error: type[StratorchError],
    limits: SandboxLimits,
) -> None:
    warm = await pid_of(sandbox, probe, bars, "bt", limits)
    breaking = strategy(body, tmp_path / "breaking")

    with pytest.raises(error):
        await sandbox.signals(breaking, bars, interval="1h", session="bt", limits=limits)

    # It failed in the warm child (out of memory, then in a new one too), which is gone.
    recorded = [int(pid) for pid in (tmp_path / "breaking").read_text().split()]
    assert recorded[0] == warm
    assert not any(alive(pid) for pid in recorded)
    after = await pid_of(sandbox, probe, bars, "bt", limits)  # and the session goes on
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
async def test_a_strategy_error_keeps_the_child(
    sandbox: ProcessSandbox,
    probe: ComponentRef,
    bars: dict[str, tuple[pd.DataFrame, int]],
    tmp_path: Path,
    code: str,
    error: type[StratorchError],
) -> None:
    warm = await pid_of(sandbox, probe, bars, "bt")

    with pytest.raises(error):
        await sandbox.signals(strategy(code, tmp_path / "f"), bars, interval="1h", session="bt")

    assert await pid_of(sandbox, probe, bars, "bt") == warm


async def test_running_out_of_memory_in_a_warm_child_is_decided_by_a_new_one(
    sandbox: ProcessSandbox, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    # A warm child may hold memory earlier calls left behind (here on purpose, in builtins;
    # usually a fragmented heap). Whether a call fits must not depend on which child ran it.
    def hoarder(hoard_mib: int, need_mib: int) -> ComponentRef:
        code = """
            import builtins, os
            from shared.strategy import BaseStrategy

            class S(BaseStrategy):
                params = {"hoard": 0, "need": 0}

                def decide(self, df, interval, **kw):
                    if self.params["hoard"]:
                        builtins.HOARD = bytearray(self.params["hoard"] * 2**20)
                    need = bytearray(self.params["need"] * 2**20)
                    return {"signal": "BUY", "meta": {"pid": os.getpid()}}
            """
        return source(code, hoard=hoard_mib, need=need_mib)

    async def pid(code: ComponentRef) -> int:
        signals = await sandbox.signals(code, bars, interval="1h", session="bt", limits=limits)
        value: int = signals["BTCUSDT"][0]["meta"]["pid"]
        return value

    limits = SandboxLimits(memory_bytes=1024 * MiB)
    hoarding = await pid(hoarder(400, 0))

    fitting = await pid(hoarder(0, 400))  # not beside the hoard, but in a new child

    assert fitting != hoarding and not alive(hoarding)
    with pytest.raises(StrategyOutOfMemory):  # what fits nowhere still fails
        await pid(hoarder(0, 2048))


# -- lifecycle ------------------------------------------------------------------------------


async def test_idle_children_are_retired_after_the_ttl(
    probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    async with ProcessSandbox(idle_ttl_s=0.2) as sandbox:
        first = await pid_of(sandbox, probe, bars, "bt")

        await wait_until_dead(first)

        assert runners() == []
        assert await pid_of(sandbox, probe, bars, "bt") != first


async def test_aclose_ends_every_child_idle_or_busy(
    probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]], tmp_path: Path
) -> None:
    sandbox = ProcessSandbox()
    idle = [await pid_of(sandbox, probe, bars, name) for name in ("a", "b")]
    hang = strategy("while True:\n    pass", tmp_path / "busy")
    busy_call = asyncio.create_task(sandbox.signals(hang, bars, interval="1h", session="c"))
    while not (tmp_path / "busy").exists():
        await asyncio.sleep(0.02)
    busy = last_pid(tmp_path / "busy")

    await sandbox.aclose()

    assert runners() == []
    assert not any(alive(pid) for pid in [*idle, busy])
    with pytest.raises(RuntimeError, match="closed while class 'S' ran"):
        await busy_call


@pytest.mark.filterwarnings("ignore:.*was never closed:ResourceWarning")
def test_children_of_a_sandbox_left_open_end_with_its_event_loop(
    probe: ComponentRef, bars: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    # What `stratorch run` does: asyncio.run() over a sandbox nobody closes.
    async def backtest() -> int:
        return await pid_of(ProcessSandbox(), probe, bars, "bt")

    pid = asyncio.run(backtest())

    assert not alive(pid)
    assert runners() == []
