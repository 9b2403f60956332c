"""The symbol worker on the bus: a unit in, its batch out — the proposals and bars of its
symbols, or the error that stopped it; a unit of a backtest that has ended is skipped."""

from __future__ import annotations

import dataclasses

import pandas as pd

from shared import topology
from shared.candles import Span
from shared.messages import BacktestResult, CancelRequest, ProposalBatch, WorkUnit
from shared.ports import CandleSource, Ports

from .conftest import plan, request, run_units, served

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


#: Strategies with lookbacks other than sma_cross's: one fails on every bar; one buys every
#: 37th row it is given, so its trades tell whether it got the rows it asked for.
STRATEGIES = """
import numpy as np
import pandas as pd
from shared.strategy import BaseStrategy

class Failing(BaseStrategy):
    def get_required_lookback(self):
        return 3

    def decide(self, df, interval, **kw):
        raise ValueError("boom")

class Counting(BaseStrategy):
    def get_required_lookback(self):
        return 5

    def signals(self, df):
        buy = np.arange(len(df)) % 37 == 0
        return pd.DataFrame({"signal": np.where(buy, "BUY", "SELL")}, index=df.index)
"""


class CountingCandles:
    """The real candles, counting each read."""

    def __init__(self, candles: CandleSource) -> None:
        self.candles = candles
        self.loads: list[tuple[str, Span]] = []

    async def load(self, symbol: str, window: Span) -> pd.DataFrame:
        self.loads.append((symbol, window))
        return await self.candles.load(symbol, window)

    async def fingerprint(self, symbol: str, window: Span) -> str:
        return await self.candles.fingerprint(symbol, window)


async def test_a_grouped_unit_reads_candles_once_and_answers_each_run(ports: Ports) -> None:
    # A sweep's combinations over the same symbols and window: each run's batch is the one
    # its unit gives alone, though the group reads each symbol once (with the largest
    # lookback); a failing run fails only its own batch.
    strategies = [
        {"source": STRATEGIES, "class": "Counting"},
        {"source": STRATEGIES, "class": "Failing"},
        {"builtin": "sma_cross", "params": {"fast": 3, "slow": 40}},
    ]
    units = [(await plan(ports, request(strategy=s)))[0] for s in strategies]
    assert len({u.lookback for u in units}) == 3
    alone = await run_units(ports, units)
    counting = CountingCandles(ports.candles)
    group = WorkUnit.group(units, backtest_id="t-sweep", unit_id="g0000")

    grouped = await run_units(dataclasses.replace(ports, candles=counting), [group], per_unit=3)

    assert [(s, w.lookback) for s, w in counting.loads] == [(units[0].symbols[0], 41)]
    failed = grouped.pop(1)
    assert failed.error is not None and failed.error.kind == "crashed"
    assert (failed.backtest_id, failed.unit_id) == (units[1].backtest_id, units[1].unit_id)
    assert "ValueError: boom" in failed.error.message
    assert failed.model_dump(exclude={"elapsed_s"}) == alone[1].model_dump(exclude={"elapsed_s"})
    for batch, one in zip(grouped, alone[::2], strict=True):
        assert batch.error is None and batch.proposals
        assert batch.model_dump(exclude={"elapsed_s"}) == one.model_dump(exclude={"elapsed_s"})
