"""ProcessSandbox as a symbol worker uses it: real candles, real child processes.

Each failure a strategy can cause comes back as the one structured error a user sees, and
nothing the strategy started outlives the call. Most tests run twice: with a child of its own
per call (``session=None``) and in a session of warm children (``"bt1"``); what both sandboxes
promise of sessions — reuse, isolation, retirement, stop, shutdown — is tested against both in
``test_sessions.py`` and ``test_stop.py``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
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
)
from shared.sandbox import DEFAULT_LIMITS, ProcessSandbox, SandboxLimits, StrategyInfo
from shared.sandbox.spawn import start_ahead
from shared.strategy import BUILTIN_STRATEGIES, ComponentRef, compute_signals, load_component
from tests.unit.sandbox.support import (
    MiB,
    alive,
    source,
    unix_session,
    wait_for_runner,
)


@pytest.fixture(params=[None, "bt1"], ids=["one-off", "session"])
def session(request: pytest.FixtureRequest) -> str | None:
    """The ``session=`` of the test's calls: a child per call, or warm ones reused."""
    value: str | None = request.param
    return value


# -- describe -------------------------------------------------------------------------------


async def test_describe_builtin(sandbox: ProcessSandbox, session: str | None) -> None:
    code = ComponentRef.from_json({"builtin": "sma_cross", "params": {"fast": 5, "slow": 20}})

    info = await sandbox.describe(code, ["BTCUSDT", "ETHUSDT"], session=session)

    assert info == StrategyInfo(lookback=21, units=[["BTCUSDT"], ["ETHUSDT"]])


async def test_describe_source_with_its_own_work_units(
    sandbox: ProcessSandbox, session: str | None
) -> None:
    code = source(
        """
        from shared.strategy import BaseStrategy

        class Pairs(BaseStrategy):
            params = {"n": 3}

            def get_required_lookback(self):
                return self.params["n"]

            def work_units(self, symbols):
                pair = [s for s in symbols if s in ("BTCUSDT", "ETHUSDT")]
                return [pair] + [[s] for s in symbols if s not in pair]

            def decide(self, df, interval, **kw):
                return None
        """,
        "Pairs",
        n=7,
    )

    info = await sandbox.describe(code, ["BTCUSDT", "SOLUSDT", "ETHUSDT"], session=session)

    assert info == StrategyInfo(
        lookback=7, units=[["BTCUSDT", "ETHUSDT"], ["SOLUSDT"]], vectorized=False
    )


@pytest.mark.parametrize(
    ("lookback", "units", "expected"),
    [
        ("0", "[[s] for s in symbols]", "positive int"),
        ("'50'", "[[s] for s in symbols]", "positive int"),
        ("10", "[symbols[:1]]", "left out ETHUSDT"),
        ("10", "[symbols, symbols[:1]]", "more than one place"),
        ("10", "[symbols + ['DOGEUSDT']]", "'DOGEUSDT', which is not one of"),
        ("10", "[symbols, []]", "empty unit"),
        ("10", "'BTCUSDT'", "list of lists"),
    ],
)
async def test_describe_rejects_what_a_strategy_says_about_itself(
    sandbox: ProcessSandbox, lookback: str, units: str, expected: str
) -> None:
    code = source(
        f"""
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            def get_required_lookback(self):
                return {lookback}

            def work_units(self, symbols):
                return {units}
        """
    )

    with pytest.raises(InvalidOutput, match=expected):
        await sandbox.describe(code, ["BTCUSDT", "ETHUSDT"])


# -- signals --------------------------------------------------------------------------------


async def test_signals_of_a_builtin_equal_running_it_in_process(
    sandbox: ProcessSandbox, session: str | None, btc: pd.DataFrame
) -> None:
    spec = {"builtin": "sma_cross", "params": {"fast": 10, "slow": 50}}
    first_sim = 200

    signals = await sandbox.signals(
        ComponentRef.from_json(spec), {"BTCUSDT": (btc, first_sim)}, interval="1h", session=session
    )

    strategy = load_component(ComponentRef.from_json(spec), registry=BUILTIN_STRATEGIES)
    expected = compute_signals(strategy, btc, first_sim=first_sim, interval="1h", symbol="BTCUSDT")
    assert len(expected["t"]) > 50
    assert signals == {"BTCUSDT": expected}


async def test_signals_of_several_symbols_come_back_per_symbol(
    sandbox: ProcessSandbox, session: str | None, btc: pd.DataFrame
) -> None:
    code = ComponentRef.from_json({"builtin": "momentum"})
    halves = {"AAA": (btc.iloc[:2700], 100), "BBB": (btc.iloc[2700:].reset_index(drop=True), 0)}

    signals = await sandbox.signals(code, halves, interval="1h", session=session)

    strategy = load_component(
        ComponentRef.from_json({"builtin": "momentum"}), registry=BUILTIN_STRATEGIES
    )
    for symbol, (frame, first_sim) in halves.items():
        expected = compute_signals(
            strategy, frame, first_sim=first_sim, interval="1h", symbol=symbol
        )
        assert signals[symbol] == expected


async def test_what_a_strategy_prints_goes_to_the_log_not_the_result(
    sandbox: ProcessSandbox, session: str | None, short: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    code = source(
        """
        import os, sys
        from shared.strategy import BaseStrategy

        print("loading")  # at import, before any result exists

        class S(BaseStrategy):
            def decide(self, df, interval, **kw):
                print('{"ok": true, "signals": {}}', "x" * 200)
                os.write(1, b"raw fd 1 write, as C code would\\n")
                sys.stderr.write("to stderr\\n")
                return {"signal": "BUY", "meta": {"bar": int(df["open_time"].iloc[-1])}}
        """
    )

    signals = await sandbox.signals(
        code, short, interval="1h", session=session
    )  # ~200 KiB of prints

    times = short["BTCUSDT"][0]["open_time"].tolist()[10:]
    assert signals["BTCUSDT"]["t"] == times
    assert signals["BTCUSDT"]["meta"] == [{"bar": t} for t in times]


async def test_an_empty_request_runs_nothing(sandbox: ProcessSandbox) -> None:
    assert await sandbox.signals(ComponentRef.from_json("sma_cross"), {}, interval="1h") == {}


# -- failures -------------------------------------------------------------------------------


async def test_a_syntax_error_rejects_the_request_naming_the_line(
    sandbox: ProcessSandbox,
    session: str | None,
) -> None:
    code = source(
        """
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            def decide(self, df, interval, **kw)
                return None
        """
    )

    with pytest.raises(RequestRejected, match="syntax error at line 5") as caught:
        await sandbox.describe(code, ["BTCUSDT"], session=session)
    assert caught.value.kind == "rejected"


async def test_an_unknown_builtin_rejects_the_request(
    sandbox: ProcessSandbox, session: str | None
) -> None:
    with pytest.raises(RequestRejected, match=r"unknown strategy 'sma_crossing'.*sma_cross"):
        await sandbox.describe(ComponentRef.from_json("sma_crossing"), ["BTCUSDT"], session=session)


async def test_an_exception_in_decide_is_a_crash_with_its_traceback(
    sandbox: ProcessSandbox, session: str | None, short: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    code = source(
        """
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            def decide(self, df, interval, **kw):
                print("about to fail")
                raise ValueError("boom")
        """
    )

    with pytest.raises(StrategyCrashed) as caught:
        await sandbox.signals(code, short, interval="1h", session=session)

    error = caught.value
    assert error.kind == "crashed"
    assert error.symbol == "BTCUSDT"
    assert "ValueError: boom" in error.message
    assert "line 7 in decide" in error.message
    assert "about to fail" in error.log_tail
    assert 'line 7, in decide\n    raise ValueError("boom")' in error.log_tail
    assert "shared/sandbox" not in error.log_tail  # the runner's frames are trimmed


async def test_an_infinite_loop_times_out_and_leaves_no_process(
    sandbox: ProcessSandbox, session: str | None, short: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    code = source(
        """
        import subprocess
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            def decide(self, df, interval, **kw):
                subprocess.Popen(["sleep", "60"])  # must not outlive the call either
                while True:
                    pass
        """
    )
    started = time.monotonic()
    call = asyncio.create_task(
        sandbox.signals(
            code, short, interval="1h", limits=SandboxLimits(timeout_s=1), session=session
        )
    )
    runner = await wait_for_runner()
    seen = {runner}  # and, load permitting, the sleep it starts
    while not call.done():
        seen.update(unix_session(runner))
        await asyncio.sleep(0.02)

    with pytest.raises(StrategyTimeout, match="within 1 s"):
        await call

    assert time.monotonic() - started < 2.5
    assert [pid for pid in seen if alive(pid)] == []
    assert unix_session(runner) == []


@pytest.mark.parametrize(
    "bomb",
    [
        "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 2**20))",
        "import numpy as np\nx = np.ones(2**30)",
    ],
    ids=["python", "numpy"],
)
async def test_a_memory_bomb_is_out_of_memory(
    sandbox: ProcessSandbox,
    session: str | None,
    short: dict[str, tuple[pd.DataFrame, int]],
    bomb: str,
) -> None:
    code = source(
        """
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            def decide(self, df, interval, **kw):
                exec(BOMB)
        """.replace("BOMB", repr(bomb))
    )

    with pytest.raises(StrategyOutOfMemory, match="out of memory on BTCUSDT") as caught:
        await sandbox.signals(
            code,
            short,
            interval="1h",
            limits=SandboxLimits(memory_bytes=512 * MiB),
            session=session,
        )
    assert caught.value.kind == "oom"
    assert caught.value.symbol == "BTCUSDT"


async def test_printing_200_mb_is_output_too_large_and_quick(
    sandbox: ProcessSandbox, session: str | None, short: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    code = source(
        """
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            def decide(self, df, interval, **kw):
                line = "x" * (2**20)
                for _ in range(200):
                    print(line)
        """
    )

    started = time.monotonic()
    with pytest.raises(OutputTooLarge, match="printed more than 16 MiB") as caught:
        await sandbox.signals(code, short, interval="1h", session=session)

    assert time.monotonic() - started < 5
    assert caught.value.kind == "output_too_large"
    assert len(caught.value.log_tail) <= 4100


async def test_a_result_over_the_cap_is_output_too_large(
    sandbox: ProcessSandbox, session: str | None, short: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    code = source(
        """
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            def decide(self, df, interval, **kw):
                return {"signal": "BUY", "meta": {"pad": "x" * 10_000}}
        """
    )

    with pytest.raises(OutputTooLarge, match="more than 1 MiB of signals"):
        await sandbox.signals(
            code, short, interval="1h", limits=SandboxLimits(output_bytes=1 * MiB), session=session
        )


@pytest.mark.parametrize(
    ("returned", "expected"),
    [("'BUY'", "returned 'BUY' \\(str\\)"), ("{'signal': 'LONG'}", "signal 'LONG'")],
)
async def test_garbage_from_decide_is_invalid_output(
    sandbox: ProcessSandbox,
    session: str | None,
    short: dict[str, tuple[pd.DataFrame, int]],
    returned: str,
    expected: str,
) -> None:
    code = source(
        f"""
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            def decide(self, df, interval, **kw):
                return {returned}
        """
    )

    with pytest.raises(InvalidOutput, match=expected) as caught:
        await sandbox.signals(code, short, interval="1h", session=session)
    assert caught.value.symbol == "BTCUSDT"


async def test_an_empty_signal_is_a_hold(
    sandbox: ProcessSandbox, session: str | None, short: dict[str, tuple[pd.DataFrame, int]]
) -> None:
    code = source(
        """
        import numpy as np
        import pandas as pd
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            def signals(self, df):
                buy = np.arange(len(df)) % 50 == 0
                return pd.DataFrame({"signal": np.where(buy, "BUY", "")}, index=df.index)
        """
    )

    signals = await sandbox.signals(code, short, interval="1h", session=session)

    frame, first_sim = short["BTCUSDT"]
    every_50th = frame["open_time"].iloc[first_sim:].iloc[40::50].tolist()
    assert signals["BTCUSDT"]["t"] == every_50th
    assert set(signals["BTCUSDT"]["signal"]) == {"BUY"}


@pytest.mark.parametrize(
    ("exit_call", "expected"),
    [("sys.exit(3)", r"sys\.exit\(3\)"), ("os._exit(3)", "exited with code 3")],
)
async def test_exiting_at_import_is_a_crash_with_the_exit_code(
    sandbox: ProcessSandbox, session: str | None, exit_call: str, expected: str
) -> None:
    code = source(
        f"""
        import os, sys
        print("leaving")
        {exit_call}
        """
    )

    with pytest.raises(StrategyCrashed, match=expected) as caught:
        await sandbox.describe(code, ["BTCUSDT"], session=session)
    assert "leaving" in caught.value.log_tail


async def test_an_exception_at_import_is_a_crash(
    sandbox: ProcessSandbox, session: str | None
) -> None:
    code = source(
        """
        import json
        CONFIG = json.loads("{not json")
        """
    )

    with pytest.raises(StrategyCrashed, match="JSONDecodeError at line 3") as caught:
        await sandbox.describe(code, ["BTCUSDT"], session=session)
    assert "line 3, in <module>" in caught.value.log_tail


async def test_the_strategy_sees_none_of_the_hosts_environment(
    sandbox: ProcessSandbox,
    session: str | None,
    short: dict[str, tuple[pd.DataFrame, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STRATORCH_CANARY", "s3cret")
    code = source(
        """
        import os
        from shared.strategy import BaseStrategy

        if "STRATORCH_CANARY" in os.environ or "s3cret" in str(os.environ):
            raise RuntimeError("the host environment leaked into the sandbox")

        class S(BaseStrategy):
            def decide(self, df, interval, **kw):
                return {"signal": "BUY", "meta": {"env": dict(os.environ), "cwd": os.getcwd()}}
        """
    )

    signals = await sandbox.signals(code, short, interval="1h", session=session)

    meta = signals["BTCUSDT"]["meta"][0]
    assert set(meta["env"]) <= {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "PYTHONPATH",
        "PYTHONHASHSEED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONFAULTHANDLER",
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "ARROW_DEFAULT_MEMORY_POOL",
        "MALLOC_MMAP_THRESHOLD_",
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
        "LC_CTYPE",  # set by the interpreter itself when it coerces the C locale
    }
    assert meta["env"]["HOME"] == meta["cwd"]
    if session is not None:
        assert Path(meta["cwd"]).exists()  # the warm child's, until it is retired
        await sandbox.aclose()
    assert not Path(meta["cwd"]).exists()  # the child's directory is removed


# -- a child started ahead (stratorch run) ----------------------------------------------------


async def test_a_child_started_ahead_serves_the_first_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where children's directories go
    start_ahead(DEFAULT_LIMITS.memory_bytes)
    (ahead,) = tmp_path.iterdir()
    code = ComponentRef.from_json({"builtin": "sma_cross", "params": {"fast": 5, "slow": 20}})

    async with ProcessSandbox() as sandbox:
        info = await sandbox.describe(code, ["BTCUSDT"], session="bt1")
        assert list(tmp_path.iterdir()) == [ahead]  # no other child was started
        one_off = await sandbox.describe(code, ["BTCUSDT"])  # started ahead only once
    assert info == one_off == StrategyInfo(lookback=21, units=[["BTCUSDT"]])
    assert list(tmp_path.iterdir()) == []


def test_a_child_started_ahead_and_never_used_ends_with_the_process(tmp_path: Path) -> None:
    script = (
        "import sys, tempfile; tempfile.tempdir = sys.argv[1]\n"
        "from shared.sandbox.spawn import start_ahead\n"
        "start_ahead(2 << 30)\n"
    )
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
    assert time.monotonic() - started < 30
    assert list(tmp_path.iterdir()) == []
