"""The symbol worker on the bus: a unit in, its batch out — the proposals and bars of its
symbols, or the error that stopped it; a unit of a backtest that has ended is skipped."""

from __future__ import annotations

from shared import topology
from shared.candles import Span
from shared.messages import BacktestResult, CancelRequest, ProposalBatch
from shared.ports import Ports

from .conftest import plan, request, served

MARCH_2021_MS = (1_614_556_800_000, 1_617_235_200_000)


async def test_a_unit_gives_its_symbols_proposals_and_bars(ports: Ports) -> None:
    [unit, _] = await plan(ports, request())
    async with served(ports, "symbol_worker") as worker:
        await worker.send(topology.WORK, unit, unit.backtest_id)
        batch = await worker.take(topology.PROPOSALS, ProposalBatch)
        await worker.nothing_more(topology.PROPOSALS)

    assert batch.error is None
    assert (batch.backtest_id, batch.unit_id, batch.unit_count) == (
        unit.backtest_id,
        unit.unit_id,
        2,
    )
    [symbol] = batch.symbols
    assert batch.symbols == unit.symbols and list(batch.bars) == [symbol]
    # The simulated bars, without the warm-up: every stored bar of March 2021.
    start_ms, end_ms = MARCH_2021_MS
    march = await ports.candles.load(symbol, Span("1h", start_ms, end_ms))
    times, closes = batch.bars[symbol].columns()
    assert times.tolist() == march["open_time"].tolist() and times[0] == start_ms
    assert closes.tolist() == march["close"].tolist()
    assert batch.proposals, "a month of 1h bars has crosses of a 5 and a 20 bar average"
    for p in batch.proposals:
        assert p.symbol == symbol
        assert MARCH_2021_MS[0] <= p.signal_time < p.entry_time <= p.exit_time
        assert p.entry_time in times


async def test_a_unit_without_candles_gives_a_no_data_error(ports: Ports) -> None:
    [unit] = await plan(ports, request(symbols=["NOPEUSDT"]))
    async with served(ports, "symbol_worker") as worker:
        await worker.send(topology.WORK, unit, unit.backtest_id)
        batch = await worker.take(topology.PROPOSALS, ProposalBatch)

    assert batch.proposals == [] and batch.bars == {}
    assert batch.error is not None
    assert (batch.error.kind, batch.error.symbol, batch.error.unit_id) == (
        "no_data",
        "NOPEUSDT",
        unit.unit_id,
    )
    assert "It has 1h candles for ADAUSDT, BTCUSDT, DOGEUSDT" in batch.error.message


async def test_a_unit_of_a_cancelled_backtest_is_skipped(ports: Ports) -> None:
    [unit, _] = await plan(ports, request())
    async with served(ports, "portfolio_sim") as portfolio_sim:
        await portfolio_sim.send(
            topology.CANCEL, CancelRequest(backtest_id=unit.backtest_id), unit.backtest_id
        )
        assert (await portfolio_sim.take(topology.RESULTS, BacktestResult)).status == "cancelled"
    async with served(ports, "symbol_worker") as worker:
        await worker.send(topology.WORK, unit, unit.backtest_id)
        batch = await worker.take(topology.PROPOSALS, ProposalBatch)

    assert batch.proposals == [] and batch.bars == {}
    assert batch.error is not None and batch.error.kind == "cancelled"
    assert batch.error.message == (
        f"unit {unit.unit_id} was skipped: backtest {unit.backtest_id} has ended (cancelled)"
    )
