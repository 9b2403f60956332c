"""The columnar chunks' codec: every column reads back bit for bit, whatever its values, and
chunks of the first codec still read."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.candles.frame import CANDLE_COLUMNS
from shared.mongo import MongoDataError
from shared.mongo.chunks import Columns, decode, encode

_FLOATS = [name for name, dtype in CANDLE_COLUMNS.items() if dtype.kind == "f"]
_INTS = [name for name, dtype in CANDLE_COLUMNS.items() if dtype.kind == "i"]


@st.composite
def float_column(draw: st.DrawFn, n: int) -> np.ndarray[Any, Any]:
    """Any doubles (NaN, infinities, -0.0, subnormals), or decimals on a grid, or a walk."""
    kind = draw(st.sampled_from(["any", "decimal", "walk"]))
    if kind == "any":
        return draw(hnp.arrays(np.float64, n, elements=st.floats(width=64)))
    units = draw(hnp.arrays(np.int64, n, elements=st.integers(-(10**12), 10**12)))
    if kind == "walk":
        units = np.cumsum(units % 1000) + 10**9
    return units / 10 ** draw(st.integers(0, 8))


@st.composite
def chunk(draw: st.DrawFn) -> Columns:
    """Columns of ``n`` bars, often shaped like candles (so that the predictors are chosen):
    open at the previous close, high and low beyond open and close, taker buys a share of
    the volume."""
    n = draw(st.integers(1, 200))
    columns = {name: draw(float_column(n)) for name in _FLOATS}
    for name in _INTS:
        columns[name] = draw(hnp.arrays(np.int64, n, elements=st.integers(-(2**63), 2**63 - 1)))
    if draw(st.booleans()):
        share = draw(st.sampled_from([2.0, 3.0]))
        with np.errstate(all="ignore"):  # extreme doubles overflow to infinities: kept as such
            close = columns["close"]
            columns["open"] = np.concatenate(([close[0]], close[:-1]))
            top, bottom = np.maximum(columns["open"], close), np.minimum(columns["open"], close)
            columns["high"] = top + np.abs(columns["high"])
            columns["low"] = bottom - columns["low"]
            columns["taker_buy_base"] = columns["volume"] / share
            columns["taker_buy_quote"] = columns["quote_volume"] - columns["taker_buy_quote"]
    return columns


def assert_bit_identical(got: Columns, want: Columns) -> None:
    assert list(got) == list(CANDLE_COLUMNS)
    for name, dtype in CANDLE_COLUMNS.items():
        assert got[name].dtype == dtype
        assert got[name].tobytes() == np.asarray(want[name], dtype=dtype).tobytes(), name


@settings(max_examples=300, deadline=None)
@given(chunk())
def test_every_column_reads_back_bit_for_bit(columns: Columns) -> None:
    with np.errstate(all="ignore"):  # infinities and NaN in the generated candles
        assert_bit_identical(decode(encode(columns), "db.chunks"), columns)


def test_negative_zero_among_decimals_stays_negative() -> None:
    columns = {name: np.array([0.5, 1.25, 2.0]) for name in _FLOATS}
    columns["taker_buy_quote"] = np.array([0.5, -0.0, 2.0])
    columns |= {name: np.arange(3) for name in _INTS}
    assert_bit_identical(decode(encode(columns), "db.chunks"), columns)


def test_candle_shaped_columns_are_stored_relative_to_their_neighbours() -> None:
    rng = np.random.default_rng(0)
    n = 10_000
    close = np.round(100 * np.exp(np.cumsum(rng.normal(0, 0.001, n))), 2)
    open_ = np.concatenate(([100.0], close[:-1]))
    volume = np.round(rng.uniform(1, 100, n), 5)
    columns = {
        "open_time": 60_000 * np.arange(n),
        "open": open_,
        "high": np.round(np.maximum(open_, close) + 0.05, 2),
        "low": np.round(np.minimum(open_, close) - 0.03, 2),
        "close": close,
        "volume": volume,
        "close_time": 60_000 * np.arange(n) + 59_999,
        "quote_volume": volume * 3,
        "trades": rng.integers(10, 1000, n),
        "taker_buy_base": volume,
        "taker_buy_quote": volume * 3,
    }
    doc = encode(columns)
    assert doc["predictors"] | {"volume": "?", "quote_volume": "?", "trades": "?"} == {
        "open_time": "previous",
        "close_time": "previous",
        "close": "previous",
        "open": "previous close",
        "high": "max(open, close)",
        "low": "min(open, close)",
        "volume": "?",
        "quote_volume": "?",
        "trades": "?",
        "taker_buy_base": "volume",
        "taker_buy_quote": "quote_volume",
    }
    for name in ("open", "high", "low", "taker_buy_base", "taker_buy_quote"):
        assert len(doc[name]) < 200, name  # of 10,000 bars: nearly nothing
    assert_bit_identical(decode(doc, "db.chunks"), columns)


def first_codec(columns: Columns, decimals: dict[str, int]) -> dict[str, Any]:
    """A chunk as the first codec (``shuffle-zlib``) wrote it: times and the ``decimals``
    columns as differences to the previous bar, no zigzag, no predictors."""
    stored = {}
    for name, dtype in CANDLE_COLUMNS.items():
        values = np.asarray(columns[name], dtype=dtype)
        if name in decimals:
            values = np.round(values * 10 ** decimals[name]).astype(np.int64)
        if name in ("open_time", "close_time", *decimals):
            values = np.diff(values, prepend=values.dtype.type(0))
        stored[name] = zlib.compress(values.view(np.uint8).reshape(-1, 8).T.tobytes())
    n = len(columns["open_time"])
    return {"codec": "shuffle-zlib", "count": n, "columns": stored, "decimals": decimals}


def test_chunks_of_the_first_codec_still_read() -> None:
    rng = np.random.default_rng(1)
    n = 500
    columns = {name: rng.uniform(1, 100, n) for name in _FLOATS}
    columns["close"] = np.round(columns["close"], 2)
    columns |= {name: rng.integers(0, 2**40, n) for name in _INTS}
    assert_bit_identical(decode(first_codec(columns, {"close": 2}), "db.chunks"), columns)


def test_an_unknown_predictor_is_named() -> None:
    columns = {name: np.ones(3, dtype) for name, dtype in CANDLE_COLUMNS.items()}
    doc = encode(columns) | {"_id": "X/1m/2024-01/ab", "predictors": {"close": "the moon"}}
    with pytest.raises(MongoDataError, match=r"'X/1m/2024-01/ab' in db.chunks.*'the moon'"):
        decode(doc, "db.chunks")
