"""Candles: the canonical frame, the Binance kline parser and the local Parquet store.

Everything that touches candles goes through here, so the local store and MongoDB hold the same
values and a backtest gives the same result on either. See :mod:`shared.candles.frame` for the
frame's exact columns and dtypes.
"""

from shared.candles.binance import IngestReport, ingest_binance, read_binance_klines
from shared.candles.frame import (
    CANDLE_COLUMNS,
    Merged,
    Span,
    SymbolCandles,
    Written,
    merge_frames,
    validate_frame,
)
from shared.candles.store import ParquetCandleStore, normalize_symbol

__all__ = [
    "CANDLE_COLUMNS",
    "IngestReport",
    "Merged",
    "ParquetCandleStore",
    "Span",
    "SymbolCandles",
    "Written",
    "ingest_binance",
    "merge_frames",
    "normalize_symbol",
    "read_binance_klines",
    "validate_frame",
]
