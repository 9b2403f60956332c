"""The worker's candle chunk cache: least recently used out first, never over its bound."""

from __future__ import annotations

import numpy as np
import pytest

from shared.mongo import ChunkCache
from shared.mongo.chunks import Columns


def chunk(bars: int) -> Columns:
    return {"open_time": np.arange(bars, dtype=np.int64), "close": np.ones(bars)}  # 16 B a bar


def test_the_least_recently_used_chunk_goes_first() -> None:
    cache = ChunkCache(3 * 16 * 100)
    for name in "abc":
        cache.put(name, chunk(100))
    assert cache.get("a") is not None  # now b is the least recently used
    cache.put("d", chunk(100))
    assert cache.get("b") is None
    assert all(cache.get(name) is not None for name in "acd")
    assert (len(cache), cache.bytes) == (3, 3 * 1600)
    assert (cache.hits, cache.misses) == (4, 1)


def test_the_bound_holds_and_a_chunk_larger_than_it_is_not_kept() -> None:
    cache = ChunkCache(1000)
    for i in range(20):
        cache.put(str(i), chunk(i * 7))
        assert cache.bytes <= 1000
    cache.put("huge", chunk(100))
    assert cache.get("huge") is None
    nothing = ChunkCache(0)
    nothing.put("a", chunk(1))
    assert len(nothing) == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        ChunkCache(-1)
