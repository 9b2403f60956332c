"""The wire messages' public names are exactly ``shared.messages.__all__`` (as httpx's test)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import shared.messages
from shared.messages import BacktestRequest, CancelRequest


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
