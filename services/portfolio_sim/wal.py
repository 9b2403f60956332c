"""The replay's write-ahead log: records made durable in order while the replay runs.

:class:`WalWriter` is the ``log`` callback of :func:`shared.sim.replay`, called in the replay's
thread. Every :data:`WAL_BATCH` records it appends them on the event loop and waits until they
are stored before the replay goes on, so the stored log is always a prefix of the replay and is
complete before the result is stored.

A replay that takes over from a crashed owner finds that owner's records stored. The replay is
deterministic, so it regenerates them: each is checked against the stored one (a difference
means the batches or the engine changed under the backtest, and the replay stops with
:class:`WalMismatch` rather than mix two histories), and only the records after them are
appended. The result is the same, bit for bit, as a run that was never interrupted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shared.messages import WalRecord
from shared.store import Store

#: Records per append: a few round trips per 10k events, and a crash loses at most this many
#: (a takeover writes them again).
WAL_BATCH = 5_000


class WalMismatch(RuntimeError):
    """A stored WAL record differs from the one the replay makes."""


class ReplayStopped(Exception):
    """The handler running the replay was cancelled (shutdown): the replay thread stops."""


class WalWriter:
    """The replay's ``log``: checks the records stored already, appends the others in batches.

    :param stored: the backtest's stored records (:meth:`Store.get_wal`).
    :param check: called before each append; raises to stop the replay (a lost lease).
    :param loop: the event loop the store is used on (the replay runs in another thread).
    """

    def __init__(
        self,
        store: Store,
        backtest_id: str,
        stored: list[WalRecord],
        *,
        check: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._store = store
        self._backtest_id = backtest_id
        self._stored = {record["seq"]: record for record in stored}
        self._check = check
        self._loop = loop
        self._pending: list[WalRecord] = []
        self._stopped = False
        #: Records found stored (and equal); records appended by this writer.
        self.verified = 0
        self.appended = 0

    def __call__(self, record: WalRecord) -> None:
        if self._stopped:
            raise ReplayStopped(f"the replay of {self._backtest_id} was cancelled")
        stored = self._stored.get(record["seq"])
        if stored is not None:
            if stored != record:
                raise WalMismatch(
                    f"backtest {self._backtest_id}: WAL record {record['seq']} is stored as "
                    f"{stored} but the replay makes {record}: its batches or the engine changed "
                    f"since that record was written, so the replay cannot continue it. Delete "
                    f"the backtest's WAL records (collection 'wal') to replay it from the start"
                )
            self.verified += 1
            return
        self._pending.append(record)
        if len(self._pending) >= WAL_BATCH:
            asyncio.run_coroutine_threadsafe(self.flush(), self._loop).result()

    async def flush(self) -> None:
        """Append the records not stored yet."""
        records, self._pending = self._pending, []
        if records:
            self._check()
            await self._store.put_wal(self._backtest_id, records)
            self.appended += len(records)

    async def close(self) -> None:
        """Once the replay is done: append the last records; the stored log must hold no
        record the replay did not make."""
        await self.flush()
        if self.verified != len(self._stored):
            extra = sorted(set(self._stored) - set(range(self.verified + self.appended)))
            raise WalMismatch(
                f"backtest {self._backtest_id}: the stored WAL goes on past the end of the "
                f"replay (records from seq {extra[0]} on, {len(extra)} in all): its batches or "
                f"the engine changed since they were written. Delete the backtest's WAL "
                f"records (collection 'wal') to replay it from the start"
            )

    def stop(self) -> None:
        """Make the replay thread stop at its next record."""
        self._stopped = True
