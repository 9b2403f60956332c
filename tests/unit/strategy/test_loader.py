"""The component loader: the four spec forms, callables, and errors worded for the user."""

from __future__ import annotations

import traceback
from typing import Any

import pytest

from shared.strategy import (
    BUILTIN_STRATEGIES,
    BaseStrategy,
    ComponentError,
    ComponentRef,
    compute_signals,
    load_component,
)
from shared.strategy.builtins import Momentum, SmaCross

from . import user_module
from ._candles import make_candles

SOURCE = """\
from shared.strategy import BaseStrategy


class Helper:
    pass


class Breakout(BaseStrategy):
    params = {"n": 3}

    def get_required_lookback(self):
        return self.params["n"] + 1

    def decide(self, df, interval, **kw):
        close = df["close"].to_numpy()
        if len(close) > self.params["n"] and close[-1] > close[:-1].max():
            return {"signal": "BUY"}
        return None
"""


def load(spec: Any, **kw: Any) -> Any:
    """Load ``spec`` written as JSON, as the sandbox runner does."""
    ref = ComponentRef.from_json(spec, kind=kw.get("kind", "strategy"))
    return load_component(ref, registry=BUILTIN_STRATEGIES, **kw)


# --- the forms ---------------------------------------------------------------------------


def test_scalar_name() -> None:
    strategy = load("sma_cross")
    assert type(strategy) is SmaCross and strategy.params["fast"] == 10


def test_builtin_with_params() -> None:
    strategy = load({"builtin": "momentum", "params": {"lookback": 5, "threshold": 0.1}})
    assert type(strategy) is Momentum
    assert strategy.params["lookback"] == 5 and strategy.params["threshold"] == 0.1


def test_module() -> None:
    spec = {"module": user_module.__name__, "class": "AlwaysBuy", "params": {"distance": 0.5}}
    strategy = load(spec)
    assert isinstance(strategy, user_module.AlwaysBuy)
    assert strategy.params == {"distance": 0.5}


def test_source() -> None:
    strategy = load({"source": SOURCE, "class": "Breakout", "params": {"n": 2}})
    assert isinstance(strategy, BaseStrategy)
    assert type(strategy).__module__ == "stratorch_user_strategy"
    assert strategy.params == {"n": 2}
    candles = make_candles([1, 2, 3, 2, 1, 4, 4, 5])
    columns = compute_signals(strategy, candles, first_sim=0, interval="1h", symbol="X")
    # A new 2-bar high at bars 2, 5 and 7 (bar 1 has only 2 of the 3 bars it needs).
    times = candles["open_time"].tolist()
    assert columns["t"] == [times[2], times[5], times[7]]


def test_source_tracebacks_show_line_numbers_and_lines() -> None:
    source = SOURCE.replace(
        '        close = df["close"].to_numpy()',
        '        close = df["close"].to_numpy()\n        1 / 0',
    )
    strategy = load({"source": source, "class": "Breakout"})
    with pytest.raises(ZeroDivisionError) as caught:
        compute_signals(strategy, make_candles([1.0] * 5), first_sim=0, interval="1h", symbol="X")
    text = "".join(traceback.format_exception(caught.value))
    line = source.splitlines().index("        1 / 0") + 1
    assert f'File "<strategy source>", line {line}, in decide' in text
    assert "1 / 0" in text
    assert "in Breakout.decide() at bar 2021-01-01 00:00:00 UTC" in text  # the note


def test_callables_are_returned_as_is() -> None:
    registry = {"equal": user_module.equal_weight}
    ref = ComponentRef(builtin="equal")
    assert load_component(ref, registry=registry, kind="portfolio manager") is (
        user_module.equal_weight
    )
    spec = {"module": user_module.__name__, "class": "equal_weight"}
    assert load(spec) is user_module.equal_weight
    function = load({"source": "def f(x):\n    return x\n", "class": "f"})
    assert function(3) == 3


def test_callable_takes_no_params() -> None:
    registry = {"equal": user_module.equal_weight}
    with pytest.raises(ComponentError, match="is a function, not a class, so it takes no params"):
        load_component(
            ComponentRef(builtin="equal", params={"x": 1}),
            registry=registry,
            kind="portfolio manager",
        )


# --- errors -------------------------------------------------------------------------------


def test_unknown_builtin_lists_the_builtins() -> None:
    with pytest.raises(ComponentError) as caught:
        load("foo")
    assert str(caught.value) == (
        "unknown strategy 'foo'; builtin strategies are: momentum, peak_ema_reversal, sma_cross"
    )
    with pytest.raises(ComponentError, match="did you mean 'sma_cross'"):
        load({"builtin": "sma_crosss"})


def test_kind_is_in_the_wording() -> None:
    with pytest.raises(ComponentError) as caught:
        load_component(
            ComponentRef(builtin="max"),
            registry={"fixed_fraction": object},
            kind="portfolio manager",
        )
    assert str(caught.value) == (
        "unknown portfolio manager 'max'; builtin portfolio managers are: fixed_fraction"
    )


def test_syntax_error_shows_line_and_text() -> None:
    source = "x = 1\n\nclass Broken(BaseStrategy)\n    pass\n"
    with pytest.raises(ComponentError) as caught:
        load({"source": source, "class": "Broken"})
    message = str(caught.value)
    assert message.startswith("strategy source has a syntax error at line 3:")
    assert "class Broken(BaseStrategy)" in message
    assert isinstance(caught.value.__cause__, SyntaxError)


def test_exception_at_import_of_source() -> None:
    source = "import numpy\n\nRATE = 1 / 0\n"
    with pytest.raises(ComponentError) as caught:
        load({"source": source, "class": "X"})
    assert str(caught.value) == (
        "strategy source raised ZeroDivisionError at line 3 while loading: division by zero"
    )


def test_import_of_a_missing_package_in_source() -> None:
    with pytest.raises(ComponentError, match="raised ModuleNotFoundError at line 1"):
        load({"source": "import talib\n", "class": "X"})


def test_missing_class_lists_the_classes() -> None:
    with pytest.raises(ComponentError) as caught:
        load({"source": SOURCE, "class": "BreakOut"})
    assert str(caught.value) == (
        "strategy source has no class 'BreakOut' (did you mean 'Breakout'?); "
        "classes defined there: Breakout, Helper"
    )
    with pytest.raises(ComponentError) as caught:
        load({"module": user_module.__name__, "class": "Nope"})
    assert f"strategy module '{user_module.__name__}' has no class 'Nope'" in str(caught.value)
    assert "classes defined there: AlwaysBuy" in str(caught.value)
    with pytest.raises(ComponentError, match="it defines no classes"):
        load({"source": "x = 1\n", "class": "Nope"})


def test_module_not_importable() -> None:
    with pytest.raises(ComponentError) as caught:
        load({"module": "no_such_package.strategies", "class": "X"})
    assert str(caught.value).startswith(
        "cannot import strategy module 'no_such_package.strategies': "
        "No module named 'no_such_package'"
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "a strategy spec needs one of 'builtin', 'module' or 'source'"),
        ({"params": {"fast": 3}}, "needs one of 'builtin', 'module' or 'source'"),
        (
            {"builtin": "sma_cross", "source": "x = 1"},
            "takes only one of 'builtin', 'module' or 'source', got 'builtin' and 'source'",
        ),
        ({"source": SOURCE}, "a strategy spec with 'source' needs 'class'"),
        ({"module": "x.y"}, "a strategy spec with 'module' needs 'class'"),
        ({"module": "x.y", "class": ""}, "needs 'class'"),
        ({"builtin": "sma_cross", "class": "SmaCross"}, "'class' goes with 'module' or 'source'"),
        ({"builtin": "sma_cross", "clas": "X"}, "unknown key(s) 'clas' in strategy spec"),
        ({"builtin": 3}, "'builtin' in a strategy spec must be a non-empty string"),
        ({"builtin": "sma_cross", "params": [1]}, "'params' in a strategy spec must be a mapping"),
        (["sma_cross"], "a strategy spec must be a name such as 'sma_cross' or a mapping"),
        (None, "a strategy spec must be a name"),
    ],
)
def test_bad_spec_shapes(spec: Any, expected: str) -> None:
    with pytest.raises(ComponentError) as caught:
        load(spec)
    assert expected in str(caught.value)


def test_unknown_param() -> None:
    with pytest.raises(ComponentError) as caught:
        load({"builtin": "sma_cross", "params": {"fsat": 5}})
    assert str(caught.value) == (
        "SmaCross got unknown parameter 'fsat' (did you mean 'fast'?); its parameters are: "
        "fast, sl_pct, slow, tp_pct. To add one, put it in SmaCross.params with its default."
    )
    assert isinstance(caught.value, ValueError)


def test_bad_param_value_keeps_the_strategy_wording() -> None:
    with pytest.raises(ComponentError, match="SmaCross: parameter 'fast' \\(60\\) must be smaller"):
        load({"builtin": "sma_cross", "params": {"fast": 60}})


def test_other_errors_in_init_are_wrapped() -> None:
    source = "class Picky:\n    def __init__(self, **kw):\n        raise KeyError('size')\n"
    with pytest.raises(ComponentError) as caught:
        load({"source": source, "class": "Picky", "params": {"a": 1}})
    assert str(caught.value) == "creating strategy Picky(a=1) raised KeyError: 'size'"


def test_neither_class_nor_callable() -> None:
    with pytest.raises(
        ComponentError, match="'LIMIT' is neither a class nor a function \\(got int 3\\)"
    ):
        load({"source": "LIMIT = 3\n", "class": "LIMIT"})
