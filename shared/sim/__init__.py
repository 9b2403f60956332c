"""The simulation core: pure numpy, no I/O.

Two halves, run by different services:

- the symbol worker calls :func:`validate_signals` then :func:`resolve_proposals` — every
  entry signal becomes a proposal whose exit is already resolved on its symbol's own bars;
- the portfolio simulator calls :func:`replay` over every unit's proposals, then
  :func:`compute_metrics` and :func:`equity_points`.
"""

from shared.sim.exits import Bars, Resolved, resolve_proposals
from shared.sim.metrics import compute_metrics, equity_points
from shared.sim.portfolio import BUILTIN_PORTFOLIOS, FixedFraction, PortfolioManager, Rejection
from shared.sim.replay import Costs, MarkBars, Replay, replay
from shared.sim.signals import SignalArrays, validate_signals

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
    "compute_metrics",
    "equity_points",
    "replay",
    "resolve_proposals",
    "validate_signals",
]
