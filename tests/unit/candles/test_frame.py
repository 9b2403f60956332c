"""The canonical candle frame and merging frames into one."""

from __future__ import annotations

import numpy as np
import pytest

from shared.candles import merge_frames, validate_frame

from ._klines import candles

HOUR = 3_600_000
TIMES = 1_606_780_800_000 + HOUR * np.arange(10)


def test_merge_sorts_and_lets_the_last_frame_win() -> None:
    bars = candles(TIMES)
    older = bars.iloc[:6]
    newer = bars.iloc[4:].reset_index(drop=True)  # bars 4 and 5 repeat with equal values...
    newer.loc[0, "volume"] = 99.0  # ... except bar 4's volume
    merged = merge_frames([older, newer])
    validate_frame(merged.frame)
    assert merged.frame["open_time"].tolist() == TIMES.tolist()
    assert (merged.duplicates, merged.conflicts) == (2, 1)
    assert merged.frame["volume"].iloc[4] == 99.0


def test_merge_of_out_of_order_rows_sorts_them() -> None:
    shuffled = candles(TIMES).iloc[[3, 1, 2, 0]].reset_index(drop=True)
    merged = merge_frames([shuffled])
    assert merged.frame["open_time"].tolist() == sorted(TIMES[:4].tolist())
    assert merged.duplicates == 0


def test_validate_frame_names_each_problem() -> None:
    frame = candles(TIMES)
    with pytest.raises(ValueError, match="columns are"):
        validate_frame(frame.drop(columns="trades"))
    with pytest.raises(ValueError, match="not a default RangeIndex"):
        validate_frame(frame.iloc[1:])
    with pytest.raises(ValueError, match="not strictly increasing at row 3"):
        validate_frame(candles(np.r_[TIMES[:3], TIMES[2:5]]))
