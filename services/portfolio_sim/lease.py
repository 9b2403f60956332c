"""The replay's lease while it runs: renewed in the background, checked before each write.

A portfolio_sim that claimed a backtest's replay (:meth:`shared.store.Store.claim`) must keep
the lease alive, or a redelivered batch takes the replay over. If it stalls past the lease (a
loaded host, a store outage) and someone does take over, it must stop writing: it learns so at
its next renewal, and :meth:`HeldLease.check` (before each WAL append) and
:meth:`HeldLease.confirm` (before the result is stored) raise :class:`LeaseLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self

import structlog

from shared.store import Store

log = structlog.get_logger(__name__)


class LeaseLost(Exception):
    """This replay no longer holds its lease: it must stop without storing anything more."""


class HeldLease:
    """A lease ``owner`` holds on ``backtest_id``'s replay, renewed every third of
    ``store.lease_s`` while the ``async with`` block runs."""

    def __init__(self, store: Store, backtest_id: str, owner: str) -> None:
        self._store = store
        self._backtest_id = backtest_id
        self._owner = owner
        self._lost: str | None = None
        self._renewing: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._renewing = asyncio.create_task(self._renew(), name=f"lease {self._backtest_id}")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing

    def check(self) -> None:
        """Raise :class:`LeaseLost` if a renewal found the lease gone (or failed)."""
        if self._lost is not None:
            raise LeaseLost(self._lost)

    async def confirm(self) -> None:
        """Renew now; :class:`LeaseLost` unless the lease is still ours."""
        self.check()
        lease = await self._store.claim(self._backtest_id, self._owner)
        if lease.owner != self._owner:
            self._lost = f"{lease.owner} took the replay of {self._backtest_id} over"
            raise LeaseLost(self._lost)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._store.lease_s / 3)
            try:
                await self.confirm()
            except LeaseLost:
                return
            except Exception as exc:  # the store is unreachable: we cannot know it is ours
                self._lost = f"renewing the lease failed: {exc}"
                log.warning("replay lease not renewed", error=str(exc))
                return
