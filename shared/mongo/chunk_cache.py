"""A worker's cache of decoded candle chunks, keyed by their content hash.

Repeated backtests and sweeps over the same candles then read only the series' manifest from
MongoDB: the manifest names each chunk's hash, and a chunk with that hash has those bars,
whoever wrote it and whenever. So an entry never goes stale and needs no invalidation; a
re-ingested period simply has another hash, and its old chunk ages out.

It lives in the worker's memory, not on disk: a decoded chunk is numpy arrays a load
concatenates straight away, with nothing to parse or decompress, and a worker's candles are
what it backtests again and again while it lives. A disk cache would survive restarts but cost
a read and a decode per hit; a restarted worker fills this one again from its first loads.
"""

from __future__ import annotations

from collections import OrderedDict

from shared.mongo.chunks import Columns

__all__ = ["ChunkCache"]


class ChunkCache:
    """The least recently used chunks, at most ``max_bytes`` of their arrays.

    One per process, shared by every load of its candle source (asyncio, one thread: no
    lock). A chunk larger than the whole cache is not kept.

    :param max_bytes: the bound on the arrays kept; ``0`` keeps nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._chunks: OrderedDict[str, Columns] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"ChunkCache({len(self._chunks)} chunks, {self.bytes:,} of {self.max_bytes:,} bytes,"
            f" {self.hits} hits, {self.misses} misses)"
        )

    def __len__(self) -> int:
        return len(self._chunks)

    def get(self, digest: str) -> Columns | None:
        """The chunk with content hash ``digest``, if kept (then it is the most recent)."""
        columns = self._chunks.get(digest)
        if columns is None:
            self.misses += 1
            return None
        self.hits += 1
        self._chunks.move_to_end(digest)
        return columns

    def put(self, digest: str, columns: Columns) -> None:
        """Keep ``columns`` (read-only arrays) as ``digest``'s, dropping the least recently
        used chunks beyond the bound."""
        size = _size(columns)
        if digest in self._chunks or size > self.max_bytes:
            return
        self._chunks[digest] = columns
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._chunks.popitem(last=False)
            self.bytes -= _size(dropped)


def _size(columns: Columns) -> int:
    return sum(values.nbytes for values in columns.values())
