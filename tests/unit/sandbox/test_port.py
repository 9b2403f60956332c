"""The sandbox port's values, the candle wire format, and what the runner may import."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import shared.sandbox
from shared.candles.frame import CANDLE_COLUMNS as CANONICAL
from shared.errors import InvalidOutput
from shared.sandbox import (
    SandboxLimits,
    StrategyInfo,
    port,
    process,
    validate_strategy_info,
)
from shared.sandbox.protocol import CANDLE_COLUMNS, CANDLES_MAGIC, read_candles, write_candles


def test_exported_names_are_the_objects_of_their_modules() -> None:
    defined_in = {
        "DEFAULT_LIMITS": port,
        "ProcessSandbox": process,  # loaded on first access
        "Sandbox": port,
        "SandboxLimits": port,
        "StrategyInfo": port,
        "validate_strategy_info": port,
    }

    assert sorted(shared.sandbox.__all__) == sorted(defined_in)
    wrong = [
        name
        for name, module in defined_in.items()
        if getattr(shared.sandbox, name) is not getattr(module, name)
    ]
    assert wrong == []
    with pytest.raises(AttributeError, match="DockerSandbox"):
        _ = shared.sandbox.DockerSandbox  # type: ignore[attr-defined]


def test_the_runner_imports_nothing_beyond_the_standard_library() -> None:
    # The sandbox image has only the standard library, numpy and pandas; and numpy must be
    # imported only after the runner has pinned BLAS threads and moved fd 1.
    probe = (
        "import sys, shared.sandbox.runner; "
        "print(sorted(m for m in ('numpy', 'pandas', 'pydantic', 'structlog', 'asyncio') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- limits and describe's checks -----------------------------------------------------------


def test_limits_default_to_the_designs_and_refuse_nonsense() -> None:
    limits = SandboxLimits()
    assert (limits.timeout_s, limits.memory_bytes) == (300.0, 2 * 1024**3)
    assert (limits.output_bytes, limits.log_bytes) == (64 * 1024**2, 1024**2)
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxLimits(memory_bytes=-1)


def test_validate_strategy_info_keeps_the_strategys_grouping() -> None:
    info = validate_strategy_info(5, [["B", "A"], ["C"]], ["A", "B", "C"])

    assert info == StrategyInfo(lookback=5, units=[["B", "A"], ["C"]])


@pytest.mark.parametrize(
    ("lookback", "units", "expected"),
    [
        (True, [["A"]], "positive int"),
        (2.0, [["A"]], "positive int"),
        (1, [["A", 1]], "1, which is not one of"),
        (1, [("A",)], "list of lists"),
    ],
)
def test_validate_strategy_info_refuses(lookback: object, units: object, expected: str) -> None:
    with pytest.raises(InvalidOutput, match=expected):
        validate_strategy_info(lookback, units, ["A"], label="class 'S'")


def test_validate_signal_reply_keeps_each_symbols_columns() -> None:
    columns = {"t": [1, 2], "signal": ["BUY", "SELL"], "anything": [None, {}]}  # fields: later
    none = {"t": []}

    signals = port.validate_signal_reply({"signals": {"A": columns, "B": none}}, ["B", "A"])

    assert signals == {"A": columns, "B": none}


@pytest.mark.parametrize(
    "signals",
    [
        pytest.param({"A": [{"t": 1, "signal": "BUY"}]}, id="records"),
        pytest.param({"A": {}}, id="no columns"),
        pytest.param({"A": {"t": [1, 2], "signal": ["BUY"]}}, id="columns of two lengths"),
        pytest.param({"A": {"t": [1], "signal": "BUY"}}, id="a column not a list"),
        pytest.param({"A": {"t": [1]}, "B": {"t": [2]}}, id="a symbol not asked for"),
        pytest.param({}, id="a symbol missing"),
        pytest.param([], id="not a dict"),
    ],
)
def test_validate_signal_reply_refuses_what_is_not_columns_per_symbol(signals: object) -> None:
    with pytest.raises(InvalidOutput) as caught:
        port.validate_signal_reply({"signals": signals}, ["A"], label="class 'S'")
    assert caught.value.message == "class 'S': the sandbox returned no signal columns per symbol"


# -- candles on the wire --------------------------------------------------------------------


def test_the_wire_columns_are_the_canonical_ones() -> None:
    assert dict(CANDLE_COLUMNS) == {name: str(dtype) for name, dtype in CANONICAL.items()}


def test_candles_round_trip_exactly_without_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 50
    frame = pd.DataFrame(
        {
            name: (np.arange(n, dtype=dtype) * 3_600_000 if dtype == "int64" else rng.random(n))
            for name, dtype in CANDLE_COLUMNS.items()
        }
    )
    frame["extra"] = "dropped"
    path = tmp_path / "candles.bin"

    write_candles(path, {"BTCUSDT": (frame, 7), "ETHUSDT": (frame.iloc[:0], 0)})
    payload = path.read_bytes()
    assert payload.startswith(CANDLES_MAGIC) and b"dropped" not in payload
    # From a file (the process sandbox) and from the bytes themselves (stdin, Docker) alike.
    for source in (path, io.BytesIO(payload), bytearray(payload)):
        got = list(read_candles(source))

        assert [(s, first_sim) for s, _, first_sim in got] == [("BTCUSDT", 7), ("ETHUSDT", 0)]
        pd.testing.assert_frame_equal(got[0][1], frame.drop(columns="extra"))
        assert len(got[1][1]) == 0
        got[0][1].loc[0, "close"] = -1.0  # a strategy may write into its frame
    assert path.read_bytes() == payload  # ... and never into the file it was read from


def test_read_candles_refuses_what_is_not_a_candle_payload(tmp_path: Path) -> None:
    frame = pd.DataFrame({name: np.zeros(3, dtype=dtype) for name, dtype in CANDLE_COLUMNS.items()})
    buffer = io.BytesIO()
    write_candles(buffer, {"BTCUSDT": (frame, 0)})
    whole = buffer.getvalue()

    with pytest.raises(ValueError, match="not a candle payload"):
        list(read_candles(bytearray(b"PK\x03\x04" + whole)))  # e.g. an .npz
    with pytest.raises(ValueError, match="ends"):
        list(read_candles(bytearray(whole[:-8])))
    with pytest.raises(ValueError, match="ended after"):
        list(read_candles(io.BytesIO(whole[:-8])))
    (tmp_path / "short.bin").write_bytes(whole[:-8])
    with pytest.raises(ValueError, match="ends"):
        list(read_candles(tmp_path / "short.bin"))


def test_write_candles_refuses_a_first_sim_outside_the_frame(tmp_path: Path) -> None:
    frame = pd.DataFrame({name: np.zeros(3, dtype=dtype) for name, dtype in CANDLE_COLUMNS.items()})

    with pytest.raises(ValueError, match=r"first_sim for BTCUSDT must be in 0\.\.3"):
        write_candles(tmp_path / "c.bin", {"BTCUSDT": (frame, 4)})
