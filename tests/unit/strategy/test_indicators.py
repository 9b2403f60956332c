"""The indicators give a bar the same bits whatever history precedes its window."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shared.strategy.indicators import (
    cross_above,
    cross_below,
    ema,
    pct_change,
    rolling_max,
    sma,
)

from ._candles import real_candles

INDICATORS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "sma": sma,
    "ema_4n": lambda x, n: ema(x, n, 4 * n),
    "ema_short_window": lambda x, n: ema(x, n, n),
    "rolling_max": rolling_max,
    "pct_change": pct_change,
}


def needs(name: str, n: int) -> int:
    """Bars the indicator's value at t depends on, t included."""
    return {"sma": n, "ema_4n": 4 * n, "ema_short_window": n, "rolling_max": n}.get(name, n + 1)


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float64).view(np.int64)


prices = arrays(
    np.float64,
    st.integers(1, 160),
    elements=st.floats(1e-6, 1e7, allow_nan=False, allow_infinity=False),
)


@pytest.mark.parametrize("name", sorted(INDICATORS))
@settings(max_examples=150, deadline=None)
@given(x=prices, n=st.integers(1, 30), data=st.data())
def test_window_array_equals_full_array(
    name: str, x: np.ndarray, n: int, data: st.DataObject
) -> None:
    f = INDICATORS[name]
    full = f(x, n)
    assert full.shape == x.shape
    need = needs(name, n)
    if x.size < need:
        assert np.isnan(full).all()
        return
    t = data.draw(st.integers(need - 1, x.size - 1), label="t")
    start = data.draw(st.integers(0, t - need + 1), label="start")
    # The window exactly, or any longer stretch of history before t: same bits at t.
    exact = f(x[t - need + 1 : t + 1].copy(), n)
    longer = f(x[start : t + 1].copy(), n)
    assert np.array_equal(bits(exact[-1:]), bits(full[t : t + 1]))
    assert np.array_equal(bits(longer[-1:]), bits(full[t : t + 1]))
    # And the warm-up is NaN, nothing else is.
    assert np.isnan(full[: need - 1]).all()
    assert not np.isnan(full[need - 1 :]).any()


@pytest.mark.parametrize("name", sorted(INDICATORS))
@pytest.mark.parametrize("n", [1, 7, 50])
def test_every_bar_of_real_closes(name: str, n: int) -> None:
    x = real_candles("BTCUSDT")["close"].to_numpy()[:1200]
    f = INDICATORS[name]
    full = f(x, n)
    need = needs(name, n)
    for t in range(need - 1, x.size, 37):
        window = f(x[t - need + 1 : t + 1], n)
        assert np.array_equal(bits(window[-1:]), bits(full[t : t + 1]))


def test_values_agree_with_pandas() -> None:
    close = pd.Series(real_candles("ETHUSDT")["close"].to_numpy()[:3000])
    x = close.to_numpy()
    np.testing.assert_allclose(sma(x, 20), close.rolling(20).mean(), rtol=1e-12)
    np.testing.assert_array_equal(rolling_max(x, 20), close.rolling(20).max())
    np.testing.assert_allclose(pct_change(x, 5), close.pct_change(5), rtol=1e-12)
    # The windowed EMA stays within the seed weight (~3.5e-4 of the seed gap) of the classic.
    classic = close.ewm(span=50, adjust=False).mean().to_numpy()
    windowed = ema(x, 50, 200)
    np.testing.assert_allclose(windowed[400:], classic[400:], rtol=1e-4)


def test_hand_computed_values() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    np.testing.assert_array_equal(sma(x, 2), [np.nan, 1.5, 2.5, 3.5, 7.0])
    np.testing.assert_array_equal(rolling_max(x[::-1], 2), [np.nan, 10.0, 4.0, 3.0, 2.0])
    np.testing.assert_array_equal(pct_change(x, 1), [np.nan, 1.0, 0.5, 4 / 3 - 1, 1.5])
    # alpha = 2/3: seed 1 -> 2/3*2 + 1/3*1 = 5/3 -> 2/3*3 + 1/3*5/3 = 23/9
    np.testing.assert_allclose(ema(x, 2, 3)[:3], [np.nan, np.nan, 23 / 9])
    assert ema(x, 2, 1)[-1] == 10.0  # a one-bar window is the value itself


def test_crosses() -> None:
    a = np.array([1.0, 2.0, 2.0, 3.0, 1.0, np.nan, 3.0])
    b = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    assert cross_above(a, b).tolist() == [False, False, False, True, False, False, False]
    assert cross_below(a, b).tolist() == [False, False, False, False, True, False, False]
    assert cross_above(a, 1.5).tolist() == [False, True, False, False, False, False, False]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_window_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="positive int"):
        sma(np.ones(5), bad)  # type: ignore[arg-type]


def test_short_input_is_all_nan() -> None:
    assert np.isnan(sma(np.ones(3), 5)).all()
    assert np.isnan(ema(np.ones(3), 2, 8)).all()
    assert np.isnan(pct_change(np.ones(3), 3)).all()
    assert sma(np.array([]), 2).shape == (0,)
