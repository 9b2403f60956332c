"""Properties that must hold for any market and any signals (hypothesis).

The strongest one: resolving every proposal on its own and replaying them through the
portfolio gives the same trades as a plain bar-by-bar simulation written independently here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.sim import Costs, FixedFraction, MarkBars, replay, simulate
from tests.unit.sim.scenario import OHLC, batch, request, t


@st.composite
def markets(draw: st.DrawFn, max_bars: int = 40) -> tuple[list[OHLC], dict[int, dict[str, Any]]]:
    n = draw(st.integers(2, max_bars))
    price = 100.0
    rows: list[OHLC] = []
    for _ in range(n):
        o = price * (1 + draw(st.integers(-30, 30)) / 1000)
        c = o * (1 + draw(st.integers(-30, 30)) / 1000)
        h = max(o, c) * (1 + draw(st.integers(0, 20)) / 1000)
        low = min(o, c) * (1 - draw(st.integers(0, 20)) / 1000)
        rows.append((o, h, low, c))
        price = c
    signals: dict[int, dict[str, Any]] = {}
    for i in draw(st.sets(st.integers(0, n - 1), max_size=n)):
        if draw(st.booleans()):
            close = rows[i][3]
            tp = close * (1 + draw(st.integers(1, 40)) / 1000) if draw(st.booleans()) else None
            sl = close * (1 - draw(st.integers(1, 40)) / 1000) if draw(st.booleans()) else None
            limit = close * (1 - draw(st.integers(0, 10)) / 1000) if draw(st.booleans()) else None
            signals[i] = {"signal": "BUY", "tp_price": tp, "sl_price": sl, "entry_price": limit}
        else:
            signals[i] = {"signal": "SELL"}
    return rows, signals


def reference(
    rows: list[OHLC],
    signals: dict[int, dict[str, Any]],
    *,
    fee: float,
    slip: float,
    tie_break: str,
    max_hold: int | None,
) -> list[tuple[int, int, float, float, str]]:
    """One symbol, all-in, one position: the rules read bar by bar, in the order they happen."""
    trades = []
    pos: dict[str, Any] | None = None
    pending_buy: dict[str, Any] | None = None
    pending_sell = False
    last = len(rows) - 1

    def close_pos(j: int, price: float, reason: str) -> None:
        nonlocal pos
        assert pos is not None
        trades.append((t(pos["bar"]), t(j), pos["fill"] * (1 + slip), price * (1 - slip), reason))
        pos = None

    for j, (o, h, low, c) in enumerate(rows):
        tp = sl = float("nan")
        if pos is not None:  # exits at the open
            tp, sl = pos["tp"], pos["sl"]
            if pending_sell:
                close_pos(j, o, "signal")
            elif o <= sl:
                close_pos(j, o, "stop_loss")
            elif o >= tp:
                close_pos(j, o, "take_profit")
        pending_sell = False
        if pending_buy is not None and pos is None:  # entry at the open
            limit = pending_buy.get("entry_price")
            fill = o if limit is None else (min(o, limit) if low <= limit else None)
            if fill is not None:
                tp = pending_buy.get("tp_price") or float("inf")
                sl = pending_buy.get("sl_price") or float("-inf")
                pos = {"bar": j, "fill": fill, "tp": tp, "sl": sl}
                if fill <= sl:
                    close_pos(j, fill, "stop_loss")
                elif fill >= tp:
                    close_pos(j, fill, "take_profit")
        pending_buy = None
        if pos is not None:  # levels inside the bar
            sl_hit, tp_hit = low <= pos["sl"], h >= pos["tp"]
            if sl_hit and (not tp_hit or tie_break == "stop_loss_first"):
                close_pos(j, pos["sl"], "stop_loss")
            elif tp_hit:
                close_pos(j, pos["tp"], "take_profit")
        if pos is not None:  # exits at the close
            if max_hold is not None and j - pos["bar"] + 1 == max_hold:
                close_pos(j, c, "max_holding")
            elif j == last:
                close_pos(j, c, "end_of_data")
        signal = signals.get(j)
        if signal is not None and signal["signal"] == "BUY" and j < last:
            pending_buy = signal
        if signal is not None and signal["signal"] == "SELL" and pos is not None:
            pending_sell = True
    return trades


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    market=markets(),
    slip=st.sampled_from([0.0, 5.0]),
    tie_break=st.sampled_from(["stop_loss_first", "take_profit_first"]),
    max_hold=st.one_of(st.none(), st.integers(1, 6)),
)
def test_parallel_resolution_equals_a_bar_by_bar_simulation(
    market: tuple[list[OHLC], dict[int, dict[str, Any]]],
    slip: float,
    tie_break: str,
    max_hold: int | None,
) -> None:
    rows, signals = market
    req = request(
        ["BTCUSDT"],
        slippage_bps=slip,
        tie_break=tie_break,
        max_holding_bars=max_hold,
        min_notional=0.0,
    )
    result, _ = simulate(req, [batch(req, "BTCUSDT", rows, signals)])
    got = [
        (tr.entry_time, tr.exit_time, tr.entry_price, tr.exit_price, tr.exit_reason)
        for tr in result.trades
    ]
    want = reference(
        rows, signals, fee=req.fee_rate, slip=slip / 10_000, tie_break=tie_break, max_hold=max_hold
    )
    assert got == want


@settings(max_examples=150, deadline=None)
@given(
    a=markets(30),
    b=markets(30),
    c=markets(30),
    fraction=st.sampled_from([0.3, 0.5, 1.0]),
    max_positions=st.integers(1, 3),
)
def test_cash_never_negative_and_equity_is_cash_plus_positions(
    a: Any, b: Any, c: Any, fraction: float, max_positions: int
) -> None:
    req = request(["AAAUSDT", "BBBUSDT", "CCCUSDT"], min_notional=0.0)
    batches = [
        batch(req, s, rows, sig, unit=i)
        for i, (s, (rows, sig)) in enumerate(zip(req.symbols, (a, b, c), strict=True))
    ]
    proposals = [p for x in batches for p in x.proposals]
    bars = {s: MarkBars(*x.bars[s].columns()) for x in batches for s in x.bars}
    run = replay(
        proposals, bars, FixedFraction(fraction, max_positions), Costs(10_000.0, 0.001, 0.0)
    )
    assert all(r["cash"] >= 0 for r in run.wal if "cash" in r)
    # Rebuild equity independently from the trades: cash after each bar + open positions × close.
    for k, time in enumerate(run.grid.tolist()):
        cash = 10_000.0
        marked = 0.0
        for tr in run.trades:
            spent = tr.quantity * tr.entry_price * (1 + 0.001)
            if tr.entry_time <= time:
                cash -= spent
            if tr.exit_time <= time:
                cash += tr.quantity * tr.exit_price * (1 - 0.001)
            elif tr.entry_time <= time:
                closes = bars[tr.symbol]
                idx = np.searchsorted(closes.time, time, side="right") - 1
                marked += tr.quantity * closes.close[idx]
        assert run.equity[k] == pytest.approx(cash + marked, rel=1e-9, abs=1e-6)
    again = replay(
        list(reversed(proposals)),
        bars,
        FixedFraction(fraction, max_positions),
        Costs(10_000.0, 0.001, 0.0),
    )
    assert again.trades == run.trades and again.wal == run.wal
    assert np.array_equal(again.equity, run.equity)
