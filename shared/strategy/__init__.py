"""The strategy SDK: what a user's strategy derives from, and how the sandbox runs it.

Everything in this package runs inside the sandbox, whose image has only the Python standard
library, numpy and pandas — so it imports nothing else (and from the rest of `shared` only
`shared.intervals`). See :class:`BaseStrategy` for how to write a strategy.
"""

from __future__ import annotations

from .base import BaseStrategy
from .builtins import BUILTIN_STRATEGIES
from .loader import load_component
from .reference import ComponentError, ComponentRef
from .run import (
    SIGNAL_FIELDS,
    SignalColumns,
    StrategyOutputError,
    compute_signals,
    signal_columns,
    signal_records,
)
from .window import Window

__all__ = [
    "BUILTIN_STRATEGIES",
    "SIGNAL_FIELDS",
    "BaseStrategy",
    "ComponentError",
    "ComponentRef",
    "SignalColumns",
    "StrategyOutputError",
    "Window",
    "compute_signals",
    "load_component",
    "signal_columns",
    "signal_records",
]
