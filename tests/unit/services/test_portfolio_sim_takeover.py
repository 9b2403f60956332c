"""portfolio_sim's last batch after a crash, on the file store: it takes a lapsed replay over
from the stored WAL, waits while a live owner holds the lease, and refuses a WAL that its
replay does not reproduce.

Each test starts from what ``stratorch run --state`` left behind (plan, batches, WAL, result)
and undoes the end of it, as a portfolio_sim that died mid-replay would have left it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import shutil
import time
from pathlib import Path
from typing import Any, cast

import pytest
import structlog

from services.portfolio_sim import handler as portfolio_sim
from services.portfolio_sim.lease import HeldLease, LeaseLost
from services.portfolio_sim.wal import WalMismatch
from services.routes import routes
from shared import topology
from shared.bus import Delivery, Outgoing
from shared.candles import ParquetCandleStore
from shared.messages import BacktestRequest, BacktestResult, ProposalBatch
from shared.ports import Ports
from shared.sandbox.process import ProcessSandbox
from shared.store import FileStore
from stratorch.embedded import run_backtest
from stratorch.paths import SAMPLE_STORE
from tests import every_bar

BACKTEST = "crash-1"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state ``stratorch run --state`` leaves after a whole backtest (two symbols over the
    whole sample, a BUY on every bar: ~22k WAL events)."""
    state = tmp_path_factory.mktemp("finished")
    ports = Ports(ParquetCandleStore(SAMPLE_STORE), ProcessSandbox(), FileStore(state))
    request = every_bar.request(BACKTEST, ["BTCUSDT", "ETHUSDT"])
    result = asyncio.run(run_backtest(json.dumps(request).encode(), ports))
    assert result.status == "completed", result.errors
    return state


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What the handler logs, whatever structlog's global configuration (another test's run
    of the CLI may have set it to drop info lines)."""
    capture = structlog.testing.LogCapture()
    logger = structlog.wrap_logger(
        None, processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(0)
    )
    monkeypatch.setattr(portfolio_sim, "log", logger)
    return capture.entries


class Crashed:
    """A copy of the finished state with its result and lease removed and its WAL cut
    short."""

    def __init__(self, finished: Path, tmp_path: Path, *, wal_kept: int) -> None:
        shutil.copytree(finished, tmp_path / "state")
        self.folder = tmp_path / "state" / "backtests" / BACKTEST
        self.result = BacktestResult.model_validate_json((self.folder / "result.json").read_bytes())
        self.wal = (self.folder / "wal.jsonl").read_text().splitlines(keepends=True)
        (self.folder / "result.json").unlink()
        (self.folder / "claim.json").unlink()  # no lease: each test leaves the one it needs
        (self.folder / "wal.jsonl").write_text("".join(self.wal[:wal_kept]))
        self.store = FileStore(tmp_path / "state", lease_s=1.0)
        self.last = ProposalBatch.model_validate_json(
            next((self.folder / "batches").glob("*.json")).read_bytes()
        )

    def leave_lease(self, owner: str, expires_in_s: float) -> None:
        lease = {"owner": owner, "expires_at": time.time() + expires_in_s}
        (self.folder / "claim.json").write_text(json.dumps(lease))

    async def deliver(self, *, redelivered: bool) -> list[Outgoing]:
        """The last batch, delivered to portfolio_sim: what it publishes."""
        ports = Ports(candles=cast(Any, None), sandbox=cast(Any, None), store=self.store)
        return await portfolio_sim.handle(self.last, ports, redelivered=redelivered)

    async def handle(self) -> BacktestResult:
        """The dead owner's last batch, redelivered: the result it publishes."""
        out = await self.deliver(redelivered=True)
        [result] = [o.message for o in out if o.exchange == topology.RESULTS]
        assert isinstance(result, BacktestResult)
        return result


def same(got: BacktestResult, want: BacktestResult) -> bool:
    return got.model_copy(update={"timings": {}}) == want.model_copy(update={"timings": {}})


def logged(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


async def test_a_lapsed_replay_is_taken_over_from_its_stored_wal(
    finished: Path, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    crashed = Crashed(finished, tmp_path, wal_kept=7_000)
    crashed.leave_lease("crashed-owner", expires_in_s=-1)

    result = await crashed.handle()

    assert same(result, crashed.result)
    assert same(await crashed.store.get_result(BACKTEST) or result, crashed.result)
    [done] = logged(logs, "replayed")
    assert done["wal_verified"] == 7_000
    assert done["wal_appended"] == len(crashed.wal) - 7_000
    assert (crashed.folder / "wal.jsonl").read_text() == "".join(crashed.wal)


async def test_a_live_owners_lease_is_waited_for_and_its_result_announced(
    finished: Path, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    crashed = Crashed(finished, tmp_path, wal_kept=3_000)
    crashed.leave_lease("live-owner", expires_in_s=1.0)

    async def owner_finishes() -> None:  # renews its lease for a while, then stores its result
        for _ in range(8):
            crashed.leave_lease("live-owner", expires_in_s=1.0)
            await asyncio.sleep(0.1)
        await crashed.store.finish(crashed.result)

    result, _ = await asyncio.gather(crashed.handle(), owner_finishes())

    assert result == crashed.result
    assert logged(logs, "replay held elsewhere; waiting")
    assert not logged(logs, "replaying")


async def test_a_first_delivery_finding_the_lease_held_leaves_the_replay_to_its_owner(
    finished: Path, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    # Its owner holds its own last batch unacked: if it dies, that one comes back.
    crashed = Crashed(finished, tmp_path, wal_kept=0)
    crashed.leave_lease("live-owner", expires_in_s=30)

    out = await asyncio.wait_for(crashed.deliver(redelivered=False), timeout=5)

    assert [o.exchange for o in out] == [topology.EVENTS]  # its progress, no result
    [held] = logged(logs, "replay held elsewhere")
    assert held["holder"] == "live-owner"
    assert not logged(logs, "replaying")


async def test_a_dead_owners_lease_is_waited_out_then_taken_over(
    finished: Path, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    crashed = Crashed(finished, tmp_path, wal_kept=0)
    crashed.leave_lease("dead-owner", expires_in_s=0.5)
    started = time.monotonic()

    result = await crashed.handle()

    assert time.monotonic() - started >= 0.5
    assert same(result, crashed.result)
    [waiting, *_] = logged(logs, "replay held elsewhere; waiting")
    assert waiting["holder"] == "dead-owner"
    assert logged(logs, "replayed")[0]["wal_verified"] == 0


async def test_a_stored_wal_the_replay_does_not_reproduce_stops_it(
    finished: Path, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    crashed = Crashed(finished, tmp_path, wal_kept=6_000)
    record = json.loads(crashed.wal[4_321])
    record["cash"] += 1.0  # the batches changed since this was written
    lines = crashed.wal[:6_000]
    lines[4_321] = json.dumps(record) + "\n"
    (crashed.folder / "wal.jsonl").write_text("".join(lines))

    with pytest.raises(WalMismatch, match=r"crash-1: WAL record 4321 is stored as"):
        await crashed.handle()
    assert await crashed.store.get_result(BACKTEST) is None
    assert (crashed.folder / "wal.jsonl").read_text() == "".join(lines)  # nothing appended


async def test_a_lease_taken_over_while_held_is_found_lost_at_the_next_renewal(
    tmp_path: Path,
) -> None:
    store = FileStore(tmp_path, lease_s=0.3)
    assert (await store.claim("bt1", "stalled")).owner == "stalled"
    async with HeldLease(store, "bt1", "stalled") as lease:
        await asyncio.sleep(0.2)
        lease.check()  # renewed meanwhile: still ours
        await lease.confirm()
        # It stalled past its lease, and someone took over: the lease they leave.
        # Written under the claim file's lock, as a takeover writes it, so that a renewal
        # running at this moment cannot overwrite it.
        taken = {"owner": "taker", "expires_at": time.time() + 60}
        with open(tmp_path / "backtests" / "bt1" / "claim.json", "r+b") as claim:
            fcntl.flock(claim, fcntl.LOCK_EX)
            claim.truncate()
            claim.write(json.dumps(taken).encode())
        with pytest.raises(LeaseLost, match="taker took the replay of bt1 over"):
            async with asyncio.timeout(10):
                while True:  # until its next renewal
                    lease.check()
                    await asyncio.sleep(0.05)
        with pytest.raises(LeaseLost):
            await lease.confirm()


async def test_a_stored_wal_longer_than_the_replay_stops_it(finished: Path, tmp_path: Path) -> None:
    crashed = Crashed(finished, tmp_path, wal_kept=10**9)
    extra = {**json.loads(crashed.wal[-1]), "seq": len(crashed.wal)}
    with (crashed.folder / "wal.jsonl").open("a") as wal:
        wal.write(json.dumps(extra) + "\n")

    past = rf"goes on past the end of the replay \(records from seq {extra['seq']} on, 1 in all"
    with pytest.raises(WalMismatch, match=past):
        await crashed.handle()
    assert await crashed.store.get_result(BACKTEST) is None


async def test_a_dead_request_ends_its_backtest_only_if_it_owns_the_id(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    ports = Ports(ParquetCandleStore(SAMPLE_STORE), ProcessSandbox(), store)
    [end] = [r.handle for r in routes("portfolio_sim", ports) if r.queue == topology.DEAD_WATCH]
    fields = {"strategy": "sma_cross", "symbols": ["BTCUSDT"], "interval": "1h"}
    owner = BacktestRequest.model_validate(
        {"id": "bt-1", **fields, "start": "2021-01-01", "end": "2021-02-01"}
    )
    await store.accept("bt-1", owner.fingerprint(), tenant="anonymous")

    def dead(start: str) -> Delivery:
        body = json.dumps({"id": "bt-1", **fields, "start": start, "end": "2021-02-01"})
        headers = {topology.QUEUE_HEADER: topology.REQUESTS, topology.REASON_HEADER: "boom"}
        return Delivery(body.encode(), "m", "bt-1", headers)

    assert await end(dead("2021-01-15")) == []  # another request with that id: not its to end
    assert await store.get_result("bt-1") is None
    ended = await end(dead("2021-01-01"))  # the owner's own request
    result = await store.get_result("bt-1")
    assert result is not None and result.status == "failed" and "boom" in result.errors[0].message
    assert any(o.exchange == topology.RESULTS for o in ended)
