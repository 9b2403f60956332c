"""The numpy window: what `decide` gets when its strategy sets `window = "numpy"`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.strategy import BUILTIN_STRATEGIES, BaseStrategy, StrategyOutputError, Window
from shared.strategy.run import FRAME_COLUMNS, compute_signals, signal_records, strategy_frame

from ._candles import make_candles, real_candles

README = Path(__file__).parents[3] / "README.md"


def run(strategy: BaseStrategy, candles: pd.DataFrame, **kw: Any) -> list[dict[str, Any]]:
    """The signals `strategy` gives, a record each (compute_signals returns columns)."""
    kw.setdefault("first_sim", 0)
    return signal_records(compute_signals(strategy, candles, interval="1h", symbol="BTCUSDT", **kw))


def breakout(close: np.ndarray, high: np.ndarray, n: int) -> dict[str, Any] | None:
    """BUY when the close tops the last `n` highs before it; SELL below their mean close."""
    if len(close) < n + 1:
        return None
    c = float(close[-1])
    if c > high[-n - 1 : -1].max():
        return {"signal": "BUY", "tp_price": c * 1.03, "sl_price": float(close[-n:].min())}
    if c < close[-n - 1 : -1].mean():
        return {"signal": "SELL", "meta": {"n": n}}
    return None


class PandasBreakout(BaseStrategy):
    params: ClassVar[dict[str, Any]] = {"n": 12}

    def get_required_lookback(self) -> int:
        return int(self.params["n"]) + 1

    def decide(self, df: pd.DataFrame, interval: str, **kw: Any) -> dict[str, Any] | None:
        return breakout(df["close"].to_numpy(), df["high"].to_numpy(), self.params["n"])


class NumpyBreakout(PandasBreakout):
    window = "numpy"

    def decide(self, df: Window, interval: str, **kw: Any) -> dict[str, Any] | None:
        return breakout(df.close, df["high"], self.params["n"])


def test_the_numpy_window_gives_the_pandas_windows_signals_on_real_data() -> None:
    candles = real_candles("ETHUSDT")
    numpy_records = run(NumpyBreakout(n=24), candles, first_sim=30)
    assert len(numpy_records) > 100
    assert numpy_records == run(PandasBreakout(n=24), candles, first_sim=30)


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(st.floats(-0.05, 0.05), min_size=1, max_size=60),
    n=st.integers(1, 8),
    first_sim=st.integers(0, 10),
)
def test_the_numpy_window_gives_the_pandas_windows_signals(
    steps: list[float], n: int, first_sim: int
) -> None:
    close = 100.0 * np.cumprod(1.0 + np.asarray(steps))
    candles = make_candles(close, high=close * 1.01)
    first_sim = min(first_sim, len(close))
    expected = run(PandasBreakout(n=n), candles, first_sim=first_sim)
    assert run(NumpyBreakout(n=n), candles, first_sim=first_sim) == expected


class Recorder(BaseStrategy):
    window = "numpy"

    def __init__(self, lookback: int) -> None:
        super().__init__()
        self.lookback = lookback
        self.seen: list[Window] = []

    def get_required_lookback(self) -> int:
        return self.lookback

    def decide(self, df: Window, interval: str, **kw: Any) -> dict[str, Any] | None:
        self.seen.append(df)
        return None


def test_decide_sees_the_last_lookback_bars_as_arrays() -> None:
    candles = make_candles([float(i) for i in range(10)])
    strategy = Recorder(lookback=3)
    run(strategy, candles, first_sim=0)
    assert [w.close.tolist() for w in strategy.seen[:4]] == [
        [0.0],
        [0.0, 1.0],  # fewer bars only at the very start of the data
        [0.0, 1.0, 2.0],
        [1.0, 2.0, 3.0],
    ]
    last = strategy.seen[-1]  # a window kept from an earlier bar still shows its own bars
    assert len(last) == 3 and last.close.tolist() == [7.0, 8.0, 9.0]
    assert strategy.seen[0].close.tolist() == [0.0]


def test_the_window_holds_the_pandas_windows_bars() -> None:
    candles = real_candles("BTCUSDT")
    strategy = Recorder(lookback=50)
    run(strategy, candles, first_sim=len(candles) - 1)
    (window,) = strategy.seen
    df = strategy_frame(candles).iloc[-50:]
    assert window.columns == FRAME_COLUMNS
    for name in FRAME_COLUMNS:
        column = window[name]
        assert isinstance(column, np.ndarray) and column.dtype == df[name].dtype
        np.testing.assert_array_equal(column, df[name].to_numpy())
        np.testing.assert_array_equal(getattr(window, name), column)
    assert window.time.dtype == np.dtype("datetime64[ns]")
    np.testing.assert_array_equal(window.time, df.index.tz_convert(None).to_numpy())
    np.testing.assert_array_equal(window["time"], window.time)
    pd.testing.assert_frame_equal(window.df, df)
    assert "volume" in window and "Volume" not in window
    assert "50 bars" in repr(window) and "2021-07-17 20:00" in repr(window)


def test_the_columns_are_read_only_views() -> None:
    candles = make_candles([1.0, 2.0, 3.0])
    strategy = Recorder(lookback=2)
    run(strategy, candles)
    window = strategy.seen[-1]
    assert window.close.base is not None  # a view, not a copy
    with pytest.raises(ValueError, match="read-only"):
        window.close[-1] = 0.0
    copy = window.close.copy()
    copy[-1] = 0.0
    assert window.close[-1] == 3.0


def test_window_of_a_whole_frame_for_tests() -> None:
    df = strategy_frame(make_candles([1.0, 2.0, 3.0]))
    window = Window(df)
    assert len(window) == 3 and window.close.tolist() == [1.0, 2.0, 3.0]
    assert window.df is df
    with pytest.raises(TypeError, match="DatetimeIndex"):
        Window(df.reset_index())


@pytest.mark.parametrize(
    ("read", "error", "words"),
    [
        (lambda w: w["Close"], KeyError, ["no column 'Close'", "did you mean 'close'", "high"]),
        (lambda w: w["foo"], KeyError, ["no column 'foo'", "open_time", "taker_buy_quote"]),
        (lambda w: w.Close, AttributeError, ["no attribute 'Close'", "did you mean 'close'"]),
        (lambda w: w.iloc, AttributeError, ["no attribute 'iloc'", "window.df"]),
        (lambda w: w.index, AttributeError, ["no attribute 'index'", "did you mean 'time'"]),
        (lambda w: w[-1], TypeError, ["by column name", "window.close[-1]"]),
    ],
)
def test_a_wrong_column_names_the_ones_that_exist(
    read: Any, error: type[Exception], words: list[str]
) -> None:
    window = Window(strategy_frame(make_candles([1.0, 2.0])))
    with pytest.raises(error) as caught:
        read(window)
    for word in words:
        assert word in str(caught.value)


def test_an_unknown_window_kind_names_the_choices() -> None:
    class Typo(Recorder):
        window = "np"  # type: ignore[assignment]

    with pytest.raises(StrategyOutputError, match=r"Typo.window is 'np'.*'pandas' or 'numpy'"):
        run(Typo(lookback=2), make_candles([1.0, 2.0]))


def test_signals_gets_the_dataframe_whatever_the_window() -> None:
    class Vectorized(BaseStrategy):
        window = "numpy"

        def signals(self, df: pd.DataFrame) -> pd.DataFrame:
            assert isinstance(df, pd.DataFrame)
            return pd.DataFrame({"signal": ["BUY"] * len(df)}, index=df.index)

    assert len(run(Vectorized(), make_candles([1.0, 2.0]))) == 2


@pytest.mark.parametrize("name", sorted(BUILTIN_STRATEGIES))
def test_builtins_per_bar_on_the_numpy_window_match_vectorized(name: str) -> None:
    """A builtin's decide, handed the numpy window's DataFrame, gives its vectorized signals."""
    candles = real_candles("SOLUSDT").iloc[:800]
    builtin = BUILTIN_STRATEGIES[name]
    strategy = builtin()

    class OnNumpy(builtin):  # type: ignore[misc,valid-type]
        window = "numpy"

        def decide(self, df: Window, interval: str, **kw: Any) -> dict[str, Any] | None:
            return super().decide(df.df, interval, **kw)

    expected = run(strategy, candles, mode="vectorized")
    assert run(OnNumpy(), candles, mode="per_bar") == expected


def test_the_readmes_two_windows_give_the_same_signals() -> None:
    """README "Writing a strategy": MeanCross on the DataFrame, FastMeanCross on the arrays."""
    section = README.read_text().split("## Writing a strategy")[1].split("\n## ")[0]
    namespace: dict[str, Any] = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.DOTALL):
        exec(block, namespace)
    pandas_form, numpy_form = namespace["MeanCross"], namespace["FastMeanCross"]
    assert (pandas_form.window, numpy_form.window) == ("pandas", "numpy")
    candles = real_candles("BTCUSDT")
    records = run(numpy_form(n=30), candles, first_sim=40)
    assert len(records) > 20
    assert records == run(pandas_form(n=30), candles, first_sim=40)
