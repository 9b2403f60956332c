"""The wire messages' public names are exactly ``shared.messages.__all__`` (as httpx's test)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

import shared.messages
from shared.messages import (
    BacktestEvent,
    BacktestRequest,
    BacktestResult,
    CancelRequest,
    ProposalBatch,
    SymbolBars,
    WalSummary,
    peek_id,
)


def test_all_matches_exports() -> None:
    exported = {
        name
        for name, value in vars(shared.messages).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("shared.")
    }
    assert exported <= set(shared.messages.__all__)
    assert {"CancelRequest", "Deadline"} <= set(shared.messages.__all__)
    for name in shared.messages.__all__:
        assert hasattr(shared.messages, name)


def test_a_cancel_request_names_a_valid_backtest_id() -> None:
    assert CancelRequest.model_validate_json('{"backtest_id": "bt-1"}').reason == ""
    with pytest.raises(ValidationError):
        CancelRequest.model_validate_json('{"backtest_id": "no spaces"}')


def test_deadline_s_is_optional_positive_and_bounded() -> None:
    base = {"strategy": "sma_cross", "symbols": ["BTCUSDT"], "interval": "1h"}
    times = {"start": "2021-01-01", "end": "2021-02-01"}
    assert BacktestRequest.model_validate({**base, **times}).deadline_s is None
    assert BacktestRequest.model_validate({**base, **times, "deadline_s": 30}).deadline_s == 30
    for bad in (0, -1, 8 * 86_400):
        with pytest.raises(ValidationError):
            BacktestRequest.model_validate({**base, **times, "deadline_s": bad})


def test_a_result_stored_before_wal_exits_was_dropped_still_reads() -> None:
    stored = (
        '{"backtest_id": "bt-1", "status": "completed", "wal": {"events": 4,'
        ' "entries_accepted": 2, "entries_rejected": {"max_positions": 1}, "exits": 2}}'
    )
    result = BacktestResult.model_validate_json(stored)
    assert result.wal == WalSummary(
        events=4, entries_accepted=2, entries_rejected={"max_positions": 1}
    )
    assert "exits" not in result.model_dump_json()


def test_a_batch_carries_its_bars_packed_and_bit_identical() -> None:
    time = 1_609_459_200_000 + 60_000 * np.arange(1000, dtype=np.int64)
    close = np.random.default_rng(7).lognormal(size=1000) * 1e-9
    close[:3] = [0.1 + 0.2, 1e300, -0.0]
    batch = ProposalBatch(
        backtest_id="bt-1",
        unit_id="u0000",
        unit_count=1,
        symbols=["BTCUSDT"],
        bars={"BTCUSDT": SymbolBars.pack(time, close)},
    )
    body = batch.model_dump_json()
    assert len(body) < 16_000 * 4 / 3 + 1000  # the columns' bytes in base64, no number text
    got_time, got_close = ProposalBatch.model_validate_json(body).bars["BTCUSDT"].columns()
    assert got_time.dtype == np.int64 and np.array_equal(got_time, time)
    assert got_close.tobytes() == close.tobytes()


def test_a_batch_stored_with_bars_as_lists_still_reads() -> None:
    stored = (
        '{"backtest_id": "bt-1", "unit_id": "u0000", "unit_count": 1, "symbols": ["BTCUSDT"],'
        ' "bars": {"BTCUSDT": {"time": [1609459200000, 1609462800000], "close": [0.3, 29000.5]}}}'
    )
    time, close = ProposalBatch.model_validate_json(stored).bars["BTCUSDT"].columns()
    assert time.tolist() == [1609459200000, 1609462800000] and close.tolist() == [0.3, 29000.5]
    with pytest.raises(ValidationError):
        SymbolBars.model_validate({"time": ["x"], "close": [1.0]})


@pytest.mark.parametrize(
    ("body", "field", "found"),
    [
        (b'{"id": "bt-1", "symbols": 3}', "id", "bt-1"),
        (b'{"id": "a/b"}', "id", None),  # not a valid id: never used, never a path
        (b'{"id": 123}', "id", None),
        (b'["bt-1"]', "id", None),
        (b'{"strategy": {"params": {"id": "x"}}}', "id", None),  # only the object's own
        (b'{"unit_id": "u0001", "backtest_id": ', "unit_id", "u0001"),  # cut off: as text
        (b"not json", "id", None),
    ],
)
def test_peek_id_reads_a_valid_id_from_a_body_that_may_not_parse(
    body: bytes, field: str, found: str | None
) -> None:
    assert peek_id(body, field) == found


def test_a_follower_never_sees_progress_go_back() -> None:
    """portfolio_sim handlers publish at once, so counts can arrive as 1, 3, 2, 4."""
    arrived = [
        BacktestEvent(
            backtest_id="bt", type="unit_done", units_done=n, unit_count=4, unit_id=f"u{n}"
        )
        for n in (1, 3, 2, 4)
    ]
    shown: list[BacktestEvent] = []
    for event in arrived:
        shown.append(event.after(shown[-1] if shown else None))
    assert [e.units_done for e in shown] == [1, 3, 3, 4]
    assert [e.unit_id for e in shown] == ["u1", "u3", "u2", "u4"]  # each still names its unit
    assert arrived[2].units_done == 2  # the message as published is left alone
