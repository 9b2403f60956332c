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
    """Run one unit; a failure becomes the batch's ``error`` so the backtest still finishes.

    A unit of a backtest that has ended (cancelled, past its deadline) is skipped: one lookup
    by id before anything is read or run.
    """
    started = time.perf_counter()
    try:
        _check_deadline(unit)
        status = await ports.store.ended(unit.backtest_id)
        if status is not None:
            raise Cancelled(
                f"unit {unit.unit_id} was skipped: backtest {unit.backtest_id} has ended ({status})"
            )
        batch = await _run(unit, ports)
    except StratorchError as exc:
        if exc.symbol is None and len(unit.symbols) == 1:
            exc.symbol = unit.symbols[0]
        exc.unit_id = unit.unit_id
        batch = ProposalBatch.for_unit(unit, error=ErrorInfo.from_error(exc))
    batch = batch.model_copy(update={"elapsed_s": time.perf_counter() - started})
    return [Outgoing(topology.PROPOSALS, batch, unit.backtest_id)]


async def _run(unit: WorkUnit, ports: Ports) -> ProposalBatch:
    window = Span(unit.interval, unit.start_ms, unit.end_ms, unit.lookback)
    frames = await asyncio.gather(*(ports.candles.load(s, window) for s in unit.symbols))
    candles = {
        s: SymbolCandles(frame, _first_simulated(frame, unit, s))
        for s, frame in zip(unit.symbols, frames, strict=True)
    }
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


def _first_simulated(frame: pd.DataFrame, unit: WorkUnit, symbol: str) -> int:
    first = int(np.searchsorted(frame["open_time"].to_numpy(), unit.start_ms))
    if first >= len(frame):
        raise NoDataError(
            f"no {unit.interval} candles for {symbol} in the requested range", symbol=symbol
        )
    return first
