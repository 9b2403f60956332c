"""validate_signals and resolve_unit on a symbol's raw signal columns (untrusted): what they
accept, and for what they refuse an InvalidOutput naming the symbol, the bar and the value.

The columns are checked column by column; only a bad value sends them through a record-by-
record check, which must name the first bad signal as checking records one by one would. The
property test at the end holds both paths to those one-by-one rules, written out here.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import InvalidOutput
from shared.sim import SignalArrays, validate_signals
from shared.strategy import SIGNAL_FIELDS, signal_columns
from tests.unit.sim.scenario import FLAT, request, resolve, t

SYMBOL = "BTCUSDT"
BARS = 100
TIMES = np.array([t(i) for i in range(BARS)], dtype=np.int64)
LEVELS = ("entry_price", "tp_price", "sl_price")
SHAPE = (
    f"signals for {SYMBOL} must be the columns t, signal, entry_price, tp_price, sl_price,"
    " confidence, meta (lists of one length), got "
)


def check(*records: dict[str, Any]) -> SignalArrays:
    return validate_signals(signal_columns(records), symbol=SYMBOL, times=TIMES)


def refusal(raw: Any) -> InvalidOutput:
    with pytest.raises(InvalidOutput) as caught:
        validate_signals(raw, symbol=SYMBOL, times=TIMES)
    assert caught.value.symbol == SYMBOL
    return caught.value


# -- what is accepted ------------------------------------------------------------------------


def test_valid_signals_come_back_as_arrays_in_bar_order() -> None:
    got = check(
        {"t": t(5), "signal": "SELL", "sl_price": 120, "tp_price": 80.5, "confidence": -2},
        {"t": t(1), "signal": "BUY", "entry_price": 99, "tp_price": 110.0, "sl_price": 90.0},
        {"t": t(3), "signal": "BUY", "confidence": 0.5, "meta": {"why": ["any", "json"]}},
    )

    np.testing.assert_array_equal(got.pos, [1, 3, 5])
    np.testing.assert_array_equal(got.kind, [1, 1, -1])
    np.testing.assert_array_equal(got.entry_price, [99.0, np.nan, np.nan])
    np.testing.assert_array_equal(got.tp_price, [110.0, np.nan, 80.5])
    np.testing.assert_array_equal(got.sl_price, [90.0, np.nan, 120.0])  # a short's may cross
    np.testing.assert_array_equal(got.confidence, [1.0, 0.5, -2.0])
    assert got.pos.dtype == np.int64 and got.kind.dtype == np.int8


def test_no_signals_are_empty_columns() -> None:
    got = validate_signals({field: [] for field in SIGNAL_FIELDS}, symbol=SYMBOL, times=TIMES)

    assert len(got.pos) == len(got.kind) == len(got.confidence) == 0


# -- a bad value: the first bad signal, named -------------------------------------------------

BUY: dict[str, Any] = {"signal": "BUY"}


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (
            [{"t": t(0), **BUY}, {"t": float(t(1)), **BUY}],
            f"signal #1 has no integer bar time 't': {float(t(1))!r}",
        ),
        ([{"t": True, **BUY}], "signal #0 has no integer bar time 't': True"),
        ([{"t": None, **BUY}], "signal #0 has no integer bar time 't': None"),
        ([{"t": str(t(0)), **BUY}], f"signal #0 has no integer bar time 't': '{t(0)}'"),
        (
            [{"t": t(2) + 1, **BUY}],
            f"signal at t={t(2) + 1} is not the open time of a simulated bar",
        ),
        ([{"t": t(-1), **BUY}], f"signal at t={t(-1)} is not the open time of a simulated bar"),
        ([{"t": t(BARS), **BUY}], f"signal at t={t(BARS)} is not the open time of a simulated bar"),
        ([{"t": 2**63, **BUY}], f"signal at t={2**63} is not the open time of a simulated bar"),
        (
            [{"t": t(0), "signal": "HOLD"}],
            f"signal at t={t(0)} is 'HOLD'; expected 'BUY' or 'SELL'",
        ),
        ([{"t": t(0), "signal": "buy"}], f"signal at t={t(0)} is 'buy'; expected 'BUY' or 'SELL'"),
        ([{"t": t(0), "signal": None}], f"signal at t={t(0)} is None; expected 'BUY' or 'SELL'"),
        (
            [{"t": t(0), "signal": ["BUY"]}],
            f"signal at t={t(0)} is ['BUY']; expected 'BUY' or 'SELL'",
        ),
        (
            [{"t": t(0), **BUY, "entry_price": 0}],
            f"entry_price at t={t(0)} must be a positive finite number or null, got 0",
        ),
        (
            [{"t": t(0), **BUY, "tp_price": -1.5}],
            f"tp_price at t={t(0)} must be a positive finite number or null, got -1.5",
        ),
        (
            [{"t": t(0), **BUY, "sl_price": math.nan}],
            f"sl_price at t={t(0)} must be a positive finite number or null, got nan",
        ),
        (
            [{"t": t(0), **BUY, "tp_price": math.inf}],
            f"tp_price at t={t(0)} must be a positive finite number or null, got inf",
        ),
        (
            [{"t": t(0), **BUY, "entry_price": "100"}],
            f"entry_price at t={t(0)} must be a positive finite number or null, got '100'",
        ),
        (
            [{"t": t(0), **BUY, "tp_price": True}],
            f"tp_price at t={t(0)} must be a positive finite number or null, got True",
        ),
        (  # JSON may write an integer beyond a float's range
            [{"t": t(0), **BUY, "tp_price": 10**400}],
            f"tp_price at t={t(0)} must be a positive finite number or null, got 1{'0' * 39}",
        ),
        (
            [{"t": t(0), **BUY, "confidence": -(10**400)}],
            f"confidence at t={t(0)} must be a finite number",
        ),
        (
            [{"t": t(0), **BUY, "confidence": math.nan}],
            f"confidence at t={t(0)} must be a finite number",
        ),
        (
            [{"t": t(0), **BUY, "confidence": None}],
            f"confidence at t={t(0)} must be a finite number",
        ),
        (
            [{"t": t(0), **BUY, "confidence": "1"}],
            f"confidence at t={t(0)} must be a finite number",
        ),
        (
            [{"t": t(0), **BUY, "confidence": True}],
            f"confidence at t={t(0)} must be a finite number",
        ),
        (
            [{"t": t(0), **BUY, "tp_price": 100, "sl_price": 100}],
            f"BUY at t={t(0)} has sl_price 100.0 not below tp_price 100.0; a long's stop-loss"
            " must be below its take-profit",
        ),
        (
            [{"t": t(3), **BUY}, {"t": t(1), **BUY}, {"t": t(3), "signal": "SELL"}],
            f"two signals at the same bar t={t(3)}",
        ),
        # The first bad signal, in order, whatever is wrong with it or with later ones.
        (
            [{"t": t(0) + 1, **BUY}, {"t": t(1), **BUY, "tp_price": -1}],
            f"signal at t={t(0) + 1} is not the open time of a simulated bar",
        ),
        (
            [{"t": t(0), **BUY, "tp_price": -1}, {"t": t(1) + 1, **BUY}],
            f"tp_price at t={t(0)} must be a positive finite number or null, got -1",
        ),
        (
            [{"t": t(0) + 1, "signal": "HOLD"}],  # its bar time before its other values
            f"signal at t={t(0) + 1} is not the open time of a simulated bar",
        ),
        (
            [{"t": t(0) + 1, **BUY, "tp_price": 1, "sl_price": 2}],
            f"signal at t={t(0) + 1} is not the open time of a simulated bar",
        ),
        (
            [{"t": t(0), **BUY, "tp_price": 1, "sl_price": 2}, {"t": "late", **BUY}],
            f"BUY at t={t(0)} has sl_price 2.0 not below tp_price 1.0; a long's stop-loss"
            " must be below its take-profit",
        ),
        (
            [{"t": t(0), **BUY, "tp_price": 1, "sl_price": 2, "confidence": None}],
            f"confidence at t={t(0)} must be a finite number",
        ),
    ],
)
def test_a_bad_signal_is_named_by_its_bar_and_value(
    records: list[dict[str, Any]], expected: str
) -> None:
    error = refusal(signal_columns(records))

    assert error.message == f"{SYMBOL}: {expected}"


# -- what is not a symbol's columns -----------------------------------------------------------


def columns_but(**changes: Any) -> dict[str, Any]:
    """Two valid signals' columns, with ``changes`` (a field to None: left out)."""
    columns = signal_columns([{"t": t(0), **BUY}, {"t": t(1), "signal": "SELL"}])
    columns.update(changes)
    return {field: column for field, column in columns.items() if column is not None}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param([{"t": t(0), **BUY}], id="records"),
        pytest.param(None, id="none"),
        pytest.param("columns", id="a string"),
        pytest.param({}, id="no fields"),
        pytest.param(columns_but(meta=None), id="a field missing"),
        pytest.param(columns_but(volume=[1.0, 2.0]), id="an extra field"),
        pytest.param(columns_but(confidence=[1.0]), id="a shorter column"),
        pytest.param(columns_but(t=(t(0), t(1))), id="a column not a list"),
        pytest.param(columns_but(meta={}), id="a column a dict"),
    ],
)
def test_what_is_not_the_columns_is_refused_naming_the_symbol(raw: Any) -> None:
    error = refusal(raw)

    assert error.message.startswith(SHAPE)


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (None, "NoneType None"),
        (columns_but(meta=None, confidence=None), "no 'confidence', 'meta'"),
        (columns_but(volume=[1.0, 2.0]), "the unknown 'volume'"),
        (columns_but(t=(t(0), t(1))), "'t' as a tuple"),
        (
            columns_but(confidence=[1.0]),
            "lengths t 2, signal 2, entry_price 2, tp_price 2, sl_price 2, confidence 1, meta 2",
        ),
    ],
)
def test_the_refusal_says_what_is_wrong_with_the_columns(raw: Any, said: str) -> None:
    assert refusal(raw).message == SHAPE + said


def test_resolve_unit_refuses_a_symbols_bad_signals_naming_it() -> None:
    req = request([SYMBOL])
    rows = [FLAT] * 3

    with pytest.raises(InvalidOutput, match=f"^{re.escape(SHAPE)}") as caught:
        resolve(req, SYMBOL, rows, [{"t": t(0), **BUY}])  # records, not columns
    assert caught.value.symbol == SYMBOL
    with pytest.raises(InvalidOutput, match="tp_price at t=") as caught:
        resolve(req, SYMBOL, rows, signal_columns([{"t": t(0), **BUY, "tp_price": -5.0}]))
    assert caught.value.symbol == SYMBOL
    batch = resolve(req, SYMBOL, rows, signal_columns([{"t": t(0), **BUY}]))
    assert len(batch.proposals) == 1


# -- both paths follow the one-by-one rules ---------------------------------------------------


def one_by_one(records: list[dict[str, Any]]) -> str | list[tuple[Any, ...]]:
    """What checking ``records`` one by one gives: the message for the first bad one, else
    a row (bar index, kind, entry, tp, sl, confidence) per signal in bar order."""
    bar = {int(time): i for i, time in enumerate(TIMES)}
    rows = []
    for i, record in enumerate(records):
        t_, signal, conf = record["t"], record["signal"], record["confidence"]
        if type(t_) is not int:
            return f"signal #{i} has no integer bar time 't': {t_!r:.40}"
        if t_ not in bar:
            return f"signal at t={t_} is not the open time of a simulated bar"
        if signal not in ("BUY", "SELL") or type(signal) is not str:
            return f"signal at t={t_} is {signal!r:.40}; expected 'BUY' or 'SELL'"
        levels = []
        for key in LEVELS:
            value = record[key]
            if value is not None and not (
                type(value) in (int, float) and math.isfinite(value) and value > 0
            ):
                return (
                    f"{key} at t={t_} must be a positive finite number or null, got {value!r:.40}"
                )
            levels.append(math.nan if value is None else float(value))
        if type(conf) not in (int, float) or not math.isfinite(conf):
            return f"confidence at t={t_} must be a finite number"
        entry, tp, sl = levels
        if signal == "BUY" and sl >= tp:
            return (
                f"BUY at t={t_} has sl_price {sl} not below tp_price {tp}; a long's stop-loss"
                " must be below its take-profit"
            )
        rows.append((bar[t_], 1 if signal == "BUY" else -1, entry, tp, sl, float(conf)))
    rows.sort(key=lambda row: row[0])
    for before, after in itertools.pairwise(rows):
        if before[0] == after[0]:
            return f"two signals at the same bar t={TIMES[before[0]]}"
    return rows


LEVEL = st.none() | st.integers(1, 10**6) | st.floats(1e-9, 1e9)
VALID = {
    "t": st.sampled_from(TIMES.tolist()),
    "signal": st.sampled_from(["BUY", "SELL"]),
    "entry_price": LEVEL,
    "tp_price": st.none() | st.floats(100.0, 1e9) | st.integers(100, 10**9),
    "sl_price": st.none() | st.floats(1e-9, 99.0) | st.integers(1, 99),
    "confidence": st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False),
    "meta": st.just({}) | st.dictionaries(st.text(max_size=3), st.integers()),
}
NOT_A_LEVEL = [0, -1, -0.5, 0.0, math.nan, math.inf, -math.inf, "1", True, [1.0], {}]
BAD = {
    "t": [
        str(t(0)),
        float(t(0)),
        True,
        None,
        [t(0)],
        t(0) + 1,
        t(-1),
        t(BARS),
        2**63,
        -(2**63) - 1,
    ],
    "signal": ["HOLD", "buy", "", None, 1, True, ["BUY"]],
    "entry_price": NOT_A_LEVEL,
    "tp_price": NOT_A_LEVEL,
    "sl_price": NOT_A_LEVEL,
    "confidence": [math.nan, math.inf, -math.inf, None, "1", True, [1.0]],
}


@st.composite
def signals(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Valid signals in any order (two may share a bar), with up to two bad values put in."""
    records = draw(st.lists(st.fixed_dictionaries(VALID), max_size=8))
    for _ in range(draw(st.integers(0, 2)) if records else 0):
        record = draw(st.sampled_from(records))
        field = draw(st.sampled_from([*BAD, "crossed"]))
        if field in BAD:
            record[field] = draw(st.sampled_from(BAD[field]))
        else:  # a long whose stop-loss is not below its take-profit
            record.update(
                signal="BUY", tp_price=100.0, sl_price=draw(st.sampled_from([100, 150.5]))
            )
    return records


@settings(max_examples=1000, deadline=None)
@given(signals())
def test_columns_are_checked_as_records_one_by_one(records: list[dict[str, Any]]) -> None:
    expected = one_by_one(records)
    raw = signal_columns(records)

    if isinstance(expected, str):
        assert refusal(raw).message == f"{SYMBOL}: {expected}"
        return
    got = validate_signals(raw, symbol=SYMBOL, times=TIMES)
    want = np.array(expected, dtype=np.float64).reshape(-1, 6).T
    np.testing.assert_array_equal(got.pos, want[0].astype(np.int64))
    np.testing.assert_array_equal(got.kind, want[1].astype(np.int8))
    for name, column in zip(
        ("entry_price", "tp_price", "sl_price", "confidence"), want[2:], strict=True
    ):
        np.testing.assert_array_equal(getattr(got, name), column, err_msg=name)
