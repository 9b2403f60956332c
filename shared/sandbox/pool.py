"""What both sandboxes share: the port's methods over a pool of warm runners per session.

:class:`PooledSandbox` implements :class:`~shared.sandbox.port.Sandbox` once, whatever a
runner is — a child process (:class:`~shared.sandbox.process.ProcessSandbox`) or a container
(:class:`~shared.sandbox.docker.DockerSandbox`). A subclass supplies how a runner starts
(:meth:`PooledSandbox._start_runner`), how the candles reach it
(:meth:`PooledSandbox._deliver`) and, in its :class:`Runner`, how it is retired; everything
else is here:

- the warm pool: a call with ``session=None`` gets a fresh runner, retired after the call;
  calls of one session reuse the session's idle runners (the most recently used first, so
  the others can expire), never a busy one; a runner idle for ``idle_ttl_s`` is retired, and
  a runner serves only calls with the memory limit it was started with;
- with ``spare``, a runner started ahead (one per memory limit) for the next session's first
  call, so a new backtest does not wait for a runner to start (it has run no code, so any
  session may have it); each one taken starts the next;
- the out-of-memory retry: a call that runs out of memory in a warm runner runs again in a
  new one, since a warm runner may hold memory its earlier calls freed but the allocator
  kept — whether a call fits must not depend on which runner ran it;
- :meth:`~PooledSandbox.stop` (a cancelled backtest) and shutdown: :meth:`~PooledSandbox.aclose`
  retires every runner, idle or busy, and a sandbox left open warns when collected.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import math
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Self, TypeVar

from shared.errors import Cancelled, StrategyOutOfMemory
from shared.sandbox.connection import RunnerConnection
from shared.sandbox.port import (
    DEFAULT_LIMITS,
    SandboxLimits,
    StoppedSessions,
    StrategyInfo,
    validate_signal_reply,
    validate_strategy_info,
)
from shared.strategy.reference import ComponentRef

if TYPE_CHECKING:
    from shared.candles.frame import SymbolCandles
    from shared.strategy.run import SignalColumns

__all__ = ["DEFAULT_IDLE_TTL_S", "Candles", "PooledSandbox", "Runner", "RunnerKey", "empty_dir"]

#: Seconds a session's idle runner is kept for the session's next call. A backtest's calls
#: come in bursts (describe, then its units); 30 s bridges the gaps and, for a backtest that
#: is over, costs one idle Python with pandas loaded (~100 MB) per runner for half a minute.
DEFAULT_IDLE_TTL_S = 30.0

#: The reaper retires a runner this close to its expiry rather than sleep again for it.
_CLOCK_SLACK_S = 0.001
#: Seconds :meth:`PooledSandbox.aclose` waits for the calls in progress to end.
_SETTLE_TIMEOUT_S = 60.0

#: A warm runner serves only calls of its session and memory limit (set at its start).
RunnerKey = tuple[str, int]
#: What :meth:`Sandbox.signals` takes: each symbol's candle frame and its first simulated row.
Candles = Mapping[str, "SymbolCandles"]


class Runner(abc.ABC):
    """One ``runner --serve`` of a sandbox: the connection to it and its place in the pool.

    :param key: the session and memory limit it serves; ``None``: one call only.
    """

    def __init__(self, connection: RunnerConnection, key: RunnerKey | None) -> None:
        self.connection = connection
        self.key = key
        #: ``loop.time()`` when it last went idle.
        self.idle_since = 0.0
        #: Calls it has been given.
        self.calls = 0
        #: Killed by :meth:`PooledSandbox.stop`: its call raises ``Cancelled``.
        self.stopped = False

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """Whether it still runs (it may have died while idle)."""

    @property
    def reusable(self) -> bool:
        """Whether it may serve another call: alive, and its last job left it sound."""
        return self.alive and self.connection.reusable

    async def run(
        self,
        job: Mapping[str, Any],
        *,
        label: str,
        limits: SandboxLimits,
        symbols: Sequence[str],
        payload: bytes,
    ) -> dict[str, Any]:
        """Run one job on it (see :meth:`RunnerConnection.run`)."""
        return await self.connection.run(
            job, label=label, limits=limits, symbols=symbols, payload=payload
        )

    async def reset(self) -> None:  # noqa: B027 - a hook: most runners have nothing to reset
        """Before it is parked: undo what the last call left that a new runner would not have."""

    @abc.abstractmethod
    async def retire(self) -> None:
        """Kill it and all it started, and free what it holds; idempotent."""

    def abandon(self) -> None:  # noqa: B027 - a hook: not every runner can end without a loop
        """End it without an event loop, if that is possible (the sandbox was never closed)."""


R = TypeVar("R", bound=Runner)


class PooledSandbox(abc.ABC, Generic[R]):
    """:class:`~shared.sandbox.port.Sandbox` over a pool of runners; see the module docstring.

    :param idle_ttl_s: how long a session's idle runner is kept for the session's next call
        (see :data:`DEFAULT_IDLE_TTL_S`).
    :param spare: keep a runner started ahead for the next new session (a service: one idle
        runner more; not for a single run, which would start one it never uses).
    """

    #: Whether the runner watches its memory cgroup's OOM kills (it is alone in one).
    _WATCH_OOM: ClassVar[bool] = False
    #: Appended to the warning about a sandbox left open.
    _UNCLOSED_NOTE: ClassVar[str] = ""

    def __init__(self, *, idle_ttl_s: float = DEFAULT_IDLE_TTL_S, spare: bool = False) -> None:
        if not idle_ttl_s > 0:
            raise ValueError(f"{type(self).__name__} idle_ttl_s must be > 0, got {idle_ttl_s!r}")
        self._idle_ttl_s = idle_ttl_s
        self._state: Literal["unopened", "opened", "closed"] = "unopened"
        self._opening = asyncio.Lock()
        self._runners: set[R] = set()  # every live runner, idle or busy
        self._idle: dict[RunnerKey, list[R]] = {}
        self._calls = 0  # calls in progress
        self._settled = asyncio.Event()  # set while no call is in progress
        self._settled.set()
        self._stopped = StoppedSessions()
        self._reaper: asyncio.Task[None] | None = None
        self._spare = spare
        #: The runner starting or started ahead, by memory limit (``spare``).
        self._spares: dict[int, asyncio.Task[R]] = {}

    # -- what a subclass supplies ---------------------------------------------------------

    @abc.abstractmethod
    async def _start_runner(self, key: RunnerKey | None, limits: SandboxLimits) -> R:
        """Start a runner for ``key`` under ``limits``; clean up after itself if it fails."""

    @abc.abstractmethod
    async def _deliver(
        self, runner: R, job: dict[str, Any], candles: Candles
    ) -> tuple[dict[str, Any], bytes]:
        """Make ``candles`` reach ``runner``: the job saying where they are, and the bytes
        to send after the job line (``b""`` when they travel some other way)."""

    async def _setup(self) -> None:
        """On first use: acquire what the sandbox needs before its first runner."""

    async def _teardown(self) -> None:
        """At the end of :meth:`aclose`, once no call is in progress: release it again."""

    def _memory_key(self, limits: SandboxLimits) -> int:
        """The memory limit a runner started for ``limits`` really has."""
        return limits.memory_bytes

    def _repr_fields(self) -> str:
        return ""

    # -- lifecycle ------------------------------------------------------------------------

    def __repr__(self) -> str:
        idle = sum(map(len, self._idle.values()))
        return (
            f"<{type(self).__name__} {self._repr_fields()}state={self._state} "
            f"runners={len(self._runners)} idle={idle}>"
        )

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Refuse new calls and retire every runner: the idle ones, and those still running a
        call (the call raises ``RuntimeError``); return once they are gone. Idempotent."""
        self._state = "closed"
        self._take_idle()  # all of them, so the reaper does not retire them too
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
        spares, self._spares = list(self._spares.values()), {}
        for spare in asyncio.as_completed(spares):  # not cancelled: a child may be forked
            with contextlib.suppress(Exception):
                await self._retire(await spare)
        await asyncio.gather(
            *(self._retire(runner) for runner in list(self._runners)),
            *([reaper] if reaper is not None else []),
            return_exceptions=True,
        )
        # Calls still starting a runner retire it as soon as it runs; wait for them.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_SETTLE_TIMEOUT_S):
                await self._settled.wait()
        await self._teardown()

    async def stop(self, session: str) -> None:
        """See :meth:`shared.sandbox.port.Sandbox.stop`."""
        self._stopped.add(session)
        idle = self._take_idle(session=session)
        busy = [r for r in self._runners if r.key and r.key[0] == session and r not in idle]
        for runner in busy:
            runner.stopped = True
        # A busy runner's call fails as it dies, then retires it again: that is fine.
        await asyncio.gather(
            *(self._retire(runner) for runner in [*idle, *busy]), return_exceptions=True
        )

    def __del__(self) -> None:
        # The loop may be gone: nothing asynchronous.
        for runner in getattr(self, "_runners", ()):
            runner.abandon()
        if getattr(self, "_state", None) == "opened":
            name = type(self).__name__
            warnings.warn(
                f"{self!r} was never closed; use 'async with {name}()' or aclose()"
                f"{self._UNCLOSED_NOTE}",
                ResourceWarning,
                stacklevel=2,
            )

    async def _open(self) -> None:
        """Refuse if closed; on first use, set up."""
        self._refuse_if_closed()
        if self._state == "opened":
            return
        async with self._opening:
            if self._state == "unopened":
                await self._setup()
                self._refuse_if_closed()  # closed meanwhile
                self._state = "opened"

    def _refuse_if_closed(self) -> None:
        if self._state == "closed":
            raise RuntimeError(f"this {type(self).__name__} is closed; create a new one")

    # -- the port -------------------------------------------------------------------------

    async def describe(
        self,
        code: ComponentRef,
        symbols: list[str],
        *,
        limits: SandboxLimits = DEFAULT_LIMITS,
        session: str | None = None,
    ) -> StrategyInfo:
        """See :meth:`shared.sandbox.port.Sandbox.describe`."""
        reply = await self._call(
            "describe", {"symbols": list(symbols)}, code, limits, symbols=symbols, session=session
        )
        return validate_strategy_info(
            reply.get("lookback"),
            reply.get("units"),
            symbols,
            label=code.label,
            vectorized=reply.get("vectorized", True),
        )

    async def signals(
        self,
        code: ComponentRef,
        candles: Candles,
        *,
        interval: str,
        limits: SandboxLimits = DEFAULT_LIMITS,
        session: str | None = None,
    ) -> dict[str, SignalColumns]:
        """See :meth:`shared.sandbox.port.Sandbox.signals`."""
        if not candles:
            await self._open()
            return {}
        symbols = list(candles)
        reply = await self._call(
            "signals",
            {"interval": interval},
            code,
            limits,
            symbols=symbols,
            session=session,
            candles=candles,
        )
        return validate_signal_reply(reply, symbols, label=code.label)

    # -- one call -------------------------------------------------------------------------

    async def _call(
        self,
        op: str,
        fields: dict[str, Any],
        code: ComponentRef,
        limits: SandboxLimits,
        *,
        symbols: list[str],
        session: str | None,
        candles: Candles | None = None,
    ) -> dict[str, Any]:
        await self._open()
        if session is not None and session in self._stopped:
            raise self._stopped.error(session, code.label)
        job = {"op": op, "strategy": code.to_json(), **fields}
        if self._WATCH_OOM:
            job["watch_oom"] = True
        self._calls += 1
        self._settled.clear()
        try:
            key = None if session is None else (session, self._memory_key(limits))
            runner = await self._acquire(key, limits)
            warm = runner.calls > 0
            try:
                return await self._run(runner, job, code, limits, symbols, candles)
            except StrategyOutOfMemory:
                # A warm runner keeps memory its earlier calls freed but the allocator did
                # not return, so a call can fit in a new runner and not in it. A new runner
                # decides: whether a call runs out of memory must not depend on its runner.
                if not warm:
                    raise
            fresh = await self._start(key, limits)
            return await self._run(fresh, job, code, limits, symbols, candles)
        finally:
            self._calls -= 1
            if not self._calls:
                self._settled.set()

    async def _run(
        self,
        runner: R,
        job: dict[str, Any],
        code: ComponentRef,
        limits: SandboxLimits,
        symbols: list[str],
        candles: Candles | None,
    ) -> dict[str, Any]:
        """One call on ``runner``; then park or retire it."""
        runner.calls += 1
        try:
            self._refuse_if_closed()  # closed while the runner started
            payload = b""
            if candles is not None:  # a new runner imports pandas meanwhile
                job, payload = await self._deliver(runner, job, candles)
            if runner.key is not None and runner.key[0] in self._stopped:
                runner.stopped = True  # stopped while this runner started
                raise self._stopped.error(runner.key[0], code.label)
            return await runner.run(
                job, label=code.label, limits=limits, symbols=symbols, payload=payload
            )
        except Exception as exc:
            if self._state == "closed":
                raise RuntimeError(f"the sandbox was closed while {code.label} ran") from None
            if runner.stopped and runner.key is not None and not isinstance(exc, Cancelled):
                raise self._stopped.error(runner.key[0], code.label) from None
            raise
        finally:
            await asyncio.shield(self._release(runner))

    # -- the pool -------------------------------------------------------------------------

    async def _acquire(self, key: RunnerKey | None, limits: SandboxLimits) -> R:
        """An idle runner of the session, the most recently used (so the others can expire);
        a new one when there is none."""
        while key is not None and (pool := self._idle.get(key)):
            runner = pool.pop()
            if not pool:
                del self._idle[key]
            if runner.alive:
                return runner
            await self._retire(runner)  # it died while idle
        if key is not None and self._spare:
            return await self._take_spare(key, limits)
        return await self._start(key, limits)

    async def _take_spare(self, key: RunnerKey, limits: SandboxLimits) -> R:
        """The runner started ahead for ``key``'s memory limit (once it has started), now
        ``key``'s, and the next one started ahead; a new runner if there was none or it
        failed."""
        ahead = self._spares.pop(key[1], None)
        if self._state == "opened":  # not closing: aclose retires the runners started ahead
            name = f"{type(self).__name__} spare"
            self._spares[key[1]] = asyncio.create_task(self._start(None, limits), name=name)
        if ahead is not None:
            with contextlib.suppress(Exception):  # it failed to start: start one now
                runner = await ahead
                if runner.alive:
                    runner.key = key
                    return runner
                await self._retire(runner)
        return await self._start(key, limits)

    async def _start(self, key: RunnerKey | None, limits: SandboxLimits) -> R:
        await self._open()
        runner = await self._start_runner(key, limits)
        self._runners.add(runner)
        return runner

    async def _release(self, runner: R) -> None:
        """After a call: park the runner for its session if it may serve again, else retire
        it."""
        if (
            runner.key is not None
            and runner.reusable
            and not runner.stopped
            and self._state == "opened"
        ):
            await runner.reset()
            if self._state == "opened":  # not closed meanwhile
                self._park(runner)
                return
        await self._retire(runner)

    def _park(self, runner: R) -> None:
        assert runner.key is not None
        runner.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(runner.key, []).append(runner)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name=f"{type(self).__name__} reaper")

    def _take_idle(self, idle_since: float = math.inf, *, session: str | None = None) -> list[R]:
        """Remove from their pools the runners idle since before ``idle_since`` (by default
        all), of ``session`` only if given; return them."""
        taken = []
        for key, pool in list(self._idle.items()):
            if session is not None and key[0] != session:
                continue
            taken += [runner for runner in pool if runner.idle_since < idle_since]
            pool[:] = [runner for runner in pool if runner.idle_since >= idle_since]
            if not pool:
                del self._idle[key]
        return taken

    async def _reap(self) -> None:
        """Retire runners idle for ``idle_ttl_s``: sleep until the next one is due; stop when
        none is idle.

        Cancelled — by :meth:`aclose`, or by ``asyncio.run`` as its loop ends — it retires
        every idle runner, so none outlives the loop that started it, closed sandbox or not.
        """
        loop = asyncio.get_running_loop()
        ttl = self._idle_ttl_s
        try:
            while self._idle:
                due = min(runner.idle_since for pool in self._idle.values() for runner in pool)
                if due + ttl > loop.time():
                    await asyncio.sleep(due + ttl - loop.time())
                    continue
                expired = self._take_idle(idle_since=loop.time() - ttl + _CLOCK_SLACK_S)
                await asyncio.gather(*(self._retire(runner) for runner in expired))
        except asyncio.CancelledError:
            await asyncio.gather(*(self._retire(runner) for runner in self._take_idle()))
            raise

    async def _retire(self, runner: R) -> None:
        try:
            await runner.retire()
        finally:
            self._runners.discard(runner)


def empty_dir(path: str) -> None:
    """Remove everything in ``path`` — the call's candles, whatever the strategy wrote — so
    the next call starts in an empty directory, as a new runner's would be (a
    :meth:`Runner.reset`). ``path`` itself stays: a child's working directory, a container's
    mounted candle directory."""
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
