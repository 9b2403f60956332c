"""stratorch: backtest crypto strategies, in this process or on the stack.

``stratorch.backtest(...)`` runs one from Python (see :mod:`stratorch.api`);
``stratorch.connect(url)`` runs them on the real stack (see :mod:`stratorch.remote`); the
``stratorch`` command runs one from a request file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stratorch.api import (
        Backtest,
        BacktestFailed,
        BacktestRejected,
        LookAheadFound,
        backtest,
        backtest_async,
    )
    from stratorch.remote import (
        AsyncClient,
        Client,
        StackError,
        StackRefused,
        StackStatus,
        StackUnreachable,
        UnknownBacktest,
        connect,
        connect_async,
    )

__all__ = [
    "AsyncClient",
    "Backtest",
    "BacktestFailed",
    "BacktestRejected",
    "Client",
    "LookAheadFound",
    "StackError",
    "StackRefused",
    "StackStatus",
    "StackUnreachable",
    "UnknownBacktest",
    "backtest",
    "backtest_async",
    "connect",
    "connect_async",
]


def __getattr__(name: str) -> Any:
    """Imported on first use, so that the ``stratorch`` command can start its sandbox before
    pandas is imported (see :mod:`stratorch.cli_start`)."""
    if name in __all__:
        for module in map(importlib.import_module, ("stratorch.api", "stratorch.remote")):
            if name in module.__all__:
                value = getattr(module, name)
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
