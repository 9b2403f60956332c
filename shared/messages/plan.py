"""What the state store keeps of a backtest besides its messages: its ``Plan`` and WAL records."""

from __future__ import annotations

from typing import Annotated, Literal, NotRequired, TypedDict

from pydantic import Field

from shared.messages.common import Message
from shared.messages.proposals import ExitReason, Phase
from shared.messages.requests import BacktestRequest


class Plan(Message):
    """A backtest the scheduler planned: stored before its first unit is published.

    The portfolio simulator replays with its ``request``; progress (events, the HTTP status)
    counts its ``units``; a deadline or a dead letter names the units that never finished.
    """

    #: The request as admitted: uploaded code named by its ``source_sha256``.
    request: BacktestRequest
    #: Warm-up bars before the first simulated one (the strategy's lookback).
    lookback: Annotated[int, Field(ge=1)]
    #: Where a completed result is cached (:func:`shared.cache.cache_key`).
    cache_key: str
    #: Unit id → its symbols, as published in the ``WorkUnit`` messages.
    units: dict[str, list[str]]
    #: The backtest's deadline, ms since the epoch (UTC).
    deadline_ms: int


class WalRecord(TypedDict):
    """One event of the portfolio replay, as :func:`shared.sim.replay` writes it to the WAL.

    Every record has ``seq`` (0, 1, 2, ... in replay order), the bar ``time`` and ``phase``
    it happens at, its ``symbol`` and ``proposal``, ``event`` and ``price``; an accepted event
    also says how much (``quantity``) and the ``cash`` after it, a rejected entry ``reason``.
    """

    seq: int
    time: int
    phase: Phase
    symbol: str
    proposal: str
    event: Literal["entry", "exit"]
    price: float
    decision: Literal["accepted", "rejected"]
    #: An exit's :data:`ExitReason`, a rejected entry's :class:`shared.sim.Rejection` reason.
    reason: NotRequired[ExitReason | str]
    quantity: NotRequired[float]
    cash: NotRequired[float]
