"""The cache keys: what a backtest's result, and what a strategy says of itself, depend on,
hashed.

Two requests share a result key (:func:`cache_key`) when they would give the same result: the
same request fields except those that cannot change it (``id``, ``parallel_symbols``,
``unit_timeout_s``, ``deadline_s``), the same strategy code (by sha256, however it was sent),
the same candles (each symbol's data fingerprint, warm-up included) and the same engine
version.

What ``describe`` answers (the lookback and the work units) depends on less: the strategy's
code and params and the symbols (:func:`describe_key`). So a request planned before, even over
other dates, plans again without starting a sandbox.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version

from shared.messages import SCHEMA_VERSION, BacktestRequest, ComponentSpec

_IGNORED = {"id", "parallel_symbols", "unit_timeout_s", "deadline_s", "strategy"}


def _engine_version() -> str:
    try:
        return f"{version('stratorch')}/{SCHEMA_VERSION}"
    except PackageNotFoundError:  # running from a source tree without installing
        return f"source/{SCHEMA_VERSION}"


ENGINE_VERSION = _engine_version()


def _sha256(canonical: object) -> str:
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _spec(strategy: ComponentSpec) -> object:
    return strategy.model_dump(mode="json", by_alias=True, exclude_none=True)


def describe_key(strategy: ComponentSpec, symbols: Sequence[str]) -> str:
    """sha256 of what :meth:`shared.sandbox.port.Sandbox.describe` answers from: the code (by
    sha256), its params and the symbols, in order (``work_units`` sees them so).

    :param strategy: the request's strategy with uploaded code replaced by its sha256.
    """
    return _sha256({"engine": ENGINE_VERSION, "strategy": _spec(strategy), "symbols": [*symbols]})


def cache_key(
    request: BacktestRequest, strategy: ComponentSpec, lookback: int, data: Mapping[str, str]
) -> str:
    """sha256 of the canonical JSON of everything the result depends on.

    :param strategy: the request's strategy with uploaded code replaced by its sha256.
    :param data: symbol → :meth:`shared.ports.CandleSource.fingerprint` of its bars.
    """
    return _sha256(
        {
            "engine": ENGINE_VERSION,
            "request": request.model_dump(mode="json", exclude=_IGNORED),
            "strategy": _spec(strategy),
            "lookback": lookback,
            "data": dict(sorted(data.items())),
        }
    )
