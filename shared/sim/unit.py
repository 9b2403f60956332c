"""A unit's raw signals → its proposal batch: what the symbol worker does once the sandbox
has answered, on the trusted side, from the candles the worker read itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.candles.frame import SymbolCandles
from shared.messages import Proposal, ProposalBatch, SymbolBars, WorkUnit
from shared.sim.exits import Bars, resolve_proposals
from shared.sim.signals import validate_signals


def resolve_unit(
    unit: WorkUnit, candles: Mapping[str, SymbolCandles], raw: Mapping[str, Any]
) -> ProposalBatch:
    """Validate each symbol's raw signals against its simulated bars and resolve every
    entry's exit: the unit's batch.

    :param candles: each of the unit's symbols' candles, as the sandbox saw them.
    :param raw: what the sandbox returned: symbol → its signal columns (untrusted).
    :raises shared.errors.InvalidOutput: those are not a symbol's valid signals on its bars.
    """
    proposals: list[Proposal] = []
    bars_out: dict[str, SymbolBars] = {}
    unfilled = dropped = 0
    for symbol in unit.symbols:
        frame, first = candles[symbol]
        sim = frame.iloc[first:]
        bars = Bars(
            time=sim["open_time"].to_numpy(dtype=np.int64),
            open=sim["open"].to_numpy(dtype=np.float64),
            high=sim["high"].to_numpy(dtype=np.float64),
            low=sim["low"].to_numpy(dtype=np.float64),
            close=sim["close"].to_numpy(dtype=np.float64),
        )
        signals = validate_signals(raw.get(symbol), symbol=symbol, times=bars.time)
        resolved = resolve_proposals(symbol, bars, signals, unit.rules)
        proposals.extend(resolved.proposals)
        unfilled += resolved.unfilled_limits
        dropped += resolved.dropped_signals
        bars_out[symbol] = SymbolBars.pack(bars.time, bars.close)
    return ProposalBatch.for_unit(
        unit, proposals=proposals, bars=bars_out, unfilled_limits=unfilled, dropped_signals=dropped
    )
