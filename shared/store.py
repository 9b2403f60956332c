"""The state store port (sources, plans, batches, WAL, results) and its local-file version.

On the real stack this is MongoDB's primary; ``stratorch run`` keeps the same records as
files under one directory, so a finished run leaves its plan, WAL and result behind for audit.
Every write is idempotent: a redelivered message changes nothing twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from shared.errors import RequestRejected
from shared.messages import BacktestResult, ComponentSpec, ProposalBatch, Status


class Store(Protocol):
    async def put_source(self, sha256: str, code: str) -> None: ...
    async def get_source(self, sha256: str) -> str | None: ...
    async def put_plan(self, backtest_id: str, plan: dict[str, Any]) -> None: ...
    async def get_plan(self, backtest_id: str) -> dict[str, Any] | None: ...

    async def add_batch(self, batch: ProposalBatch) -> int:
        """Store a unit's batch once; return how many distinct units of the backtest are in."""
        ...

    async def batches(self, backtest_id: str) -> list[ProposalBatch]: ...

    async def units_done(self, backtest_id: str) -> int:
        """How many distinct units of the backtest have a stored batch (for progress)."""
        ...

    async def claim(self, backtest_id: str) -> bool:
        """True for exactly one caller per backtest: the one that runs the replay."""
        ...

    async def put_wal(self, backtest_id: str, records: Sequence[dict[str, Any]]) -> None: ...

    async def finish(self, result: BacktestResult) -> BacktestResult:
        """Store ``result`` as the backtest's outcome unless it has one; return the outcome.

        A backtest ends once: the first outcome stored wins (a replay finishing, a
        cancellation, a deadline, a failed unit all race to end it), and a later call gets
        that first outcome back, to publish again (a redelivered message must not lose it).
        """
        ...

    async def ended(self, backtest_id: str) -> Status | None:
        """The status of the backtest's outcome, ``None`` while it has none: one lookup by
        id, cheap enough to ask before every unit (is it cancelled?)."""
        ...

    async def get_cached(self, key: str) -> BacktestResult | None:
        """The completed result stored under a request's cache key, if any."""
        ...

    async def put_cached(self, key: str, result: BacktestResult) -> None: ...
    async def get_result(self, backtest_id: str) -> BacktestResult | None: ...
    async def aclose(self) -> None: ...


class FileStore:
    """:class:`Store` as files under ``root``: ``sources/``, ``backtests/<id>/...``.

    Claims use ``O_CREAT | O_EXCL``, atomic even across processes sharing the directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sources").mkdir(parents=True, exist_ok=True)
        (root / "backtests").mkdir(parents=True, exist_ok=True)

    def _dir(self, backtest_id: str) -> Path:
        path = self.root / "backtests" / backtest_id
        path.mkdir(exist_ok=True)
        return path

    async def put_source(self, sha256: str, code: str) -> None:
        await asyncio.to_thread(_write, self.root / "sources" / f"{sha256}.py", code.encode())

    async def get_source(self, sha256: str) -> str | None:
        path = self.root / "sources" / f"{sha256}.py"
        return path.read_text() if path.exists() else None

    async def put_plan(self, backtest_id: str, plan: dict[str, Any]) -> None:
        await asyncio.to_thread(
            _write, self._dir(backtest_id) / "plan.json", json.dumps(plan).encode()
        )

    async def get_plan(self, backtest_id: str) -> dict[str, Any] | None:
        path = self._dir(backtest_id) / "plan.json"
        return json.loads(path.read_bytes()) if path.exists() else None

    async def add_batch(self, batch: ProposalBatch) -> int:
        folder = self._dir(batch.backtest_id) / "batches"
        folder.mkdir(exist_ok=True)
        body = batch.model_dump_json().encode()
        await asyncio.to_thread(_write, folder / f"{batch.unit_id}.json", body)
        return await self.units_done(batch.backtest_id)

    async def batches(self, backtest_id: str) -> list[ProposalBatch]:
        folder = self._dir(backtest_id) / "batches"

        def read() -> list[ProposalBatch]:
            return [
                ProposalBatch.model_validate_json(p.read_bytes())
                for p in sorted(folder.glob("*.json"))
            ]

        return await asyncio.to_thread(read)

    async def units_done(self, backtest_id: str) -> int:
        return len(list((self._dir(backtest_id) / "batches").glob("*.json")))

    async def claim(self, backtest_id: str) -> bool:
        try:
            os.close(os.open(self._dir(backtest_id) / "claimed", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True

    async def put_wal(self, backtest_id: str, records: Sequence[dict[str, Any]]) -> None:
        body = "".join(json.dumps(r) + "\n" for r in records).encode()
        await asyncio.to_thread(_write, self._dir(backtest_id) / "wal.jsonl", body)

    async def finish(self, result: BacktestResult) -> BacktestResult:
        path = self._dir(result.backtest_id) / "result.json"
        body = result.model_dump_json().encode()
        if await asyncio.to_thread(_write_first, path, body):
            return result
        return BacktestResult.model_validate_json(path.read_bytes())

    async def get_result(self, backtest_id: str) -> BacktestResult | None:
        path = self._dir(backtest_id) / "result.json"
        return BacktestResult.model_validate_json(path.read_bytes()) if path.exists() else None

    async def ended(self, backtest_id: str) -> Status | None:
        result = await self.get_result(backtest_id)
        return None if result is None else result.status

    async def get_cached(self, key: str) -> BacktestResult | None:
        path = self.root / "cache" / f"{key}.json"
        return BacktestResult.model_validate_json(path.read_bytes()) if path.exists() else None

    async def put_cached(self, key: str, result: BacktestResult) -> None:
        (self.root / "cache").mkdir(exist_ok=True)
        body = result.model_dump_json().encode()
        await asyncio.to_thread(_write, self.root / "cache" / f"{key}.json", body)

    async def aclose(self) -> None:
        pass


def _write(path: Path, body: bytes) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(body)
    os.replace(tmp, path)


def _write_first(path: Path, body: bytes) -> bool:
    """Write atomically unless ``path`` exists (even across processes); False if it did."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(body)
    try:
        os.link(tmp, path)  # fails if path exists: atomic first-writer-wins
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


async def store_uploaded_source(spec: ComponentSpec, store: Store) -> ComponentSpec:
    """Store uploaded code content-addressed and return the spec that names it by sha256.

    Whichever service first sees a request (gateway, or the scheduler for requests published
    directly) calls this; storing the same code twice is a no-op.
    """
    if spec.source is not None:
        sha = hashlib.sha256(spec.source.encode()).hexdigest()
        await store.put_source(sha, spec.source)
        return spec.model_copy(update={"source": None, "source_sha256": sha})
    if spec.source_sha256 is not None and await store.get_source(spec.source_sha256) is None:
        raise RequestRejected(
            f"strategy.source_sha256: no uploaded source has sha256 {spec.source_sha256};"
            " send the code once as 'source'"
        )
    return spec
