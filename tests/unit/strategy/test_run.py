"""compute_signals: which bars a strategy sees, the signals it returns, and the shape checks."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest

from shared.strategy import (
    SIGNAL_FIELDS,
    BaseStrategy,
    StrategyOutputError,
    compute_signals,
    signal_records,
)
from shared.strategy.run import FRAME_COLUMNS

from ._candles import make_candles, real_candles

FIRST_BAR = "2021-01-01 00:00:00 UTC (open_time 1609459200000)"


def run(strategy: BaseStrategy, candles: pd.DataFrame, **kw: Any) -> list[dict[str, Any]]:
    """The signals `strategy` gives, a record each (compute_signals returns columns)."""
    kw.setdefault("first_sim", 0)
    return signal_records(compute_signals(strategy, candles, interval="1h", symbol="BTCUSDT", **kw))


# --- a user strategy in the README's style ------------------------------------------------


class SmaCross(BaseStrategy):
    params = {"fast": 10, "slow": 50}  # noqa: RUF012 -- as users write it

    def get_required_lookback(self) -> int:
        return int(self.params["slow"]) + 1

    def decide(self, df: pd.DataFrame, interval: str, **kw: Any) -> dict[str, Any] | None:
        if len(df) < self.get_required_lookback():
            return None
        close = df["close"]
        fast, slow = self.params["fast"], self.params["slow"]
        now = close.iloc[-fast:].mean() - close.iloc[-slow:].mean()
        before = close.iloc[-fast - 1 : -1].mean() - close.iloc[-slow - 1 : -1].mean()
        if now > 0 >= before:
            c = close.iloc[-1]
            return {
                "signal": "BUY",
                "entry_price": None,
                "tp_price": c * 1.02,
                "sl_price": c * 0.99,
                "confidence": 1.0,
                "meta": {"gap": now, "symbol": kw["symbol"]},
            }
        return None


def test_readme_style_strategy() -> None:
    candles = real_candles("BTCUSDT")
    columns = compute_signals(
        SmaCross(fast=12), candles, first_sim=100, interval="1h", symbol="BTCUSDT"
    )
    assert tuple(columns) == SIGNAL_FIELDS
    assert json.loads(json.dumps(columns, allow_nan=False)) == columns
    records = signal_records(columns)
    assert len(records) > 50
    first = records[0]
    assert type(first["t"]) is int and type(first["tp_price"]) is float
    assert type(first["meta"]["gap"]) is float and first["meta"]["symbol"] == "BTCUSDT"
    assert first["t"] >= int(candles["open_time"].iloc[100])
    times = candles["open_time"].tolist()
    close = candles["close"].tolist()
    assert first["tp_price"] == close[times.index(first["t"])] * 1.02


# --- what decide sees -------------------------------------------------------------------


class Recorder(BaseStrategy):
    params: ClassVar[dict[str, Any]] = {"lookback": 3}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.seen: list[pd.DataFrame] = []
        self.kw: list[tuple[str, dict[str, Any]]] = []

    def get_required_lookback(self) -> int:
        return int(self.params["lookback"])

    def decide(self, df: pd.DataFrame, interval: str, **kw: Any) -> dict[str, Any] | None:
        self.seen.append(df)
        self.kw.append((interval, kw))
        return None


def test_decide_sees_the_last_lookback_bars_ending_at_t() -> None:
    candles = make_candles([float(i) for i in range(10)])
    strategy = Recorder(lookback=3)
    no_signals = compute_signals(strategy, candles, first_sim=0, interval="1h", symbol="BTCUSDT")
    assert no_signals == {field: [] for field in SIGNAL_FIELDS}
    assert [df["close"].tolist() for df in strategy.seen[:4]] == [
        [0.0],
        [0.0, 1.0],  # fewer bars only at the very start of the data
        [0.0, 1.0, 2.0],
        [1.0, 2.0, 3.0],
    ]
    assert strategy.seen[-1]["close"].tolist() == [7.0, 8.0, 9.0]
    assert strategy.kw[0] == ("1h", {"symbol": "BTCUSDT"})


def test_warmup_bars_are_seen_but_not_simulated() -> None:
    candles = make_candles([float(i) for i in range(10)])
    strategy = Recorder(lookback=4)
    run(strategy, candles, first_sim=6)
    assert [df["close"].iloc[-1] for df in strategy.seen] == [6.0, 7.0, 8.0, 9.0]
    assert strategy.seen[0]["close"].tolist() == [3.0, 4.0, 5.0, 6.0]


def test_the_frame_strategies_see() -> None:
    candles = make_candles([1.0, 2.0])
    strategy = Recorder(lookback=5)
    run(strategy, candles)
    df = strategy.seen[-1]
    assert tuple(df.columns) == FRAME_COLUMNS
    assert isinstance(df.index, pd.DatetimeIndex) and df.index.name == "time"
    assert str(df.index.tz) == "UTC"
    assert df.index[0] == pd.Timestamp("2021-01-01", tz="UTC")
    assert df["open_time"].dtype == np.int64


def test_extra_candle_columns_are_dropped() -> None:
    candles = make_candles([1.0, 2.0]).assign(symbol="BTCUSDT", interval="1h")
    strategy = Recorder(lookback=5)
    run(strategy, candles)
    assert tuple(strategy.seen[-1].columns) == FRAME_COLUMNS


# --- modes ---------------------------------------------------------------------------------


class Both(BaseStrategy):
    """BUY at every third bar, in both forms; `decide` can be made to fail."""

    def __init__(self, fail_decide: bool = False) -> None:
        super().__init__()
        self.fail_decide = fail_decide

    def decide(self, df: pd.DataFrame, interval: str, **kw: Any) -> dict[str, Any] | None:
        if self.fail_decide:
            raise AssertionError("decide must not run")
        i = int(df["open_time"].iloc[-1] // 3_600_000)
        return {"signal": "BUY", "confidence": 0.5} if i % 3 == 0 else {"signal": "HOLD"}

    def signals(self, df: pd.DataFrame) -> pd.DataFrame:
        i = df["open_time"] // 3_600_000
        signal = np.where(i % 3 == 0, "BUY", "HOLD")
        return pd.DataFrame({"signal": signal, "confidence": 0.5}, index=df.index)


def test_auto_runs_vectorized_when_signals_is_overridden() -> None:
    candles = make_candles([1.0] * 9)
    auto = run(Both(fail_decide=True), candles, first_sim=2)
    assert auto == run(Both(), candles, first_sim=2, mode="per_bar")
    assert [r["confidence"] for r in auto] == [0.5, 0.5]
    assert Both(fail_decide=True).get_required_lookback() == 1


def test_auto_runs_per_bar_otherwise() -> None:
    strategy = Recorder(lookback=2)
    run(strategy, make_candles([1.0] * 4), mode="auto")
    assert len(strategy.seen) == 4


def test_vectorized_needs_signals() -> None:
    with pytest.raises(NotImplementedError, match="Recorder does not implement signals"):
        run(Recorder(), make_candles([1.0]), mode="vectorized")


def test_a_strategy_with_neither_method() -> None:
    with pytest.raises(NotImplementedError, match=r"Empty must implement decide\(self, df"):
        run(type("Empty", (BaseStrategy,), {})(), make_candles([1.0]))


def test_bad_mode_and_first_sim() -> None:
    with pytest.raises(ValueError, match="mode must be"):
        run(Recorder(), make_candles([1.0]), mode="fast")
    with pytest.raises(ValueError, match=r"first_sim must be in \[0, 1\]"):
        run(Recorder(), make_candles([1.0]), first_sim=2)
    assert run(Recorder(), make_candles([1.0]), first_sim=1) == []


# --- records ---------------------------------------------------------------------------------


class Returns(BaseStrategy):
    """Returns `out` at bar 0 (per bar) or puts `frame` out as-is (vectorized)."""

    def __init__(self, out: Any = None, frame: Any = None) -> None:
        super().__init__()
        self.out, self.frame = out, frame

    def decide(self, df: pd.DataFrame, interval: str, **kw: Any) -> Any:
        return self.out

    def signals(self, df: pd.DataFrame) -> Any:
        return self.frame(df) if callable(self.frame) else self.frame


def decided(out: Any) -> list[dict[str, Any]]:
    return run(Returns(out=out), make_candles([1.0]), mode="per_bar")


def test_record_values_are_plain_python() -> None:
    out = {
        "signal": "SELL",
        "entry_price": np.float32(2.5),
        "tp_price": np.nan,
        "sl_price": np.int64(3),
        "confidence": np.float64(0.25),
        "meta": {"x": np.int64(1), "v": np.array([1.5, 2.0]), "nested": {"ok": True}},
    }
    [record] = decided(out)
    assert record == {
        "t": 1609459200000,
        "signal": "SELL",
        "entry_price": 2.5,
        "tp_price": None,
        "sl_price": 3.0,
        "confidence": 0.25,
        "meta": {"x": 1, "v": [1.5, 2.0], "nested": {"ok": True}},
    }
    assert type(record["entry_price"]) is float and type(record["sl_price"]) is float
    assert type(record["meta"]["x"]) is int


def test_minimal_signal_gets_defaults() -> None:
    [record] = decided({"signal": "BUY"})
    assert record == {
        "t": 1609459200000,
        "signal": "BUY",
        "entry_price": None,
        "tp_price": None,
        "sl_price": None,
        "confidence": 1.0,
        "meta": {},
    }


@pytest.mark.parametrize(
    "out", [None, {"signal": "HOLD"}, {"signal": ""}, {"signal": None, "tp_price": 3}]
)
def test_holds_give_no_record(out: Any) -> None:
    assert decided(out) == []


def test_vectorized_records() -> None:
    def frame(df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "signal": ["BUY", "", "HOLD", np.nan, "SELL"],
                "tp_price": [2.0, np.nan, np.nan, np.nan, np.nan],
                "sl_price": [np.nan, np.nan, np.nan, np.nan, 0.5],
                "meta": [{"k": 1}, None, None, None, None],
                "indicator": [1, 2, 3, 4, 5],  # other columns are ignored
            },
            index=df.index,
        )

    candles = make_candles([1.0] * 5)
    records = run(Returns(frame=frame), candles, mode="vectorized")
    t = candles["open_time"].tolist()
    assert records == [
        {
            "t": t[0],
            "signal": "BUY",
            "entry_price": None,
            "tp_price": 2.0,
            "sl_price": None,
            "confidence": 1.0,
            "meta": {"k": 1},
        },
        {
            "t": t[4],
            "signal": "SELL",
            "entry_price": None,
            "tp_price": None,
            "sl_price": 0.5,
            "confidence": 1.0,
            "meta": {},
        },
    ]
    # Rows before first_sim are warm-up: not even checked.
    assert [r["t"] for r in run(Returns(frame=frame), candles, first_sim=1)] == [t[4]]


def test_vectorized_numeric_columns() -> None:
    """Levels in numeric columns of any width: plain floats; values on holds go unchecked."""

    def frame(df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "signal": np.array(["BUY", "HOLD", "SELL"], dtype=object),
                "entry_price": np.array([3, -1, 7], dtype=np.int32),
                "tp_price": np.array([2.5, np.inf, np.nan], dtype=np.float32),
                "confidence": [np.nan, np.nan, 0.25],
            },
            index=df.index,
        )

    records = run(Returns(frame=frame), make_candles([1.0] * 3), mode="vectorized")
    assert [(r["entry_price"], r["tp_price"], r["confidence"]) for r in records] == [
        (3.0, 2.5, 1.0),
        (7.0, None, 0.25),
    ]
    assert all(type(r["entry_price"]) is float for r in records[:1])


# --- shape checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "words"),
    [
        ("BUY", ["Returns.decide() returned 'BUY' (str) for bar " + FIRST_BAR, "expected None"]),
        ({"tp_price": 3.0}, ["returned a dict without 'signal' for bar " + FIRST_BAR]),
        ({"signal": "buy"}, ["gave signal 'buy' (str) for bar " + FIRST_BAR, "upper case"]),
        ({"signal": 1}, ["gave signal 1 (int)"]),
        ({"signal": "BUY", "tp": 3.0}, ["unknown key(s) 'tp'", "tp_price"]),
        ({"signal": "BUY", "tp_price": "3"}, ["gave tp_price '3' (str)", "positive float"]),
        ({"signal": "BUY", "sl_price": -1.0}, ["gave sl_price -1.0", "positive float"]),
        ({"signal": "BUY", "tp_price": np.inf}, ["gave tp_price inf"]),
        ({"signal": "BUY", "confidence": "high"}, ["gave confidence 'high' (str)"]),
        ({"signal": "BUY", "confidence": True}, ["gave confidence True (bool)"]),
        ({"signal": "BUY", "meta": [1]}, ["gave meta [1] (list)", "expected a dict"]),
        ({"signal": "BUY", "meta": {"x": np.nan}}, ["not JSON-able", "use None"]),
        ({"signal": "BUY", "meta": {"x": object()}}, ["not JSON-able"]),
    ],
)
def test_decide_output_checks(out: Any, words: list[str]) -> None:
    with pytest.raises(StrategyOutputError) as caught:
        decided(out)
    for word in words:
        assert word in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (lambda df: df["close"], ["returned", "(Series)", "expected a DataFrame"]),
        (lambda df: pd.DataFrame({"signal": ["BUY"]}), ["returned 1 rows for 3 bars"]),
        (
            lambda df: pd.DataFrame({"signal": [None] * 3}),
            ["index differs from df's at row 0", "(got 0, expected bar 2021-01-01"],
        ),
        (
            lambda df: pd.DataFrame({"signal": [None] * 3}, index=df.index[::-1]),
            ["index differs from df's at row 0"],
        ),
        (
            lambda df: pd.DataFrame({"Signal": [None] * 3}, index=df.index),
            ["without a 'signal' column (columns: 'Signal')"],
        ),
        (
            lambda df: pd.DataFrame({"signal": [None, "LONG", None]}, index=df.index),
            ["gave signal 'LONG' (str) for bar 2021-01-01 01:00:00 UTC"],
        ),
        (
            lambda df: pd.DataFrame({"signal": [None, True, None]}, index=df.index),
            ["gave signal True (bool) for bar 2021-01-01 01:00:00 UTC"],
        ),
        (
            lambda df: pd.DataFrame(
                {"signal": [None, "BUY", None], "tp_price": ["x", "x", "x"]}, index=df.index
            ),
            ["gave tp_price 'x' (str) for bar 2021-01-01 01:00:00 UTC"],
        ),
        (
            lambda df: pd.DataFrame(
                {"signal": [None, "BUY", None], "sl_price": [1.0, -1.0, 1.0]}, index=df.index
            ),
            ["gave sl_price -1.0 for bar 2021-01-01 01:00:00 UTC"],
        ),
        (
            lambda df: pd.DataFrame(
                {"signal": ["SELL", "BUY", None], "confidence": [1.0, np.inf, 1.0]},
                index=df.index,
            ),
            ["gave confidence inf for bar 2021-01-01 01:00:00 UTC"],
        ),
        (
            lambda df: pd.DataFrame(
                {"signal": [None, "BUY", None], "tp_price": [True] * 3}, index=df.index
            ),
            ["gave tp_price True (bool) for bar 2021-01-01 01:00:00 UTC"],
        ),
    ],
)
def test_signals_output_checks(frame: Any, words: list[str]) -> None:
    with pytest.raises(StrategyOutputError) as caught:
        run(Returns(frame=frame), make_candles([1.0, 2.0, 3.0]))
    for word in words:
        assert word in str(caught.value)
    assert "Returns.signals()" in str(caught.value)


@pytest.mark.parametrize("lookback", [0, -1, 2.5, None, True])
def test_lookback_must_be_a_positive_int(lookback: Any) -> None:
    strategy = Recorder()
    strategy.get_required_lookback = lambda: lookback  # type: ignore[method-assign]
    with pytest.raises(StrategyOutputError, match=r"Recorder.get_required_lookback\(\) returned"):
        run(strategy, make_candles([1.0]))


def test_errors_in_decide_carry_the_bar() -> None:
    class Crashes(BaseStrategy):
        def decide(self, df: pd.DataFrame, interval: str, **kw: Any) -> None:
            if len(df) and df["close"].iloc[-1] > 1:
                raise KeyError("rsi")

    with pytest.raises(KeyError) as caught:
        run(Crashes(), make_candles([1.0, 2.0]))
    assert caught.value.__notes__ == [
        "in Crashes.decide() at bar 2021-01-01 01:00:00 UTC (open_time 1609462800000) (BTCUSDT 1h)"
    ]


def test_missing_candle_columns() -> None:
    with pytest.raises(ValueError, match="candles lack column"):
        run(Recorder(), make_candles([1.0]).drop(columns=["close"]))
