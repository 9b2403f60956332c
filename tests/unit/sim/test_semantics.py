"""Every rule of the README's "Semantics", each on a tiny market with hand-computed numbers.

Bars are (open, high, low, close); fee 0.1 %, 10,000 cash, all-in one position unless said.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from shared.sim import simulate
from tests.unit.sim.scenario import FLAT, SELL, backtest, batch, buy, request, t

F = 0.001
CASH = 10_000.0


def qty(price: float, budget: float = CASH) -> float:
    return budget / (price * (1 + F))


def net(q: float, exit_price: float, budget: float = CASH) -> float:
    return q * exit_price * (1 - F) - budget


RISE = [FLAT, (102, 105, 101, 104), (104, 111, 103, 108), (108, 109, 107, 108)]


def test_entry_fills_at_next_open_and_take_profit_fills_at_its_level() -> None:
    result = backtest({"BTCUSDT": (RISE, {0: buy(tp=110, sl=90)})})
    [trade] = result.trades
    q = qty(102)
    assert (trade.entry_time, trade.entry_price) == (t(1), 102)
    assert (trade.exit_time, trade.exit_price, trade.exit_reason) == (t(2), 110, "take_profit")
    assert trade.quantity == pytest.approx(q, rel=1e-12)
    assert trade.fees == pytest.approx(CASH - q * 102 + F * q * 110, rel=1e-12)
    assert trade.pnl == pytest.approx(net(q, 110), rel=1e-12)
    assert trade.side == "long"
    assert result.metrics is not None
    assert result.metrics.final_equity == pytest.approx(CASH + trade.pnl, rel=1e-12)


def test_stop_loss_fills_at_its_level() -> None:
    rows = [FLAT, (102, 105, 101, 104), (104, 105, 95, 100), FLAT]
    [trade] = backtest({"BTCUSDT": (rows, {0: buy(tp=110, sl=96)})}).trades
    assert (trade.exit_time, trade.exit_price, trade.exit_reason) == (t(2), 96, "stop_loss")


def test_a_bar_opening_through_the_stop_fills_at_its_open() -> None:
    rows = [FLAT, (102, 105, 101, 104), (94, 97, 93, 95), FLAT]
    [trade] = backtest({"BTCUSDT": (rows, {0: buy(tp=110, sl=96)})}).trades
    assert (trade.exit_time, trade.exit_price, trade.exit_reason) == (t(2), 94, "stop_loss")


def test_a_bar_opening_through_the_take_profit_fills_at_its_open() -> None:
    rows = [FLAT, (102, 105, 101, 104), (112, 113, 111, 112), FLAT]
    [trade] = backtest({"BTCUSDT": (rows, {0: buy(tp=110, sl=96)})}).trades
    assert (trade.exit_time, trade.exit_price, trade.exit_reason) == (t(2), 112, "take_profit")


def test_entry_bar_opening_beyond_a_level_exits_right_after_the_entry() -> None:
    rows = [FLAT, (102, 103, 101, 102), FLAT]
    [trade] = backtest({"BTCUSDT": (rows, {0: buy(tp=101, sl=99)})}).trades
    assert trade.entry_time == trade.exit_time == t(1)
    assert (trade.entry_price, trade.exit_price, trade.exit_reason) == (102, 102, "take_profit")
    assert trade.pnl == pytest.approx(net(qty(102), 102), rel=1e-12)


def test_levels_are_checked_in_the_entry_bar() -> None:
    rows = [FLAT, (102, 103, 95, 100), FLAT]
    [trade] = backtest({"BTCUSDT": (rows, {0: buy(tp=110, sl=96)})}).trades
    assert (trade.exit_time, trade.exit_price, trade.exit_reason) == (t(1), 96, "stop_loss")


@pytest.mark.parametrize(
    ("tie_break", "price", "reason"),
    [("stop_loss_first", 96, "stop_loss"), ("take_profit_first", 110, "take_profit")],
)
def test_both_levels_in_one_bar_follow_tie_break(tie_break: str, price: float, reason: str) -> None:
    rows = [FLAT, (102, 105, 101, 104), (104, 111, 95, 100), FLAT]
    result = backtest({"BTCUSDT": (rows, {0: buy(tp=110, sl=96)})}, tie_break=tie_break)
    [trade] = result.trades
    assert (trade.exit_price, trade.exit_reason) == (price, reason)


def test_default_tie_break_is_stop_loss_first() -> None:
    rows = [FLAT, (102, 105, 101, 104), (104, 111, 95, 100), FLAT]
    [trade] = backtest({"BTCUSDT": (rows, {0: buy(tp=110, sl=96)})}).trades
    assert trade.exit_reason == "stop_loss"


def test_opposite_signal_closes_at_the_next_open() -> None:
    rows = [FLAT, (101, 102, 100, 101), (103, 104, 102, 103), (105, 106, 104, 105), FLAT]
    [trade] = backtest({"BTCUSDT": (rows, {0: buy(), 2: SELL})}).trades
    assert (trade.exit_time, trade.exit_price, trade.exit_reason) == (t(3), 105, "signal")


def test_opposite_signal_in_the_entry_bar_counts() -> None:
    rows = [FLAT, (101, 102, 100, 101), (103, 104, 102, 103), FLAT]
    [trade] = backtest({"BTCUSDT": (rows, {0: buy(), 1: SELL})}).trades
    assert (trade.exit_time, trade.exit_price, trade.exit_reason) == (t(2), 103, "signal")


def test_opposite_signal_exit_comes_before_a_level_in_the_same_bar() -> None:
    rows = [FLAT, (101, 102, 100, 101), (101, 102, 100, 101), (100, 101, 90, 95), FLAT]
    [trade] = backtest({"BTCUSDT": (rows, {0: buy(sl=96), 2: SELL})}).trades
    assert (trade.exit_time, trade.exit_price, trade.exit_reason) == (t(3), 100, "signal")


def test_sell_without_a_position_does_nothing() -> None:
    result = backtest({"BTCUSDT": ([FLAT, FLAT, FLAT], {0: SELL})})
    assert result.trades == []
    assert result.metrics is not None and result.metrics.rejected_entries == 0


@pytest.mark.parametrize(("k", "exit_bar"), [(1, 1), (2, 2), (3, 3)])
def test_max_holding_closes_at_the_close_of_the_kth_bar(k: int, exit_bar: int) -> None:
    rows = [FLAT, (101, 102, 100, 101.5), (102, 103, 101, 102.5), (103, 104, 102, 103.5), FLAT]
    [trade] = backtest({"BTCUSDT": (rows, {0: buy()})}, max_holding_bars=k).trades
    assert (trade.exit_time, trade.exit_reason) == (t(exit_bar), "max_holding")
    assert trade.exit_price == rows[exit_bar][3]


def test_end_of_range_closes_at_the_last_close() -> None:
    rows = [FLAT, (101, 102, 100, 101), (102, 103, 101, 102.5)]
    [trade] = backtest({"BTCUSDT": (rows, {0: buy()})}).trades
    assert (trade.exit_time, trade.exit_price, trade.exit_reason) == (t(2), 102.5, "end_of_data")


def test_signal_on_the_last_bar_is_dropped() -> None:
    req = request(["BTCUSDT"])
    b = batch(req, "BTCUSDT", [FLAT, FLAT], {1: buy()})
    assert b.proposals == [] and b.dropped_signals == 1


@pytest.mark.parametrize(
    ("limit", "bar", "fill"),
    [
        (99.0, (102, 105, 98, 104), 99.0),  # reached inside the bar: fills at the limit
        (103.0, (102, 105, 101, 104), 102.0),  # open already below the limit: fills at the open
        (98.0, (102, 105, 98, 104), 98.0),  # low touching the limit exactly fills
    ],
)
def test_limit_entry_fills_at_min_of_open_and_limit(limit: float, bar: tuple, fill: float) -> None:
    [trade] = backtest({"BTCUSDT": ([FLAT, bar, FLAT], {0: buy(entry=limit)})}).trades
    assert (trade.entry_time, trade.entry_price) == (t(1), fill)


def test_unreached_limit_is_no_trade_and_no_rejection() -> None:
    req = request(["BTCUSDT"])
    b = batch(req, "BTCUSDT", [FLAT, (102, 105, 98, 104), (90, 91, 80, 85)], {0: buy(entry=97)})
    assert b.proposals == [] and b.unfilled_limits == 1
    result, _ = simulate(req, [b])
    assert result.trades == [] and result.metrics is not None
    assert result.metrics.rejected_entries == 0


def test_slippage_worsens_every_fill() -> None:
    [trade] = backtest({"BTCUSDT": (RISE, {0: buy(tp=110, sl=90)})}, slippage_bps=10).trades
    assert trade.entry_price == pytest.approx(102 * 1.001, rel=1e-15)
    assert trade.exit_price == pytest.approx(110 * 0.999, rel=1e-15)


def test_overlapping_entry_is_rejected_and_its_exit_dropped() -> None:
    rows = [FLAT, (101, 102, 100, 101), (102, 103, 101, 102), (103, 104, 102, 103), FLAT]
    result = backtest({"BTCUSDT": (rows, {0: buy(tp=103.5), 1: buy(tp=110)})})
    [trade] = result.trades
    assert (trade.entry_time, trade.exit_time, trade.exit_price) == (t(1), t(3), 103.5)
    assert result.metrics is not None and result.metrics.rejected_entries == 1
    assert result.per_symbol["BTCUSDT"].rejected_entries == 1
    assert result.wal is not None
    assert result.wal.entries_rejected == {"position_open": 1}


def test_max_positions_is_shared_across_symbols_in_symbol_order() -> None:
    rows = [FLAT, (101, 102, 100, 101), FLAT]
    market = (rows, {0: buy()})
    result = backtest(
        {"AAAUSDT": market, "BBBUSDT": market},
        portfolio={"builtin": "fixed_fraction", "params": {"fraction": 0.5, "max_positions": 1}},
    )
    assert [tr.symbol for tr in result.trades] == ["AAAUSDT"]
    assert result.trades[0].quantity == pytest.approx(qty(101, CASH * 0.5), rel=1e-12)
    assert result.per_symbol["BBBUSDT"].rejected_entries == 1
    assert result.wal is not None and result.wal.entries_rejected == {"max_positions": 1}


def test_fraction_sizes_each_entry_from_the_cash_then_available() -> None:
    rows = [FLAT, (100, 100, 100, 100), FLAT]
    market = (rows, {0: buy()})
    result = backtest(
        {"AAAUSDT": market, "BBBUSDT": market},
        portfolio={"builtin": "fixed_fraction", "params": {"fraction": 0.5, "max_positions": 2}},
        fee_rate=0.0,
    )
    a, b = result.trades
    assert a.quantity * 100 == pytest.approx(5_000) and b.quantity * 100 == pytest.approx(2_500)


def test_entry_below_min_notional_is_rejected() -> None:
    result = backtest({"BTCUSDT": (RISE, {0: buy()})}, initial_cash=50.0, min_notional=100.0)
    assert result.trades == []
    assert result.wal is not None and result.wal.entries_rejected == {"below_min_notional": 1}


def test_cash_freed_at_an_open_funds_that_bars_entries() -> None:
    rows = [FLAT, (100, 101, 99, 100), (100, 101, 99, 100), FLAT]
    result = backtest({"AAAUSDT": (rows, {0: buy(), 1: SELL}), "BBBUSDT": (rows, {1: buy()})})
    assert [(tr.symbol, tr.entry_time) for tr in result.trades] == [
        ("AAAUSDT", t(1)),
        ("BBBUSDT", t(2)),
    ]


def test_cash_freed_inside_a_bar_does_not_fund_that_bars_entries() -> None:
    rows_a = [FLAT, (100, 101, 99, 100), (100, 106, 99, 100), FLAT]
    rows_b = [FLAT, FLAT, (100, 101, 99, 100), FLAT]
    result = backtest({"AAAUSDT": (rows_a, {0: buy(tp=105)}), "BBBUSDT": (rows_b, {1: buy()})})
    assert [tr.symbol for tr in result.trades] == ["AAAUSDT"]
    assert result.wal is not None and result.wal.entries_rejected == {"max_positions": 1}


def test_equity_is_cash_plus_positions_marked_at_each_close() -> None:
    rows = [FLAT, (102, 105, 101, 104), (104, 106, 103, 105), (105, 107, 104, 106)]
    result = backtest({"BTCUSDT": (rows, {0: buy()})})
    q = qty(102)
    assert [p[0] for p in result.equity_curve] == [t(i) for i in range(4)]
    expected = [CASH, q * 104, q * 105, q * 106 * (1 - F)]
    assert [p[1] for p in result.equity_curve] == pytest.approx(expected, rel=1e-12)


def test_exposure_is_the_share_of_bars_with_a_position() -> None:
    rows = [FLAT, (101, 102, 100, 101), (103, 104, 102, 103), (105, 106, 104, 105), FLAT]
    result = backtest({"BTCUSDT": (rows, {0: buy(), 2: SELL})})  # held during bars 1 and 2
    assert result.metrics is not None and result.metrics.exposure == pytest.approx(2 / 5)
    assert result.per_symbol["BTCUSDT"].exposure == pytest.approx(2 / 5)


def test_metrics_follow_their_definitions() -> None:
    # Three UTC days of hourly bars; one winning and one losing trade.
    closes = np.concatenate(
        [np.linspace(100, 110, 24), np.linspace(110, 95, 24), np.linspace(95, 99, 24)]
    )
    rows = [(c, c + 0.5, c - 0.5, c) for c in closes]
    result = backtest({"BTCUSDT": (rows, {2: buy(), 20: SELL, 30: buy(), 60: SELL})})
    m = result.metrics
    assert m is not None and len(result.trades) == 2
    equity = np.array([e for _, e in result.equity_curve])
    daily = np.array([equity[23], equity[47], equity[71]])
    r = daily / np.concatenate([[CASH], daily[:-1]]) - 1
    assert m.sharpe == pytest.approx(r.mean() / r.std(ddof=1) * math.sqrt(365), rel=1e-12)
    downside = math.sqrt(np.mean(np.minimum(r, 0) ** 2))
    assert m.sortino == pytest.approx(r.mean() / downside * math.sqrt(365), rel=1e-12)
    curve = np.concatenate([[CASH], equity])
    peak = np.maximum.accumulate(curve)
    assert m.max_drawdown == pytest.approx(((peak - curve) / peak).max(), rel=1e-12)
    years = 72 * 3_600_000 / (365 * 86_400_000)
    assert m.cagr == pytest.approx((equity[-1] / CASH) ** (1 / years) - 1, rel=1e-9)
    assert m.calmar == pytest.approx(m.cagr / m.max_drawdown, rel=1e-12)
    pnl = [tr.pnl for tr in result.trades]
    assert pnl[0] > 0 > pnl[1]
    assert m.win_rate == 0.5
    assert m.profit_factor == pytest.approx(pnl[0] / -pnl[1], rel=1e-12)
    assert m.expectancy == pytest.approx(sum(pnl) / 2, rel=1e-12)
    assert m.fees_paid == pytest.approx(sum(tr.fees for tr in result.trades), rel=1e-12)
    assert m.total_return == pytest.approx(equity[-1] / CASH - 1, rel=1e-12)


def test_undefined_metrics_are_null() -> None:
    result = backtest({"BTCUSDT": ([FLAT, FLAT, FLAT], {})})
    m = result.metrics
    assert m is not None
    assert (m.sharpe, m.sortino, m.win_rate, m.profit_factor, m.expectancy, m.calmar) == (None,) * 6
    assert (m.trade_count, m.max_drawdown, m.exposure, m.total_return) == (0, 0.0, 0.0, 0.0)


def test_equity_curve_is_capped_at_ten_thousand_points_keeping_the_last() -> None:
    rows = [FLAT] * 25_000
    result = backtest({"BTCUSDT": (rows, {})})
    assert len(result.equity_curve) == 10_000
    assert result.equity_curve[0][0] == t(0) and result.equity_curve[-1][0] == t(24_999)


def test_same_request_same_result_whatever_order_units_arrive_in() -> None:
    rng = random.Random(7)
    req = request(
        ["AAAUSDT", "BBBUSDT", "CCCUSDT"],
        portfolio={"builtin": "fixed_fraction", "params": {"fraction": 0.4, "max_positions": 2}},
    )
    batches = []
    for unit, symbol in enumerate(req.symbols):
        prices = 100 + np.cumsum([rng.uniform(-1, 1) for _ in range(300)])
        rows = [(p, p + 1, p - 1, float(p + rng.uniform(-0.5, 0.5))) for p in prices.tolist()]
        signals = {i: buy(tp=rows[i][3] * 1.01, sl=rows[i][3] * 0.99) for i in range(0, 290, 7)}
        batches.append(batch(req, symbol, rows, signals, unit=unit))
    first, wal = simulate(req, batches)
    for _ in range(3):
        rng.shuffle(batches)
        again, wal_again = simulate(req, batches)
        assert again.model_dump(exclude={"timings"}) == first.model_dump(exclude={"timings"})
        assert wal_again == wal
