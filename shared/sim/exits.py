"""Signals → proposals with resolved exits: the trusted worker's half of the simulation.

Every BUY becomes a proposal (overlapping ones too), each with its own exit found by scanning
its symbol's bars; the portfolio decides later which entries are taken. Because an exit
depends only on the symbol's own bars and signals, units can be resolved in parallel and the
replay still equals a sequential simulation. The rules are the README's "Semantics".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shared.messages import ExecutionRules, ExitReason, Phase, Proposal
from shared.sim.signals import BUY, SELL, SignalArrays

#: Exit phases inside a bar, in the order they happen (see ``shared.messages.Phase``).
EXIT_AT_OPEN: Phase = 0
ENTRY: Phase = 1
EXIT_AT_LEVEL: Phase = 2
EXIT_AT_CLOSE: Phase = 3


@dataclass(frozen=True)
class Bars:
    """One symbol's simulated bars (warm-up excluded), as numpy columns."""

    time: npt.NDArray[np.int64]
    open: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]
    low: npt.NDArray[np.float64]
    close: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.time)


@dataclass(frozen=True)
class Resolved:
    proposals: list[Proposal]
    unfilled_limits: int  # limit entries the next bar never reached: no trade, not a rejection
    dropped_signals: int  # BUYs on the last bar: their next row is outside the range


def resolve_proposals(
    symbol: str, bars: Bars, signals: SignalArrays, rules: ExecutionRules
) -> Resolved:
    """Turn one symbol's validated signals into proposals, each with its exit resolved.

    Fills, the next opposite signal, the first touch of a level and the exit are found for
    every BUY at once; Python runs per proposal only to build it.
    """
    n = len(bars)
    slip = rules.slippage_bps / 10_000
    buy = np.flatnonzero(signals.kind == BUY)
    t = signals.pos[buy]
    inside = t + 1 < n  # a BUY on the last bar has no next row to enter at
    buy, t = buy[inside], t[inside]
    e = t + 1
    limit = signals.entry_price[buy]
    market = np.isnan(limit)
    filled = market | (bars.low[e] <= limit)
    buy, t, e = buy[filled], t[filled], e[filled]
    fills = np.where(market[filled], bars.open[e], np.minimum(bars.open[e], limit[filled]))
    # An opposite signal at u >= e exits at u+1's open, before any level in that bar.
    sells = signals.pos[signals.kind == SELL]
    k = np.searchsorted(sells, e)
    after = sells[np.minimum(k, len(sells) - 1)] if len(sells) else np.zeros(len(e), np.int64)
    signal_at = np.where((k < len(sells)) & (after < n - 1), after + 1, -1)
    # Levels are watched from the entry bar until the close exit, or the bar before the
    # opposite signal's exit at an open.
    close_at = np.full(len(e), n - 1, dtype=np.int64)
    if rules.max_holding_bars is not None and rules.max_holding_bars <= n:
        close_at = np.minimum(close_at, e + rules.max_holding_bars - 1)
    scan_end = np.where(signal_at < 0, close_at, np.minimum(close_at, signal_at - 1))
    tp, sl = signals.tp_price[buy], signals.sl_price[buy]
    touch = _first_touches(bars, start=e, end=scan_end, tp=tp, sl=sl)
    exit_j, raw_exit, phase, reason = _exits(
        bars, e, touch, signal_at, close_at, fills, tp, sl, rules
    )
    rows = zip(
        bars.time[t].tolist(),
        bars.time[e].tolist(),
        fills.tolist(),
        bars.time[exit_j].tolist(),
        raw_exit.tolist(),
        phase.tolist(),
        reason.tolist(),
        tp.tolist(),
        sl.tolist(),
        signals.confidence[buy].tolist(),
        strict=True,
    )
    proposals = [
        Proposal(
            id=f"{symbol}:{signal_t}:0",
            symbol=symbol,
            signal_time=signal_t,
            entry_time=entry_t,
            entry_price=fill * (1 + slip),
            exit_time=exit_t,
            exit_price=price * (1 - slip),
            exit_phase=when,
            exit_reason=_REASONS[why],
            tp_price=None if math.isnan(take) else take,
            sl_price=None if math.isnan(stop) else stop,
            confidence=confidence,
        )
        for signal_t, entry_t, fill, exit_t, price, when, why, take, stop, confidence in rows
    ]
    return Resolved(proposals, int((~filled).sum()), int((~inside).sum()))


#: What :func:`_exits`' reason codes stand for.
_REASONS: tuple[ExitReason, ...] = (
    "stop_loss",
    "take_profit",
    "signal",
    "max_holding",
    "end_of_data",
)


def _exits(
    bars: Bars,
    e: npt.NDArray[np.int64],
    touch: npt.NDArray[np.int64],
    signal_at: npt.NDArray[np.int64],
    close_at: npt.NDArray[np.int64],
    fill: npt.NDArray[np.float64],
    tp: npt.NDArray[np.float64],
    sl: npt.NDArray[np.float64],
    rules: ExecutionRules,
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.int64]
]:
    """The first exit of each long entered at bar ``e`` at raw price ``fill``: its bar, raw
    price, phase and reason (an index into :data:`_REASONS`).

    ``signal_at`` is the bar whose open an opposite signal exits at (-1: none), ``close_at``
    the bar whose close ends the trade otherwise (max holding or the last bar), ``touch`` the
    first bar reaching a level before those (-1: none; :func:`_first_touches`).
    """
    touched = touch >= 0
    j = np.where(touched, touch, 0)
    at_entry = j == e
    # A bar that opens at or through a level fills there (at the entry bar: the fill).
    reference = np.where(at_entry, fill, bars.open[j])
    gap_sl = touched & (reference <= sl)
    gap_tp = touched & ~gap_sl & (reference >= tp)
    gap_phase = np.where(at_entry, EXIT_AT_LEVEL, EXIT_AT_OPEN)
    sl_hit, tp_hit = bars.low[j] <= sl, bars.high[j] >= tp
    sl_wins = touched & sl_hit & (~tp_hit | (rules.tie_break == "stop_loss_first"))
    by_signal = ~touched & (signal_at >= 0) & (signal_at <= close_at)
    limit = rules.max_holding_bars
    held_out = e + limit - 1 <= len(bars) - 1 if limit is not None and limit <= len(bars) else False
    exit_j = np.select([touched, by_signal], [j, signal_at], close_at)
    price = np.select(
        [gap_sl | gap_tp, sl_wins, touched, by_signal],
        [reference, sl, tp, bars.open[np.maximum(signal_at, 0)]],
        bars.close[close_at],
    )
    phase = np.select(
        [gap_sl | gap_tp, touched, by_signal],
        [gap_phase, EXIT_AT_LEVEL, EXIT_AT_OPEN],
        EXIT_AT_CLOSE,
    )
    reason = np.select(
        [gap_sl, gap_tp, sl_wins, touched, by_signal, ~touched & held_out], [0, 1, 0, 1, 2, 3], 4
    )
    return exit_j, price, phase.astype(np.int64), reason


def _first_touches(
    bars: Bars,
    *,
    start: npt.NDArray[np.int64],
    end: npt.NDArray[np.int64],
    tp: npt.NDArray[np.float64],
    sl: npt.NDArray[np.float64],
) -> npt.NDArray[np.int64]:
    """For each trade ``i``, the first bar in ``[start[i], end[i]]`` whose range reaches
    ``sl[i]`` or ``tp[i]`` (NaN: no such level), or -1.

    All trades at once, in windows of bars that grow fourfold (a short trade costs little, a
    long one few passes), at most ~2M bars of all trades per pass.
    """
    found = np.full(len(start), -1, dtype=np.int64)
    todo = np.flatnonzero((start <= end) & ~(np.isnan(tp) & np.isnan(sl)))
    lo = start.copy()
    size = 32
    while len(todo):
        rows = max(1, _PASS_BARS // size)
        left = []
        for part in range(0, len(todo), rows):
            who = todo[part : part + rows]
            at = lo[who, None] + np.arange(size)
            inside = at <= end[who, None]
            at = np.minimum(at, len(bars) - 1)
            touched = inside & ((bars.low[at] <= sl[who, None]) | (bars.high[at] >= tp[who, None]))
            hit = touched.any(axis=1)
            found[who[hit]] = lo[who[hit]] + np.argmax(touched[hit], axis=1)
            lo[who] += size
            left.append(who[~hit & (lo[who] <= end[who])])
        todo = np.concatenate(left)
        size *= 4
    return found


#: Bars (of all trades together) :func:`_first_touches` looks at in one pass.
_PASS_BARS = 1 << 21
