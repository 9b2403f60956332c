"""The builtin strategies: their rules on tiny hand-made series, and per-bar == vectorized."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from shared.strategy import BUILTIN_STRATEGIES, BaseStrategy, compute_signals, signal_records
from shared.strategy.builtins import Momentum, PeakEmaReversal, SmaCross
from shared.strategy.run import strategy_frame

from ._candles import SYMBOLS, make_candles, real_candles


def both_forms(strategy: BaseStrategy, candles: Any, first_sim: int = 0) -> list[dict[str, Any]]:
    """The signals of both forms, after checking that they are identical."""
    kw: dict[str, Any] = {"first_sim": first_sim, "interval": "1h", "symbol": "TESTUSDT"}
    per_bar = compute_signals(strategy, candles, mode="per_bar", **kw)
    vectorized = compute_signals(strategy, candles, mode="vectorized", **kw)
    assert per_bar == vectorized
    return signal_records(per_bar)


def at(records: list[dict[str, Any]], candles: Any) -> list[tuple[int, str]]:
    """(bar position, signal) pairs, for readable expectations on hand-made series."""
    position = {t: i for i, t in enumerate(candles["open_time"])}
    return [(position[r["t"]], r["signal"]) for r in records]


# --- the rules, on hand-made series -------------------------------------------------------


def test_sma_cross_rule() -> None:
    close = [5, 5, 5, 5, 5, 5, 8, 8, 8, 8, 2, 2, 2, 2]
    candles = make_candles(close)
    records = both_forms(SmaCross(fast=2, slow=4), candles)
    # t=6: fast (5+8)/2 = 6.5 > slow (5+5+5+8)/4 = 5.75, and at t=5 both were 5 -> BUY.
    # t=9: both 8: touching is not crossing; t=10: fast 5 < slow 6.5 after 8 >= 8 -> SELL.
    assert at(records, candles) == [(6, "BUY"), (10, "SELL")]
    buy, sell = records
    assert buy["tp_price"] == pytest.approx(8 * 1.02)
    assert buy["sl_price"] == pytest.approx(8 * 0.99)
    assert sell["tp_price"] == pytest.approx(2 * 1.02)
    assert buy["entry_price"] is None and buy["confidence"] == 1.0 and buy["meta"] == {}


def test_momentum_rule() -> None:
    close = [100, 100, 100, 100, 115, 115, 115, 100, 90, 90]
    candles = make_candles(close)
    records = both_forms(Momentum(lookback=2, threshold=0.1), candles)
    # m[t] = close[t] / close[t-2] - 1: m[4] = 0.15 > 0.1 after m[3] = 0 -> BUY;
    # m[6] = 0, m[7] = 100/115 - 1 < 0 after m[6] >= 0 -> SELL; m[8] < 0 after m[7] < 0: nothing.
    assert at(records, candles) == [(4, "BUY"), (7, "SELL")]
    assert records[0]["tp_price"] == pytest.approx(115 * 1.02)


def test_momentum_waits_for_its_lookback() -> None:
    # m[2] = 0.2 crosses 0.1 already at bar 2, but bar 2 has only 3 of the 4 bars needed
    # (m[t-1] must exist): no signal at the very start of the data, in either form.
    close = [100, 100, 120, 120, 120]
    assert both_forms(Momentum(lookback=2, threshold=0.1), make_candles(close)) == []
    # With one more bar in front, the same cross is at bar 3 and is taken.
    records = both_forms(Momentum(lookback=2, threshold=0.1), make_candles([100, *close]))
    assert at(records, make_candles([100, *close])) == [(3, "BUY")]


def _reference_ema(close: list[float], n: int, window: int, t: int) -> float:
    alpha = 2 / (n + 1)
    e = close[t - window + 1]
    for k in range(t - window + 2, t + 1):
        e = alpha * close[k] + (1 - alpha) * e
    return e


def test_peak_ema_reversal_rule() -> None:
    close = [100.0] * 10 + [110, 120, 116, 115, 115]
    candles = make_candles(close)
    strategy = PeakEmaReversal(ema=2, peak_window=5, drop_pct=0.03)  # W = 8, lookback 9
    assert strategy.get_required_lookback() == 9
    # ema (alpha 2/3): t=11 ≈ 115.56, t=12 ≈ 115.85, t=13 ≈ 115.28; peak = 120 from t=11.
    # t=12: 116 > 115.85 and 116 <= 0.97 * 120 = 116.4, while t=11 (120) was too high -> BUY.
    # t=13: 115 < 115.28 after 116 >= 115.85 -> SELL.
    assert _reference_ema(close, 2, 8, 12) == pytest.approx(115.85, abs=0.01)
    assert _reference_ema(close, 2, 8, 13) == pytest.approx(115.28, abs=0.01)
    records = both_forms(strategy, candles)
    assert at(records, candles) == [(12, "BUY"), (13, "SELL")]
    assert records[0]["tp_price"] == pytest.approx(116 * 1.02)


def test_peak_ema_reversal_waits_for_its_lookback() -> None:
    # A rising close stays above its lagging EMA and far below a high of 200, so cond holds
    # from the first bar with an EMA (t = W - 1 = 7). The run starts before the strategy has
    # its 9 bars, so it is never a fresh BUY: no signal in either form.
    close = [100.0 + i for i in range(12)]
    candles = make_candles(close, high=[200.0] * 12)
    strategy = PeakEmaReversal(ema=2, peak_window=5, drop_pct=0.03)
    assert both_forms(strategy, candles) == []


def test_disabled_levels_are_none() -> None:
    close = [5, 5, 5, 5, 5, 5, 8, 8, 8, 8, 2, 2, 2, 2]
    records = both_forms(SmaCross(fast=2, slow=4, tp_pct=None, sl_pct=None), make_candles(close))
    assert [(r["tp_price"], r["sl_price"]) for r in records] == [(None, None), (None, None)]


# --- per-bar == vectorized on real data ---------------------------------------------------

PARAM_SETS: dict[str, list[dict[str, Any]]] = {
    "sma_cross": [
        {},
        {"fast": 5, "slow": 20, "tp_pct": None},
        {"fast": 20, "slow": 100, "sl_pct": 0.05},
    ],
    "momentum": [
        {},
        {"lookback": 5, "threshold": 0.0},
        {"lookback": 48, "threshold": 0.05, "tp_pct": 0.1},
    ],
    "peak_ema_reversal": [
        {},
        {"ema": 20, "peak_window": 50, "drop_pct": 0.0},
        {"ema": 10, "peak_window": 5, "drop_pct": 0.05, "sl_pct": None},
    ],
}


def _cases() -> list[Any]:
    cases = []
    for name, param_sets in PARAM_SETS.items():
        for i, params in enumerate(param_sets):
            full = SYMBOLS[(2 * i) % len(SYMBOLS)]
            part = SYMBOLS[(2 * i + 1 + len(name)) % len(SYMBOLS)]
            label = ",".join(f"{k}={v}" for k, v in params.items()) or "defaults"
            # The whole file from its first bar, simulating every bar ...
            cases.append(pytest.param(name, params, full, 0, None, id=f"{name}-{label}-{full}"))
            # ... and a slice from the middle, with the warm-up the engine would load.
            cases.append(
                pytest.param(name, params, part, 1500, 2500, id=f"{name}-{label}-{part}-warmup")
            )
    return cases


@pytest.mark.parametrize(("name", "params", "symbol", "start", "length"), _cases())
def test_per_bar_equals_vectorized_on_real_data(
    name: str, params: dict[str, Any], symbol: str, start: int, length: int | None
) -> None:
    strategy = BUILTIN_STRATEGIES[name](**params)
    candles = real_candles(symbol)
    stop = None if length is None else start + length
    candles = candles.iloc[start:stop].reset_index(drop=True)
    first_sim = 0 if start == 0 else strategy.get_required_lookback() - 1
    records = both_forms(strategy, candles, first_sim)

    assert {r["signal"] for r in records} == {"BUY", "SELL"}
    assert all(r["t"] >= candles["open_time"].iloc[first_sim] for r in records)
    for r in records:  # plain Python values, JSON as is
        for key in ("tp_price", "sl_price"):
            assert r[key] is None or type(r[key]) is float
    json.dumps(records, allow_nan=False)


@pytest.mark.parametrize("name", sorted(BUILTIN_STRATEGIES))
def test_history_before_the_warmup_changes_nothing(name: str) -> None:
    """Simulating bars [s:] gives the same signals from the whole file or from its warm-up."""
    strategy = BUILTIN_STRATEGIES[name]()
    candles = real_candles("ETHUSDT")
    lookback = strategy.get_required_lookback()
    s = 3000
    whole = compute_signals(strategy, candles, first_sim=s, interval="1h", symbol="ETHUSDT")
    trimmed = candles.iloc[s - lookback + 1 :].reset_index(drop=True)
    warm = compute_signals(
        strategy, trimmed, first_sim=lookback - 1, interval="1h", symbol="ETHUSDT"
    )
    assert whole == warm and whole["t"]


# --- params -----------------------------------------------------------------------------


def test_registry_names() -> None:
    expected = {"momentum": Momentum, "peak_ema_reversal": PeakEmaReversal, "sma_cross": SmaCross}
    assert expected == BUILTIN_STRATEGIES


def test_defaults_and_lookbacks() -> None:
    assert SmaCross().params == {"fast": 10, "slow": 50, "tp_pct": 0.02, "sl_pct": 0.01}
    assert SmaCross().get_required_lookback() == 51
    assert Momentum().params == {"lookback": 20, "threshold": 0.02, "tp_pct": 0.02, "sl_pct": 0.01}
    assert Momentum().get_required_lookback() == 22
    assert PeakEmaReversal().params == {
        "ema": 50,
        "peak_window": 20,
        "drop_pct": 0.03,
        "tp_pct": 0.02,
        "sl_pct": 0.01,
    }
    assert PeakEmaReversal().get_required_lookback() == 201
    assert PeakEmaReversal(ema=3, peak_window=30).get_required_lookback() == 31


@pytest.mark.parametrize(
    ("cls", "params", "words"),
    [
        (SmaCross, {"fast": 50, "slow": 10}, ["SmaCross", "'fast' (50)", "'slow' (10)"]),
        (SmaCross, {"fast": 0}, ["SmaCross", "'fast'", "positive int", "got 0"]),
        (SmaCross, {"slow": 20.0}, ["SmaCross", "'slow'", "an integer", "float 20.0"]),
        (SmaCross, {"fast": True}, ["SmaCross", "'fast'", "an integer"]),
        (SmaCross, {"tp_pct": 0}, ["SmaCross", "'tp_pct'", "None (no level)"]),
        (SmaCross, {"sl_pct": 1.0}, ["SmaCross", "'sl_pct'", "below 1"]),
        (SmaCross, {"sl_pct": "1%"}, ["SmaCross", "'sl_pct'", "a number", "str '1%'"]),
        (Momentum, {"threshold": -0.01}, ["Momentum", "'threshold'", ">= 0"]),
        (Momentum, {"threshold": math.nan}, ["Momentum", "'threshold'"]),
        (Momentum, {"lookback": -3}, ["Momentum", "'lookback'", "positive int"]),
        (PeakEmaReversal, {"drop_pct": 1.0}, ["PeakEmaReversal", "'drop_pct'", "[0, 1)"]),
        (PeakEmaReversal, {"drop_pct": -0.1}, ["PeakEmaReversal", "'drop_pct'"]),
        (PeakEmaReversal, {"ema": 0}, ["PeakEmaReversal", "'ema'", "positive int"]),
        (PeakEmaReversal, {"peak_window": None}, ["PeakEmaReversal", "'peak_window'"]),
    ],
)
def test_bad_params_name_strategy_and_param(
    cls: type[BaseStrategy], params: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ValueError) as caught:
        cls(**params)
    for word in words:
        assert word in str(caught.value)


def test_accepted_edge_params() -> None:
    """The edges of each range are taken as given (a numpy int is an int) and run."""
    assert PeakEmaReversal(drop_pct=0).params["drop_pct"] == 0
    assert Momentum(threshold=0).params["threshold"] == 0
    sma = SmaCross(fast=np.int64(3), slow=5, tp_pct=None, sl_pct=None)
    assert sma.params == {"fast": 3, "slow": 5, "tp_pct": None, "sl_pct": None}
    assert sma.get_required_lookback() == 6
    close = [5, 5, 5, 5, 5, 5, 8, 8, 8, 8, 2, 2, 2, 2]
    assert [r["signal"] for r in both_forms(sma, make_candles(close))] == ["BUY", "SELL"]


def test_signals_frame_is_aligned_with_df() -> None:
    candles = make_candles([5, 5, 5, 5, 5, 5, 8, 8, 8, 8, 2, 2, 2, 2])
    frame = strategy_frame(candles)
    out = SmaCross(fast=2, slow=4).signals(frame)
    assert out.index.equals(frame.index)
    # None in pandas 1.x/2.x object columns, NaN where pandas 3 infers a string column
    signal = [v if isinstance(v, str) else None for v in out["signal"]]
    assert signal[5:11] == [None, "BUY", None, None, None, "SELL"]
    assert np.isnan(out["tp_price"].iloc[5]) and out["tp_price"].iloc[6] == 8 * (1 + 0.02)
