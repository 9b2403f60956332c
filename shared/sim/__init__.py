"""The simulation core: pure numpy, no I/O.

Two halves, run by different services:

- the symbol worker calls :func:`resolve_unit` (:func:`validate_signals` then
  :func:`resolve_proposals`) — every entry signal becomes a proposal whose exit is already
  resolved on its symbol's own bars;
- the portfolio simulator calls :func:`simulate` (:func:`replay` over every unit's
  proposals, then :func:`compute_metrics` and :func:`equity_points`).
"""

from shared.sim.backtest import simulate
from shared.sim.exits import Bars, Resolved, resolve_proposals
from shared.sim.metrics import compute_metrics, equity_points
from shared.sim.portfolio import (
    BUILTIN_PORTFOLIOS,
    FixedFraction,
    PortfolioManager,
    Rejection,
    load_portfolio,
)
from shared.sim.replay import Costs, MarkBars, Replay, WalLog, replay
from shared.sim.signals import SignalArrays, validate_signals
from shared.sim.unit import resolve_unit

__all__ = [
    "BUILTIN_PORTFOLIOS",
    "Bars",
    "Costs",
    "FixedFraction",
    "MarkBars",
    "PortfolioManager",
    "Rejection",
    "Replay",
    "Resolved",
    "SignalArrays",
    "WalLog",
    "compute_metrics",
    "equity_points",
    "load_portfolio",
    "replay",
    "resolve_proposals",
    "resolve_unit",
    "simulate",
    "validate_signals",
]
