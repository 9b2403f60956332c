"""The state store port (sources, plans, batches, WAL, results) and its local-file version.

On the real stack this is MongoDB's primary; ``stratorch run`` keeps the same records as
files under one directory, so a finished run leaves its plan, WAL and result behind for audit.
Every write is idempotent: a redelivered message changes nothing twice.

**The replay's lease.** A backtest's replay is run by whoever holds its lease
(:meth:`Store.claim`): an owner and an expiry, renewed while the replay runs. A holder that
dies stops renewing, so a redelivered batch takes over once the lease lapses, instead of finding
a claim that nobody will ever finish. A holder that has lost its lease (it stalled past the
expiry and someone took over) learns it at its next renewal and stops.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

from shared.errors import FieldError, IdTaken, OverQuota, RequestRejected
from shared.messages import (
    BacktestRequest,
    BacktestResult,
    ComponentSpec,
    Plan,
    ProposalBatch,
    Status,
    WalRecord,
    is_backtest_id,
)
from shared.sandbox.port import StrategyInfo
from shared.strategy.reference import ComponentRef
from shared.sweep.expand import SweepPlan, backtest_count
from shared.tenancy import ANONYMOUS, STALE_AFTER_S, Admission, Quota

#: How long a claim on a replay lasts unless renewed (``STRATORCH_CLAIM_LEASE_S``): long
#: enough that a loaded machine renews in time, short enough that a crashed replay is taken
#: over soon.
DEFAULT_LEASE_S = 30.0


@dataclass(frozen=True)
class Lease:
    """Who runs a backtest's replay, and until when unless they renew it."""

    owner: str
    #: Unix time (``time.time()``) the lease lapses at, on the claimer's clock: the hosts'
    #: clocks must agree to well within the lease (NTP does).
    expires_at: float


@dataclass(frozen=True)
class Owner:
    """Who a backtest id belongs to: the request that took it first, and its tenant."""

    #: :meth:`shared.messages.BacktestRequest.fingerprint` of that request.
    fingerprint: str
    tenant: str


def owned_by(owner: Owner | None, tenant: str | None) -> bool:
    """Whether a backtest owned by ``owner`` is ``tenant``'s to see or cancel. One stored
    before owners were recorded has none: it is ``anonymous``'s. An unknown tenant (``None``)
    owns nothing."""
    if tenant is None:
        return False
    return owner.tenant == tenant if owner is not None else tenant == ANONYMOUS


class Store(Protocol):
    #: Seconds a :meth:`claim` lasts unless renewed.
    lease_s: float

    async def put_source(self, sha256: str, code: str, *, tenant: str) -> None:
        """Store code by its sha256 (once) and let ``tenant`` use it."""
        ...

    async def has_source(self, sha256: str, *, tenant: str) -> bool:
        """Whether ``tenant`` uploaded the code with this sha256 (whoever else did)."""
        ...

    async def get_source(self, sha256: str) -> str | None:
        """The code, for whoever runs it (a request's ``tenant`` was checked on the way in)."""
        ...

    async def accept(self, backtest_id: str, fingerprint: str, *, tenant: str) -> Owner | None:
        """Give ``backtest_id`` to ``tenant``'s request with ``fingerprint`` unless it has an
        owner.

        Returns ``None`` when the id is now this request's, else the :class:`Owner` that had
        it already (first write wins, across processes).

        Written before a request is published (gateway) or planned (scheduler), so every
        gateway replica knows the backtest (and whose it is) at once, and two different
        requests with one id can never both run under it.
        """
        ...

    async def get_accepted(self, backtest_id: str) -> Owner | None:
        """Who owns ``backtest_id``, if anyone."""
        ...

    async def withdraw(self, backtest_id: str) -> None:
        """Free an id :meth:`accept` just gave to a request that was then refused (its
        tenant's quota was full), so the id is not ``queued`` forever."""
        ...

    async def admit(self, tenant: str, backtest_id: str, units: int, quota: Quota) -> Admission:
        """Count the backtest against ``tenant``'s ``quota`` until :meth:`release`.
        Idempotent: admitting a counted backtest again changes nothing, and so does a refusal.

        When the quota is full, backtests counted for longer than
        :data:`~shared.tenancy.STALE_AFTER_S`, or that have a result, are released first
        (their end was never observed), so a quota cannot stay full forever.
        """
        ...

    async def release(self, backtest_id: str) -> None:
        """Stop counting the backtest against its tenant's quota (idempotent)."""
        ...

    async def put_plan(self, plan: Plan) -> None:
        """Store the plan of backtest ``plan.request.id`` (replacing one stored before)."""
        ...

    async def get_plan(self, backtest_id: str) -> Plan | None:
        """The plan of a backtest that is running or ended other than ``completed``; a store
        may drop a completed backtest's plan (see :meth:`get_request`)."""
        ...

    async def get_request(self, backtest_id: str) -> BacktestRequest | None:
        """The request a backtest was planned from, also once it completed (its report shows
        it); ``None`` if it was never planned (a cache hit, a rejection)."""
        ...

    async def add_batch(self, batch: ProposalBatch) -> int:
        """Store a unit's batch once; return how many distinct units of the backtest are in."""
        ...

    async def batches(self, backtest_id: str) -> list[ProposalBatch]: ...

    async def units_done(self, backtest_id: str) -> int:
        """How many distinct units of the backtest have a stored batch (for progress)."""
        ...

    async def claim(self, backtest_id: str, owner: str) -> Lease:
        """Take or renew the lease on the backtest's replay; the lease that stands.

        ``owner`` gets it (for :attr:`lease_s` from now) when nobody holds it, when it has
        lapsed, or when ``owner`` holds it already (a renewal). Otherwise the holder's lease
        comes back, and ``owner`` may wait for it to lapse. Of callers racing for a free or
        lapsed lease, exactly one gets it, across processes.
        """
        ...

    async def put_wal(self, backtest_id: str, records: Sequence[WalRecord]) -> None:
        """Append WAL records (each with an integer ``seq``) durably, in order.

        A record whose ``seq`` is stored already is kept as it is (the log is append-only),
        so writing the same records again changes nothing.
        """
        ...

    async def get_wal(self, backtest_id: str) -> list[WalRecord]:
        """The backtest's stored WAL records, by ``seq``."""
        ...

    async def finish(self, result: BacktestResult) -> BacktestResult:
        """Store ``result`` as the backtest's outcome unless it has one; return the outcome.

        A backtest ends once: the first outcome stored wins (a replay finishing, a
        cancellation, a deadline, a failed unit all race to end it), and a later call gets
        that first outcome back, to publish again (a redelivered message must not lose it).
        """
        ...

    async def ended(self, backtest_id: str) -> Status | None:
        """The status of the backtest's outcome, ``None`` while it has none (or, in a store
        that answers from the backtests in flight, until it is released just after): cheap
        enough to ask before every unit (is it cancelled?). ``None`` means "not yet": any
        answer may be stale by the time it is used."""
        ...

    async def get_cached(self, key: str) -> BacktestResult | None:
        """The completed result stored under a request's cache key, if any."""
        ...

    async def put_cached(self, key: str, result: BacktestResult) -> None: ...

    async def get_described(self, key: str) -> StrategyInfo | None:
        """What a sandbox's ``describe`` said of the strategy stored under ``key``
        (:func:`shared.cache.describe_key`), if anything: one lookup by key, so a request
        described before is planned without starting a sandbox."""
        ...

    async def put_described(self, key: str, info: StrategyInfo) -> None:
        """Store ``info`` under ``key`` (the same key always describes the same way)."""
        ...

    async def get_result(self, backtest_id: str) -> BacktestResult | None: ...
    async def aclose(self) -> None: ...

    # -- sweeps (shared.sweep) --

    async def put_sweep(self, plan: SweepPlan) -> None:
        """Keep a sweep's plan under its backtest id (idempotent), before any child runs."""
        ...

    async def get_sweep(self, backtest_id: str) -> SweepPlan | None: ...

    async def sweep_child_done(self, backtest_id: str, child_id: str) -> int:
        """Count ``child_id`` as ended for sweep ``backtest_id`` (once, however often it is
        counted); how many of its children have ended."""
        ...

    async def sweep_children_done(self, backtest_id: str) -> int:
        """How many of sweep ``backtest_id``'s children have ended (its progress)."""
        ...


@dataclass
class _Kept:
    """An ephemeral :class:`FileStore`'s batches (by backtest, by unit) and WAL records (by
    backtest, in ``seq`` order)."""

    batches: dict[str, dict[str, ProposalBatch]] = field(default_factory=dict)
    wal: dict[str, list[WalRecord]] = field(default_factory=dict)


class FileStore:
    """:class:`Store` as files under ``root``: ``sources/``, ``backtests/<id>/...``.

    Claims and WAL appends hold an ``flock`` on their file, and outcomes are linked into
    place, so they stay atomic even across processes sharing the directory.
    A backtest id that is not a valid id (:data:`shared.messages.BACKTEST_ID`) is refused
    with ``ValueError`` before it becomes a path: nothing is ever written outside ``root``.

    :param ephemeral: ``root`` goes with this process (``stratorch run`` without a state
        directory): batches and WAL records are kept in memory only, as no other process
        could ever read them (a million-bar batch is ~25 MB of JSON to write; its ~28,000 WAL
        records cost ~0.1 s of JSON and fsyncs), and results are not cached.
    """

    def __init__(
        self, root: Path, *, lease_s: float = DEFAULT_LEASE_S, ephemeral: bool = False
    ) -> None:
        self.root = root
        self.lease_s = lease_s
        self._quota_lock: asyncio.Lock | None = None
        #: What an ephemeral store keeps instead of writing, until the backtest ends.
        self._kept = _Kept() if ephemeral else None
        #: The batches this store wrote and has not read yet, by file, with the file's
        #: identity then (see :meth:`batches`).
        self._written: dict[Path, tuple[_FileId, ProposalBatch]] = {}
        (root / "sources").mkdir(parents=True, exist_ok=True)
        (root / "backtests").mkdir(parents=True, exist_ok=True)

    def _dir(self, backtest_id: str) -> Path:
        if not is_backtest_id(backtest_id):
            raise ValueError(f"not a backtest id: {backtest_id!r}")
        path = self.root / "backtests" / backtest_id
        path.mkdir(exist_ok=True)
        return path

    async def put_source(self, sha256: str, code: str, *, tenant: str) -> None:
        await asyncio.to_thread(_write, self.root / "sources" / f"{sha256}.py", code.encode())
        upload = self._upload(sha256, tenant)
        upload.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_write, upload, b"")

    async def has_source(self, sha256: str, *, tenant: str) -> bool:
        return self._upload(sha256, tenant).exists()

    def _upload(self, sha256: str, tenant: str) -> Path:
        """The file saying ``tenant`` uploaded that code."""
        return self.root / "sources" / "uploads" / tenant / sha256

    async def get_source(self, sha256: str) -> str | None:
        path = self.root / "sources" / f"{sha256}.py"
        return path.read_text() if path.exists() else None

    async def accept(self, backtest_id: str, fingerprint: str, *, tenant: str) -> Owner | None:
        path = self._dir(backtest_id) / "accepted"
        body = json.dumps({"fingerprint": fingerprint, "tenant": tenant}).encode()
        if await asyncio.to_thread(_write_first, path, body):
            return None
        owner = await self.get_accepted(backtest_id)
        if owner is None:  # withdrawn in between: the id is free again
            return await self.accept(backtest_id, fingerprint, tenant=tenant)
        return owner

    async def get_accepted(self, backtest_id: str) -> Owner | None:
        path = self._dir(backtest_id) / "accepted"
        return Owner(**json.loads(path.read_bytes())) if path.exists() else None

    async def withdraw(self, backtest_id: str) -> None:
        (self._dir(backtest_id) / "accepted").unlink(missing_ok=True)

    async def put_plan(self, plan: Plan) -> None:
        body = plan.model_dump_json(by_alias=True).encode()
        await asyncio.to_thread(_write, self._dir(plan.request.id) / "plan.json", body)

    async def get_plan(self, backtest_id: str) -> Plan | None:
        path = self._dir(backtest_id) / "plan.json"
        return Plan.model_validate_json(path.read_bytes()) if path.exists() else None

    async def get_request(self, backtest_id: str) -> BacktestRequest | None:
        plan = await self.get_plan(backtest_id)  # kept, with the rest, until it expires
        return plan.request if plan else None

    async def add_batch(self, batch: ProposalBatch) -> int:
        folder = self._dir(batch.backtest_id) / "batches"
        if self._kept is not None:
            kept = self._kept.batches.setdefault(batch.backtest_id, {})
            kept[batch.unit_id] = batch
            return len(kept)
        folder.mkdir(exist_ok=True)
        path = folder / f"{batch.unit_id}.json"
        body = batch.model_dump_json().encode()
        self._written[path] = (await asyncio.to_thread(_write, path, body), batch)
        return await self.units_done(batch.backtest_id)

    async def batches(self, backtest_id: str) -> list[ProposalBatch]:
        """Every batch stored for ``backtest_id``. One this store wrote, and that is still the
        file it wrote, is not read back the first time (parsing a million-bar batch again
        costs ~0.1 s); it is forgotten then, so a sweep's batches are not all kept."""
        folder = self._dir(backtest_id) / "batches"
        if self._kept is not None:  # in the order of their files'
            kept = self._kept.batches.get(backtest_id, {})
            return [kept[unit] for unit in sorted(kept, key=lambda unit: f"{unit}.json")]

        def read(path: Path) -> ProposalBatch:
            written = self._written.pop(path, None)
            if written is not None and written[0] == _file_id(path):
                return written[1]
            return ProposalBatch.model_validate_json(path.read_bytes())

        return await asyncio.to_thread(lambda: [read(p) for p in sorted(folder.glob("*.json"))])

    async def units_done(self, backtest_id: str) -> int:
        if self._kept is not None:
            return len(self._kept.batches.get(backtest_id, {}))
        return len(list((self._dir(backtest_id) / "batches").glob("*.json")))

    async def claim(self, backtest_id: str, owner: str) -> Lease:
        path = self._dir(backtest_id) / "claim.json"
        return await asyncio.to_thread(_claim, path, owner, self.lease_s)

    async def put_wal(self, backtest_id: str, records: Sequence[WalRecord]) -> None:
        path = self._dir(backtest_id) / "wal.jsonl"
        if self._kept is not None:
            log = self._kept.wal.setdefault(backtest_id, [])
            log.extend(r for r in records if r["seq"] >= len(log))  # seq numbers the log
            return
        await asyncio.to_thread(_append_wal, path, records)

    async def get_wal(self, backtest_id: str) -> list[WalRecord]:
        if self._kept is not None:
            return list(self._kept.wal.get(backtest_id, []))
        path = self._dir(backtest_id) / "wal.jsonl"
        if not path.exists():
            return []
        body = await asyncio.to_thread(path.read_bytes)
        # A line without its newline is a write torn by a crash: not part of the log.
        return [json.loads(line) for line in body.split(b"\n")[:-1]]

    async def finish(self, result: BacktestResult) -> BacktestResult:
        path = self._dir(result.backtest_id) / "result.json"
        if self._kept is not None:  # ended: its batches and WAL are never read again
            self._kept.batches.pop(result.backtest_id, None)
            self._kept.wal.pop(result.backtest_id, None)
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
        if self._kept is not None:  # no later run could ever find it
            return
        (self.root / "cache").mkdir(exist_ok=True)
        body = result.model_dump_json().encode()
        await asyncio.to_thread(_write, self.root / "cache" / f"{key}.json", body)

    async def get_described(self, key: str) -> StrategyInfo | None:
        path = self.root / "described" / f"{key}.json"
        return described(json.loads(path.read_bytes())) if path.exists() else None

    async def put_described(self, key: str, info: StrategyInfo) -> None:
        (self.root / "described").mkdir(exist_ok=True)
        body = json.dumps(asdict(info)).encode()
        await asyncio.to_thread(_write, self.root / "described" / f"{key}.json", body)

    # Quotas: one JSON file per tenant, changed under a lock. Enough for ``stratorch run``
    # (one process); the services use MongoStore, which is atomic across processes.

    async def admit(self, tenant: str, backtest_id: str, units: int, quota: Quota) -> Admission:
        async with self._lock:
            active = self._active(tenant)
            if backtest_id in active:
                return Admission.ADMITTED
            if _over(quota, active, units):  # heal, then look again
                for other, (_, since) in list(active.items()):
                    ended = (self.root / "backtests" / other / "result.json").exists()
                    if ended or time.time() - since > STALE_AFTER_S:
                        del active[other]
                self._save_active(tenant, active)
                if _over(quota, active, units):
                    return Admission.OVER_QUOTA
            active[backtest_id] = (units, time.time())
            self._save_active(tenant, active)
        return Admission.ADMITTED

    async def release(self, backtest_id: str) -> None:
        owner = await self.get_accepted(backtest_id)
        if owner is None:
            return
        async with self._lock:
            active = self._active(owner.tenant)
            if active.pop(backtest_id, None) is not None:
                self._save_active(owner.tenant, active)

    @property
    def _lock(self) -> asyncio.Lock:
        if self._quota_lock is None:
            self._quota_lock = asyncio.Lock()
        return self._quota_lock

    def _active(self, tenant: str) -> dict[str, tuple[int, float]]:
        path = self.root / "tenants" / f"{tenant}.json"
        if not path.exists():
            return {}
        return {k: (int(u), float(t)) for k, (u, t) in json.loads(path.read_bytes()).items()}

    def _save_active(self, tenant: str, active: dict[str, tuple[int, float]]) -> None:
        (self.root / "tenants").mkdir(exist_ok=True)
        _write(self.root / "tenants" / f"{tenant}.json", json.dumps(active).encode())

    async def aclose(self) -> None:
        pass

    # -- sweeps: the plan as a file, each ended child an empty file in ``sweep-done/`` --

    async def put_sweep(self, plan: SweepPlan) -> None:
        body = plan.model_dump_json().encode()
        await asyncio.to_thread(_write, self._dir(plan.backtest_id) / "sweep.json", body)

    async def get_sweep(self, backtest_id: str) -> SweepPlan | None:
        path = self._dir(backtest_id) / "sweep.json"
        return SweepPlan.model_validate_json(path.read_bytes()) if path.exists() else None

    async def sweep_child_done(self, backtest_id: str, child_id: str) -> int:
        done = self._dir(backtest_id) / "sweep-done"
        done.mkdir(exist_ok=True)
        (done / child_id).touch()
        return await self.sweep_children_done(backtest_id)

    async def sweep_children_done(self, backtest_id: str) -> int:
        done = self._dir(backtest_id) / "sweep-done"
        return sum(1 for _ in done.iterdir()) if done.exists() else 0


def described(stored: dict[str, object]) -> StrategyInfo | None:
    """A stored :class:`StrategyInfo` (its fields as a dict); ``None`` when it was stored with
    other fields (by another version): then the strategy is described again."""
    try:
        return StrategyInfo(**{f.name: stored[f.name] for f in fields(StrategyInfo)})  # type: ignore[arg-type]
    except (KeyError, TypeError):
        return None


def _over(quota: Quota, active: dict[str, tuple[int, float]], more_units: int) -> bool:
    """Whether one more backtest of ``more_units`` would go past ``quota``."""
    if quota.running is not None and len(active) + 1 > quota.running:
        return True
    units = sum(u for u, _ in active.values())
    return quota.units is not None and units + more_units > quota.units


def _write(path: Path, body: bytes) -> _FileId:
    """Write atomically: a reader sees the old file or the new one, never half of one. The
    temporary name is unique per write, not per process: two threads of one process may
    write the same file at once (the last rename wins, whole). Returns the written file's
    identity."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(body)
    written = _file_id(tmp)
    os.replace(tmp, path)
    return written


#: A file's inode, size and modification time: another write (a new file renamed into place)
#: changes it.
_FileId = tuple[int, int, int]


def _file_id(path: Path) -> _FileId:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _claim(path: Path, owner: str, lease_s: float) -> Lease:
    """:meth:`FileStore.claim` under an exclusive ``flock`` of the claim file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with open(fd, "r+b") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        body = file.read()
        now = time.time()
        if body:
            held = Lease(**json.loads(body))
            if held.owner != owner and held.expires_at > now:
                return held
        lease = Lease(owner, now + lease_s)
        file.seek(0)
        file.truncate()
        file.write(json.dumps(asdict(lease)).encode())
        return lease


#: Bytes read back from the end of ``wal.jsonl`` to find its last record: far more than one.
_WAL_TAIL_BYTES = 64 * 1024


def _append_wal(path: Path, records: Sequence[WalRecord]) -> None:
    """Append the records after the last one stored, under an exclusive ``flock``; fsync.

    A torn last line (a crash mid-write) is cut off first, so the log stays whole lines.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with open(fd, "r+b") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - _WAL_TAIL_BYTES))
        tail = file.read()
        whole = tail.rfind(b"\n") + 1  # 0: no whole line in the tail
        last_seq = -1
        if whole:
            last_seq = json.loads(tail[tail.rfind(b"\n", 0, whole - 1) + 1 : whole])["seq"]
        file.truncate(size - len(tail) + whole)
        file.seek(0, os.SEEK_END)
        file.write("".join(json.dumps(r) + "\n" for r in records if r["seq"] > last_seq).encode())
        file.flush()
        os.fsync(file.fileno())


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


async def accept_id(store: Store, backtest_id: str, fingerprint: str, *, tenant: str) -> bool:
    """Make ``backtest_id`` the id of ``tenant``'s request with ``fingerprint``.

    Returns True when the id was free, False when the same request (same tenant, same
    fingerprint) had it already: a retry, a redelivery, or the gateway's accepting it before
    the scheduler sees it.

    :raises IdTaken: a different request has the id (``of_another_tenant``: another
        tenant's).
    """
    owner = await store.accept(backtest_id, fingerprint, tenant=tenant)
    if owner is None:
        return True
    if owner.tenant != tenant:
        raise IdTaken(backtest_id, of_another_tenant=True)
    if owner.fingerprint != fingerprint:
        raise IdTaken(backtest_id)
    return False


async def admit_request(
    store: Store,
    request: BacktestRequest,
    *,
    tenant: str,
    quota: Quota = Quota(),  # noqa: B008 - frozen: no limit
) -> bool:
    """Take the request's id for ``tenant`` (:func:`accept_id`) and count it against
    ``quota``: what the gateway and the scheduler both do before acting on a request.

    Returns True for a new backtest, False for the same request again. A backtest that has
    ended is not counted again. A refused request leaves an id it took free again.

    :raises IdTaken: a different request has the id.
    :raises OverQuota: the tenant has as much in flight as ``quota`` allows.
    """
    fingerprint = request.fingerprint()
    new = await accept_id(store, request.id, fingerprint, tenant=tenant)
    if not new and await store.get_result(request.id) is not None:
        return False  # over: nothing to count
    units = len(request.symbols) * backtest_count(request)  # a sweep's: all its runs
    if await store.admit(tenant, request.id, units, quota) is Admission.OVER_QUOTA:
        if new:
            await store.withdraw(request.id)
        raise OverQuota(quota.refusal(tenant, units))
    return new


async def store_uploaded_source(spec: ComponentSpec, store: Store, tenant: str) -> ComponentSpec:
    """Store uploaded code content-addressed and return the spec that names it by sha256.

    Whichever service first sees a request (gateway, or the scheduler for requests published
    directly) calls this; storing the same code twice is a no-op. A ``source_sha256`` must
    name code ``tenant`` uploaded: another tenant's is as unknown as code never uploaded (the
    same message), so a hash says nothing about what others run.
    """
    if spec.source is not None:
        sha = hashlib.sha256(spec.source.encode()).hexdigest()
        await store.put_source(sha, spec.source, tenant=tenant)
        return spec.model_copy(update={"source": None, "source_sha256": sha})
    if spec.source_sha256 is not None and not await store.has_source(
        spec.source_sha256, tenant=tenant
    ):
        unknown = FieldError(
            ("strategy", "source_sha256"),
            f"no uploaded source has sha256 {spec.source_sha256}; send the code once as 'source'",
        )
        raise RequestRejected.of_fields([unknown])
    return spec


async def fetch_code(spec: ComponentSpec, store: Store) -> ComponentRef:
    """``spec`` as the sandbox runs it: uploaded code fetched from ``store`` by its sha256
    (once; :meth:`ComponentRef.with_source` checks the hash).

    :raises shared.strategy.ComponentError: the store has no code with that sha256, or other
        code under it.
    """
    ref = spec.ref()
    if ref.source_sha256 is None or ref.source is not None:
        return ref
    return ref.with_source(await store.get_source(ref.source_sha256))
