"""The result cache key: what a backtest's result depends on, hashed.

Two requests share a key when they would give the same result: the same request fields
except those that cannot change it (``id``, ``parallel_symbols``, ``unit_timeout_s``,
``deadline_s``), the same strategy code (by sha256, however it was sent), the same candles
(each symbol's data fingerprint, warm-up included) and the same engine version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version

from shared.messages import SCHEMA_VERSION, BacktestRequest, ComponentSpec

_IGNORED = {"id", "parallel_symbols", "unit_timeout_s", "deadline_s", "strategy"}


def _engine_version() -> str:
    try:
        return f"{version('stratorch')}/{SCHEMA_VERSION}"
    except PackageNotFoundError:  # running from a source tree without installing
        return f"source/{SCHEMA_VERSION}"


ENGINE_VERSION = _engine_version()


def cache_key(
    request: BacktestRequest, strategy: ComponentSpec, lookback: int, data: Mapping[str, str]
) -> str:
    """sha256 of the canonical JSON of everything the result depends on.

    :param strategy: the request's strategy with uploaded code replaced by its sha256.
    :param data: symbol → :meth:`shared.ports.CandleSource.fingerprint` of its bars.
    """
    canonical = {
        "engine": ENGINE_VERSION,
        "request": request.model_dump(mode="json", exclude=_IGNORED),
        "strategy": strategy.model_dump(mode="json", by_alias=True, exclude_none=True),
        "lookback": lookback,
        "data": dict(sorted(data.items())),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
