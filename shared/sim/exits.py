"""Signals → proposals with resolved exits: the trusted worker's half of the simulation.

Every BUY becomes a proposal (overlapping ones too), each with its own exit found by scanning
its symbol's bars; the portfolio decides later which entries are taken. Because an exit
depends only on the symbol's own bars and signals, units can be resolved in parallel and the
replay still equals a sequential simulation. The rules are the README's "Semantics".
"""

from __future__ import annotations

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

    Fills and the next opposite signal are found for every BUY at once; only the scan for a
    level's touch, which stops at the first, runs per proposal.
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
    touch = _first_touches(bars, e, scan_end, signals.tp_price[buy], signals.sl_price[buy])
    proposals: list[Proposal] = []
    for i, signal, entry, fill, signal_j, j in zip(
        buy.tolist(),
        t.tolist(),
        e.tolist(),
        fills.tolist(),
        signal_at.tolist(),
        touch.tolist(),
        strict=True,
    ):
        tp = float(signals.tp_price[i])
        sl = float(signals.sl_price[i])
        exit_j, raw_exit, phase, reason = _find_exit(
            bars, entry, fill, tp, sl, None if signal_j < 0 else signal_j, rules, j
        )
        proposals.append(
            Proposal(
                id=f"{symbol}:{int(bars.time[signal])}:0",
                symbol=symbol,
                signal_time=int(bars.time[signal]),
                entry_time=int(bars.time[entry]),
                entry_price=fill * (1 + slip),
                exit_time=int(bars.time[exit_j]),
                exit_price=raw_exit * (1 - slip),
                exit_phase=phase,
                exit_reason=reason,
                tp_price=None if np.isnan(tp) else tp,
                sl_price=None if np.isnan(sl) else sl,
                confidence=float(signals.confidence[i]),
            )
        )
    return Resolved(proposals, int((~filled).sum()), int((~inside).sum()))


def _find_exit(
    bars: Bars,
    e: int,
    fill: float,
    tp: float,
    sl: float,
    signal_j: int | None,
    rules: ExecutionRules,
    j: int,
) -> tuple[int, float, Phase, ExitReason]:
    """The first exit of a long entered at bar ``e`` at raw price ``fill``; ``signal_j`` is
    the bar whose open an opposite signal exits at, if any; ``j`` the first bar from ``e`` on
    whose range reaches a level before those exits (-1: none, see :func:`_first_touches`)."""
    last = len(bars) - 1
    close_reason: ExitReason
    close_j, close_reason = last, "end_of_data"
    if rules.max_holding_bars is not None and e + rules.max_holding_bars - 1 <= last:
        close_j, close_reason = e + rules.max_holding_bars - 1, "max_holding"
    if j >= 0:
        reference = fill if j == e else float(bars.open[j])
        gap_phase: Phase = EXIT_AT_LEVEL if j == e else EXIT_AT_OPEN
        if reference <= sl:  # opened at or through the stop: filled at that price
            return j, reference, gap_phase, "stop_loss"
        if reference >= tp:
            return j, reference, gap_phase, "take_profit"
        sl_hit = bars.low[j] <= sl
        tp_hit = bars.high[j] >= tp
        if sl_hit and (not tp_hit or rules.tie_break == "stop_loss_first"):
            return j, sl, EXIT_AT_LEVEL, "stop_loss"
        return j, tp, EXIT_AT_LEVEL, "take_profit"
    if signal_j is not None and signal_j <= close_j:
        return signal_j, float(bars.open[signal_j]), EXIT_AT_OPEN, "signal"
    return close_j, float(bars.close[close_j]), EXIT_AT_CLOSE, close_reason


def _first_touches(
    bars: Bars,
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
