"""The real candles bundled with the package, so `stratorch run` works out of the box."""

from __future__ import annotations

import numpy as np

from shared.candles import ParquetCandleStore, validate_frame
from stratorch.paths import SAMPLE_STORE

SYMBOLS = ["ADAUSDT", "BTCUSDT", "DOGEUSDT", "ETHUSDT", "LINKUSDT", "LTCUSDT", "SOLUSDT", "XRPUSDT"]
FIRST = 1_606_780_800_000  # 2020-12-01 00:00 UTC
LAST = 1_626_552_000_000  # 2021-07-17 20:00 UTC
HOUR = 3_600_000


def test_sample_has_eight_symbols_of_5482_hourly_bars() -> None:
    sample = ParquetCandleStore(SAMPLE_STORE)
    assert sample.symbols("1h") == SYMBOLS
    for symbol in SYMBOLS:
        frame = sample.read(symbol, "1h", start_ms=FIRST, end_ms=LAST + HOUR)
        validate_frame(frame)
        assert len(frame) == 5482
        assert (frame["open_time"].iloc[0], frame["open_time"].iloc[-1]) == (FIRST, LAST)
        assert int(np.diff(frame["open_time"]).sum() // HOUR) - (len(frame) - 1) == 11  # gaps
        assert (frame["high"] >= frame[["open", "close"]].max(axis=1)).all()


def test_sample_ships_its_provenance() -> None:
    notice = (SAMPLE_STORE / "NOTICE.md").read_text()
    assert "iterativv/NostalgiaForInfinity" in notice
    assert "52f08a78f6" in notice
    assert "GPL-3.0" in notice
