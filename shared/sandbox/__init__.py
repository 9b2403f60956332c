"""Where strategy code runs: the :class:`Sandbox` port and its subprocess implementation.

:class:`ProcessSandbox` runs calls in child processes with resource limits, warm ones reused
within a session (a backtest) — for trusted code only, it is not a security boundary; the
Docker sandbox (:mod:`shared.sandbox.docker`) isolates untrusted code; both are a
:class:`~shared.sandbox.pool.PooledSandbox`, and :func:`shared.sandbox.factory.new_sandbox`
picks one from the settings. :mod:`shared.sandbox.runner` is the program either one runs
inside the sandbox, serving one job per line; :mod:`shared.sandbox.connection` is the parent's
side of that protocol, whatever started the runner, and :mod:`shared.sandbox.protocol` what
both sides share of it.

This package is imported inside the sandbox image too (``python -m shared.sandbox.runner``
imports it first), so importing it loads only the standard library and :mod:`shared.errors`:
no pydantic, no structlog, not even numpy (the runner pins BLAS threads before loading it).
:class:`ProcessSandbox` (asyncio, subprocess machinery) is imported on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.sandbox.port import (
    DEFAULT_LIMITS,
    Sandbox,
    SandboxLimits,
    StrategyInfo,
    validate_strategy_info,
)

if TYPE_CHECKING:
    from shared.sandbox.process import ProcessSandbox

__all__ = [
    "DEFAULT_LIMITS",
    "ProcessSandbox",
    "Sandbox",
    "SandboxLimits",
    "StrategyInfo",
    "validate_strategy_info",
]


def __getattr__(name: str) -> Any:
    if name == "ProcessSandbox":  # lazily: the runner inside the sandbox never needs it
        from shared.sandbox.process import ProcessSandbox

        return ProcessSandbox
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
