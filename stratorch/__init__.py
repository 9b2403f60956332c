"""stratorch: backtest crypto strategies, in this process or on the stack.

``stratorch.backtest(...)`` runs one from Python (see :mod:`stratorch.api`); the
``stratorch`` command runs one from a request file.
"""

from stratorch.api import Backtest, BacktestFailed, BacktestRejected, backtest, backtest_async

__all__ = ["Backtest", "BacktestFailed", "BacktestRejected", "backtest", "backtest_async"]
