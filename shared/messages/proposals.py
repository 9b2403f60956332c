"""``ProposalBatch``: one unit's trade proposals, or its error (symbol_worker → portfolio_sim)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BeforeValidator, Field, PlainSerializer, model_validator

from shared.messages.common import SCHEMA_VERSION, ErrorInfo, Message, Side
from shared.messages.work import WorkUnit

ExitReason = Literal["take_profit", "stop_loss", "signal", "max_holding", "end_of_data"]

#: Where inside a bar an event happens; the timeline sorts on it after the bar time.
#: 0 exits at the open (opposite signal, gap through a level), 1 entries at the open,
#: 2 exits at a level inside the bar (and every exit in the entry bar), 3 exits at the close.
Phase = Literal[0, 1, 2, 3]


class Proposal(Message):
    """A possible trade with its exit already resolved by the trusted worker.

    The portfolio manager decides at replay whether the entry is taken (and how big); a
    rejected entry drops its exit. Prices include slippage.
    """

    id: str  # "<symbol>:<signal_time>:<seq>" – deterministic, so the timeline order is too
    symbol: str
    side: Side = "long"
    signal_time: int
    entry_time: int
    entry_price: float
    exit_time: int
    exit_price: float
    exit_phase: Phase
    exit_reason: ExitReason
    tp_price: float | None = None
    sl_price: float | None = None
    confidence: float = 1.0


_TIME = np.dtype("<i8")
_CLOSE = np.dtype("<f8")


def _from_base64(value: Any) -> Any:
    """A column's text (base64) as its bytes; bytes as they are."""
    if isinstance(value, str):
        try:
            return binascii.a2b_base64(value, strict_mode=True)
        except binascii.Error as exc:
            raise ValueError(f"a bar column is not base64: {exc}") from None
    return value


def _to_base64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


#: A packed column: its bytes in memory, base64 text in JSON.
_Column = Annotated[
    bytes,
    BeforeValidator(_from_base64),
    PlainSerializer(_to_base64, return_type=str, when_used="json"),
]


class SymbolBars(Message):
    """A symbol's simulated bars as columns: what the portfolio marks equity with.

    Each column is packed: its little-endian bytes (``time`` int64 ms, ``close`` float64),
    base64-encoded in JSON. A million bars are then 21 MB of JSON that is copied, not parsed,
    on every hop (bus, store, re-read), where lists of numbers were 1M Python objects each
    way; the values are the same bits. In memory a column is its bytes, so a batch handed
    over in one process (``stratorch run``) is never base64-encoded or decoded. :meth:`pack`
    builds one, :meth:`columns` reads it. A batch stored before this (plain lists of numbers)
    still reads.
    """

    time: _Column
    close: _Column

    @classmethod
    def pack(cls, time: npt.NDArray[np.int64], close: npt.NDArray[np.float64]) -> SymbolBars:
        return cls(time=_pack(time, _TIME), close=_pack(close, _CLOSE))

    def columns(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """The bar times and closes (read-only arrays over the bytes).

        :raises ValueError: the columns are not packed arrays of one length.
        """
        time, close = _unpack(self.time, _TIME), _unpack(self.close, _CLOSE)
        if len(time) != len(close):
            raise ValueError(f"bars have {len(time)} times but {len(close)} closes")
        return time, close

    @model_validator(mode="before")
    @classmethod
    def _lists(cls, data: Any) -> Any:
        """Columns as lists of numbers (batches stored by earlier versions) are packed."""
        if not (isinstance(data, dict) and isinstance(data.get("time"), list)):
            return data
        time, close = np.asarray(data["time"]), np.asarray(data.get("close"))
        if (time.size and time.dtype.kind != "i") or close.dtype.kind not in "if":
            raise ValueError("time must be a list of integers and close a list of numbers")
        return {**data, "time": _pack(time, _TIME), "close": _pack(close, _CLOSE)}


def _pack(column: npt.NDArray[Any], dtype: np.dtype[Any]) -> bytes:
    return np.ascontiguousarray(column, dtype=dtype).tobytes()


def _unpack(raw: bytes, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    if len(raw) % dtype.itemsize:
        raise ValueError(f"a bar column of {len(raw)} bytes is not {dtype} values")
    return np.frombuffer(raw, dtype=dtype)


class ProposalBatch(Message):
    """Everything one unit produced. Exactly one of ``bars``/``proposals`` or ``error`` matters:
    a failed unit still sends a batch so the backtest completes (as ``failed``) instead of hanging.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    backtest_id: str
    unit_id: str
    unit_count: int
    symbols: list[str]
    proposals: list[Proposal] = Field(default_factory=list)
    bars: dict[str, SymbolBars] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    unfilled_limits: int = 0
    dropped_signals: int = 0
    elapsed_s: float = 0.0

    @classmethod
    def for_unit(cls, unit: WorkUnit, **fields: Any) -> ProposalBatch:
        """The batch that answers ``unit`` (its ids, count and symbols), with ``fields``."""
        return cls(
            backtest_id=unit.backtest_id,
            unit_id=unit.unit_id,
            unit_count=unit.unit_count,
            symbols=list(unit.symbols),
            **fields,
        )
