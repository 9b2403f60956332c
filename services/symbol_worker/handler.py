"""Symbol worker: a unit in, its proposals (or its structured error) out.

The sandbox only returns signals. Everything that decides money — which bar an entry fills
in, at what price, when it exits — happens here, on the trusted side, from the candles this
worker read itself. So untrusted code can never forge a fill.
"""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pandas as pd

from shared import topology
from shared.bus import Outgoing
from shared.candles import Span, SymbolCandles
from shared.errors import Cancelled, DeadlineExceeded, NoDataError, StrategyTimeout, StratorchError
from shared.messages import ErrorInfo, ProposalBatch, WorkUnit
from shared.ports import Ports
from shared.sandbox.port import SandboxLimits
from shared.sim import resolve_unit
from shared.store import fetch_code


async def handle(unit: WorkUnit, ports: Ports) -> list[Outgoing]:
    """Run one unit, or each run of a grouped one (:meth:`WorkUnit.each`): one batch per run.

    A run's failure becomes its batch's ``error`` so its backtest still finishes; the other
    runs of a group go on. A run of a backtest that has ended (cancelled, past its deadline)
    is skipped: one lookup by id before anything is read or run for it. A group's candles are
    read once, with its largest lookback; each run gets exactly the rows it would have read
    alone.
    """
    candles = _Candles(unit, ports)
    return [await _answer(run, candles, ports) for run in unit.each()]


async def _answer(unit: WorkUnit, candles: _Candles, ports: Ports) -> Outgoing:
    started = time.perf_counter()
    try:
        _check_deadline(unit)
        status = await ports.store.ended(unit.backtest_id)
        if status is not None:
            raise Cancelled(
                f"unit {unit.unit_id} was skipped: backtest {unit.backtest_id} has ended ({status})"
            )
        batch = await _run(unit, await candles.of(unit), ports)
    except StratorchError as exc:
        if exc.symbol is None and len(unit.symbols) == 1:
            exc.symbol = unit.symbols[0]
        exc.unit_id = unit.unit_id
        batch = ProposalBatch.for_unit(unit, error=ErrorInfo.from_error(exc))
    batch = batch.model_copy(update={"elapsed_s": time.perf_counter() - started})
    return Outgoing(topology.PROPOSALS, batch, unit.backtest_id)


class _Candles:
    """A unit's candles, read on first use (never for a skipped unit) and once for all the
    runs of a group, with the largest lookback (the group's own ``lookback``)."""

    def __init__(self, unit: WorkUnit, ports: Ports) -> None:
        self._unit = unit
        self._ports = ports
        self._frames: asyncio.Future[list[pd.DataFrame]] | None = None

    async def of(self, run: WorkUnit) -> dict[str, SymbolCandles]:
        """``run``'s candles: its ``lookback`` bars before its start, then its window's."""
        if self._frames is None:
            unit = self._unit
            window = Span(unit.interval, unit.start_ms, unit.end_ms, unit.lookback)
            loading = (self._ports.candles.load(s, window) for s in unit.symbols)
            self._frames = asyncio.ensure_future(asyncio.gather(*loading))
        frames = await self._frames
        return {s: _cut(frame, run, s) for s, frame in zip(run.symbols, frames, strict=True)}


async def _run(unit: WorkUnit, candles: dict[str, SymbolCandles], ports: Ports) -> ProposalBatch:
    code = await fetch_code(unit.strategy, ports.store)
    # The sandbox call ends at the deadline at the latest.
    left_s = _check_deadline(unit)
    try:
        raw = await ports.sandbox.signals(
            code,
            candles,
            interval=unit.interval,
            limits=SandboxLimits(timeout_s=min(unit.timeout_s, left_s)),
            session=unit.session or unit.backtest_id,
        )
    except StrategyTimeout as exc:
        if left_s < unit.timeout_s:  # the deadline's timeout, not the unit's
            raise _deadline_exceeded(unit, exc.log_tail) from None
        raise
    except Cancelled as exc:  # stopped: by a cancel, or at the deadline (see portfolio_sim)
        if time.time() * 1000 >= (unit.deadline_ms or math.inf):
            raise _deadline_exceeded(unit, exc.log_tail) from None
        raise
    # Validating and resolving is CPU work: off the event loop, so heartbeats keep flowing.
    return await asyncio.to_thread(resolve_unit, unit, candles, raw)


def _check_deadline(unit: WorkUnit) -> float:
    """Seconds left until the unit's deadline (``inf`` without one); ``DeadlineExceeded``
    once it has passed."""
    if unit.deadline_ms is None:
        return math.inf
    left_s = unit.deadline_ms / 1000 - time.time()
    if left_s <= 0:
        raise _deadline_exceeded(unit)
    return left_s


def _deadline_exceeded(unit: WorkUnit, log_tail: str = "") -> DeadlineExceeded:
    return DeadlineExceeded(
        f"unit {unit.unit_id} ({', '.join(unit.symbols)}) had not finished when its backtest's"
        " deadline passed; raise the request's deadline_s, or make the strategy faster",
        log_tail=log_tail,
    )


def _cut(frame: pd.DataFrame, run: WorkUnit, symbol: str) -> SymbolCandles:
    """``run``'s candles out of ``frame`` (read with a lookback at least ``run``'s): its
    ``lookback`` bars before its start and the rest, exactly the rows it would read alone."""
    first = int(np.searchsorted(frame["open_time"].to_numpy(), run.start_ms))
    if first >= len(frame):
        raise NoDataError(
            f"no {run.interval} candles for {symbol} in the requested range", symbol=symbol
        )
    begin = max(0, first - run.lookback)
    if begin:
        frame = frame.iloc[begin:].reset_index(drop=True)
    return SymbolCandles(frame, first - begin)
