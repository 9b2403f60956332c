"""stratorch: backtest crypto strategies, in this process or on the stack.

``stratorch.backtest(...)`` runs one from Python (see :mod:`stratorch.api`);
``stratorch.connect(url)`` runs them on the real stack (see :mod:`stratorch.remote`); the
``stratorch`` command runs one from a request file.
"""

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
