"""The sandbox port: what a symbol worker needs from wherever untrusted strategy code runs.

Two implementations satisfy :class:`Sandbox`: :class:`shared.sandbox.process.ProcessSandbox`
(a child process with resource limits; trusted code only) and a Docker one (the real
isolation boundary). Both take a :class:`~shared.strategy.ComponentRef`, run it under
:class:`SandboxLimits` and turn every failure into a :class:`shared.errors.SandboxError` (or
:class:`shared.errors.RequestRejected` when the code does not even load).

This module is imported by the sandbox runner inside the sandbox image, so it imports only
the standard library and :mod:`shared.errors`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from shared.errors import Cancelled, InvalidOutput

if TYPE_CHECKING:
    from shared.candles.frame import SymbolCandles
    from shared.strategy.reference import ComponentRef
    from shared.strategy.run import SignalColumns

__all__ = [
    "DEFAULT_LIMITS",
    "Sandbox",
    "SandboxLimits",
    "StoppedSessions",
    "StrategyInfo",
    "validate_signal_reply",
    "validate_strategy_info",
]

_MiB = 1024 * 1024


@dataclass(frozen=True)
class StrategyInfo:
    """What :meth:`Sandbox.describe` learns from a strategy before any candle is read."""

    #: Bars ``decide`` sees, the current one included; as many warm-up bars are loaded.
    lookback: int
    #: The strategy's ``work_units(symbols)``: a partition of the requested symbols.
    units: list[list[str]]
    #: Whether it overrides ``signals(df)`` (one call over the whole history, which may look
    #: ahead) rather than running ``decide`` per bar (which cannot).
    vectorized: bool = True


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandbox call; every default is the service's default.

    :param timeout_s: wall-clock seconds for the call, from handing the job to the sandbox
        to its result (a new sandbox's start-up, candle loading, the strategy); past it the
        sandbox is killed and :class:`shared.errors.StrategyTimeout` raised.
    :param memory_bytes: address-space / memory cap of the strategy process (2 GiB, as
        the design's container default). A warm sandbox of a session serves only calls with
        the same cap, since it is set when the sandbox starts.
    :param output_bytes: cap on the result document (the signals as JSON). 64 MiB is far above
        what one signal per bar on years of 1-minute bars needs.
    :param log_bytes: how much of the strategy's own output (``print``, warnings, C code
        writing to fd 1/2) is kept, the newest part; error messages show its last lines.
    :param log_flood_bytes: a strategy that prints more than this in one call is killed with
        :class:`shared.errors.OutputTooLarge`: printing is not a way to stall the host.
    """

    timeout_s: float = 300.0
    memory_bytes: int = 2 * 1024 * _MiB
    output_bytes: int = 64 * _MiB
    log_bytes: int = 1 * _MiB
    log_flood_bytes: int = 16 * _MiB

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxLimits.timeout_s must be > 0, got {self.timeout_s!r}")
        for name in ("memory_bytes", "output_bytes", "log_bytes", "log_flood_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive int, got {value!r}")


#: The limits used when a call passes none.
DEFAULT_LIMITS = SandboxLimits()


class StoppedSessions:
    """The sessions a sandbox was told to :meth:`~Sandbox.stop`, the newest ``size`` of them
    (a bounded memory: a session is a backtest, and a stopped one is over for good)."""

    def __init__(self, size: int = 10_000) -> None:
        self._sessions: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, session: str) -> None:
        self._sessions[session] = None
        while len(self._sessions) > self._size:
            self._sessions.popitem(last=False)

    def __contains__(self, session: object) -> bool:
        return session in self._sessions

    def error(self, session: str, label: str) -> Cancelled:
        """What a call of a stopped session raises."""
        return Cancelled(f"{label} was stopped: backtest {session} was cancelled or has ended")


class Sandbox(Protocol):
    """Runs strategy code somewhere it cannot hurt the caller.

    Use it as an async context manager (or call :meth:`aclose`). ``limits`` bound each call.

    ``session`` lets calls share warm sandboxes: calls with the same session may run, one
    after another, in a sandbox that is already started, so only the first pays its start-up;
    concurrent calls never share one. Pass the backtest id: a session must never span users
    (one user's code would run where another's ran), and within it every call loads the
    strategy afresh, so a strategy's module state does not carry over from call to call.
    ``None`` (the default) gives the call a sandbox of its own.
    Every failure of the strategy raises a :class:`shared.errors.StratorchError`:
    ``RequestRejected`` (the code does not load: syntax error, unknown class or parameter),
    ``StrategyTimeout``, ``StrategyOutOfMemory``, ``StrategyCrashed``, ``InvalidOutput``,
    ``OutputTooLarge``; each carries the symbol when one is known and the tail of what the
    strategy printed.
    """

    async def describe(
        self,
        code: ComponentRef,
        symbols: list[str],
        *,
        limits: SandboxLimits = DEFAULT_LIMITS,
        session: str | None = None,
    ) -> StrategyInfo:
        """Instantiate the strategy; return its lookback and its ``work_units(symbols)``.

        Both are checked (see :func:`validate_strategy_info`): the lookback is a positive
        int and the units partition ``symbols``; anything else is ``InvalidOutput``.
        """
        ...

    async def signals(
        self,
        code: ComponentRef,
        candles: Mapping[str, SymbolCandles],
        *,
        interval: str,
        limits: SandboxLimits = DEFAULT_LIMITS,
        session: str | None = None,
    ) -> dict[str, SignalColumns]:
        """Run the strategy over each symbol's candles; return its raw signals, as columns
        (:data:`shared.strategy.SIGNAL_FIELDS`).

        ``candles`` maps a symbol to its candles: the canonical frame and the index of its
        first simulated row (rows before it are warm-up). The signals are UNTRUSTED: only
        their container shape (per requested symbol, a list per field, all of one length) is
        checked here; the caller validates every value.
        """
        ...

    async def stop(self, session: str) -> None:
        """End the session (a cancelled backtest): remove its idle sandboxes, kill and remove
        those running a call — each such call raises :class:`shared.errors.Cancelled` — and
        refuse its later calls with ``Cancelled`` too. Returns once they are gone; stopping a
        session with nothing running is fine."""
        ...

    async def aclose(self) -> None:
        """Stop whatever is still running; idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def validate_signal_reply(
    reply: Mapping[str, Any], symbols: Sequence[str], *, label: str = "the strategy"
) -> dict[str, SignalColumns]:
    """The ``signals`` of a runner's reply: per requested symbol, a dict of lists (its
    columns), all of one length.

    Only that shape is checked here; the fields and every value are validated on the trusted
    side later (:func:`shared.sim.validate_signals`).
    """
    signals = reply.get("signals")
    if (
        not isinstance(signals, dict)
        or sorted(signals) != sorted(symbols)
        or not all(_are_columns(columns) for columns in signals.values())
    ):
        raise InvalidOutput(f"{label}: the sandbox returned no signal columns per symbol")
    return signals


def _are_columns(columns: object) -> bool:
    """Whether ``columns`` is a dict of lists of one length (its fields are checked later)."""
    if not isinstance(columns, dict) or not columns:
        return False
    lengths = {len(c) if isinstance(c, list) else -1 for c in columns.values()}
    return len(lengths) == 1 and lengths != {-1}


def validate_strategy_info(
    lookback: object,
    units: object,
    symbols: Sequence[str],
    *,
    label: str = "the strategy",
    vectorized: object = True,
) -> StrategyInfo:
    """Check what a strategy said about itself; raise ``InvalidOutput`` naming the problem.

    ``lookback`` must be a positive int (``get_required_lookback()``); ``units`` a list of
    non-empty lists of symbols in which every one of ``symbols`` appears exactly once and no
    other symbol appears (``work_units(symbols)``).
    """
    if isinstance(lookback, bool) or not isinstance(lookback, int) or lookback < 1:
        raise InvalidOutput(
            f"{label}: get_required_lookback() must return a positive int, got {lookback!r}"
        )
    where = f"{label}: work_units({list(symbols)!r})"
    if not isinstance(units, list) or not all(isinstance(unit, list) for unit in units):
        raise InvalidOutput(f"{where} must return a list of lists of symbols, got {units!r:.200}")
    wanted = set(symbols)
    seen: set[str] = set()
    for unit in units:
        if not unit:
            raise InvalidOutput(f"{where} returned an empty unit; leave empty groups out")
        for symbol in unit:
            if not isinstance(symbol, str) or symbol not in wanted:
                raise InvalidOutput(
                    f"{where} returned {symbol!r}, which is not one of the requested symbols"
                )
            if symbol in seen:
                raise InvalidOutput(f"{where} returned {symbol!r} in more than one place")
            seen.add(symbol)
    missing = [symbol for symbol in symbols if symbol not in seen]
    if missing:
        raise InvalidOutput(
            f"{where} left out {', '.join(missing)}; every symbol must be in exactly one unit"
        )
    return StrategyInfo(
        lookback=lookback, units=[list(unit) for unit in units], vectorized=vectorized is True
    )
