"""BaseStrategy: params, defaults of the optional methods."""

from __future__ import annotations

import textwrap
from typing import Any, ClassVar

import pytest

from shared.strategy import (
    BaseStrategy,
    ComponentRef,
    compute_signals,
    load_component,
    signal_records,
)

from ._candles import real_candles


class Cross(BaseStrategy):
    params: ClassVar[dict[str, Any]] = {"fast": 10, "slow": 50}


class FasterCross(Cross):
    params: ClassVar[dict[str, Any]] = {"fast": 5, "exit_after": 12}


def test_params_merge_over_defaults() -> None:
    assert Cross().params == {"fast": 10, "slow": 50}
    assert Cross(fast=3).params == {"fast": 3, "slow": 50}


def test_instances_do_not_share_params() -> None:
    a = Cross()
    a.params["fast"] = 99
    assert Cross().params["fast"] == 10 and Cross.params["fast"] == 10


def test_subclasses_inherit_and_override_params() -> None:
    assert FasterCross().params == {"fast": 5, "slow": 50, "exit_after": 12}
    assert FasterCross.default_params() == {"fast": 5, "slow": 50, "exit_after": 12}


def test_unknown_param_names_class_param_and_known_ones() -> None:
    with pytest.raises(ValueError) as caught:
        Cross(slwo=20)
    assert str(caught.value) == (
        "Cross got unknown parameter 'slwo' (did you mean 'slow'?); its parameters are: "
        "fast, slow. To add one, put it in Cross.params with its default."
    )


def test_unknown_param_of_a_strategy_without_params() -> None:
    class Plain(BaseStrategy):
        pass

    with pytest.raises(ValueError, match="Plain got unknown parameter 'n': it takes no param"):
        Plain(n=3)


def test_repr() -> None:
    assert repr(Cross(fast=3)) == "Cross(fast=3, slow=50)"


def test_defaults_of_the_optional_methods() -> None:
    strategy = Cross()
    assert strategy.get_required_lookback() == 1
    assert strategy.work_units(["BTCUSDT", "ETHUSDT"]) == [["BTCUSDT"], ["ETHUSDT"]]
    assert strategy.work_units([]) == []


def test_decide_and_signals_are_for_subclasses() -> None:
    with pytest.raises(NotImplementedError, match="Cross must implement decide"):
        Cross().decide(None, "1h", symbol="X")  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="Cross does not implement signals"):
        Cross().signals(None)  # type: ignore[arg-type]


def test_work_units_can_group_symbols() -> None:
    class Pairs(BaseStrategy):
        def work_units(self, symbols: list[str]) -> list[list[str]]:
            return [symbols[i : i + 2] for i in range(0, len(symbols), 2)]

        def decide(self, df: Any, interval: str, **kw: Any) -> None:
            return None

    assert Pairs().work_units(["A", "B", "C"]) == [["A", "B"], ["C"]]


def test_the_docstring_example_runs() -> None:
    doc = BaseStrategy.__doc__ or ""
    start = doc.index("        from shared.strategy import BaseStrategy")
    end = doc.rindex("return None") + len("return None")
    source = textwrap.dedent(doc[start:end])
    strategy = load_component(
        ComponentRef.from_json({"source": source, "class": "MeanCross"}), registry={}
    )
    candles = real_candles("BTCUSDT")
    records = signal_records(
        compute_signals(strategy, candles, first_sim=0, interval="1h", symbol="BTCUSDT")
    )
    assert records and {r["signal"] for r in records} == {"BUY"}
    first = records[0]
    close = candles.set_index("open_time")["close"]
    assert first["tp_price"] == pytest.approx(close[first["t"]] * 1.02)
