"""A backtest's HTML report: one self-contained page that opens offline.

``stratorch run --report FILE.html`` writes it, and the gateway serves it at
``GET /backtests/{id}/report``. The page shows the equity curve with its drawdown beneath,
each symbol's close price with every trade's entry and exit marked, the metrics, the
per-symbol breakdown, the trade list and any errors. The charts are plotly's, its JavaScript
inlined once (4.8 MB of every report, plus about 0.5 KB per trade): the page loads nothing
from anywhere.

What is drawn is bounded; what is listed is not. A price or equity line longer than
:data:`LINE_POINTS` is drawn from each bucket of consecutive points' lowest and highest
(so no spike and no drawdown disappears), which keeps a 100,000-bar backtest as quick to pan
and zoom as a short one; every trade keeps its own marker at its exact time and price, and its
row in the trade list.

:func:`render` builds the page from what it is given (no I/O); :func:`load_prices` reads the
bars it draws from a candle source; :func:`build` does both, as the CLI and the gateway need.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots
from pydantic import ValidationError

from shared.candles import Span
from shared.errors import NoDataError
from shared.messages import BacktestRequest, BacktestResult, Metrics, SymbolMetrics, Trade
from shared.ports import CandleSource

__all__ = ["LINE_POINTS", "PRICE_POINTS", "build", "load_prices", "render"]

#: The most points one drawn line has: a few thousand is as much as a chart a few thousand
#: pixels wide can show, and plotly redraws that many at once while zooming.
LINE_POINTS = 4_000
#: The most points all symbols' price lines have together, so that a backtest of hundreds of
#: symbols does not make a page of hundreds of MB: each line gets its share, at least
#: :data:`_MIN_LINE_POINTS`.
PRICE_POINTS = 200_000
_MIN_LINE_POINTS = 200

_FloatArray = npt.NDArray[np.float64]

#: plotly's options for every chart: no logo; the mouse wheel zooms.
_CONFIG = {"displaylogo": False, "scrollZoom": True, "responsive": True}
_WIN, _LOSS, _ENTRY = "#1a9850", "#d73027", "#4575b4"


def render(
    result: BacktestResult,
    prices: Mapping[str, pd.DataFrame] | None = None,
    *,
    request: BacktestRequest | None = None,
) -> str:
    """The report of ``result`` as a complete HTML page.

    :param result: what the backtest gave; a result without metrics (failed, rejected,
        cancelled) shows its status and errors, and whatever else it has.
    :param prices: each symbol's bars (at least ``open_time`` and ``close``), drawn beneath its
        trades; a symbol without them gets its trades' markers alone.
    :param request: the backtest's request, for the header (strategy, range, costs) and the
        order of the symbols; without it the header shows what the result says.
    """
    prices = prices or {}
    symbols = _symbols(result, prices, request)
    sections = [
        _header(result, request),
        _errors(result),
        _section("Equity and drawdown", _equity_chart(result, request)),
        _section("Prices and trades", _price_chart(result.trades, prices, symbols)),
        _section("Metrics", _metrics_table(result.metrics)),
        _section("Per symbol", _per_symbol_table(result.per_symbol)),
        _section(f"Trades ({len(result.trades):,})", _trades_table(result.trades)),
    ]
    title = f"stratorch backtest {result.backtest_id}"
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(title)}</title><style>{_CSS}</style>",
            f'<script type="text/javascript">{get_plotlyjs()}</script></head>',
            f"<body><main>{''.join(sections)}</main></body></html>\n",
        ]
    )


async def load_prices(candles: CandleSource, request: BacktestRequest) -> dict[str, pd.DataFrame]:
    """Each of the request's symbols' bars in its range (``open_time`` and ``close``).

    A symbol the source has no bars for is left out: the result's errors say why.
    """

    async def one(symbol: str) -> pd.DataFrame | None:
        try:
            window = Span(request.interval, request.start_ms, request.end_ms)
            frame = await candles.load(symbol, window)
        except NoDataError:
            return None
        return frame[["open_time", "close"]]

    frames = await asyncio.gather(*(one(s) for s in request.symbols))
    return {s: f for s, f in zip(request.symbols, frames, strict=True) if f is not None}


async def build(
    result: BacktestResult,
    candles: CandleSource | None,
    request: BacktestRequest | Path | None,
) -> str:
    """:func:`render` with the prices read from ``candles``, the page built in a worker thread
    (it is CPU work: a server's event loop keeps serving meanwhile).

    :param candles: where the backtest's candles are; ``None``: no price lines.
    :param request: the backtest's request, or a request file. A file that holds no valid
        request (a rejected run's) gives a report without prices.
    """
    parsed = _request(request)
    prices = {}
    if parsed is not None and candles is not None and result.status == "completed":
        prices = await load_prices(candles, parsed)
    return await asyncio.to_thread(render, result, prices, request=parsed)


def _request(request: BacktestRequest | Path | None) -> BacktestRequest | None:
    if not isinstance(request, Path):
        return request
    try:
        return BacktestRequest.model_validate_json(request.read_bytes())
    except (OSError, ValidationError):
        return None


# -- charts --------------------------------------------------------------------------------------


def _thin(x: _FloatArray, y: _FloatArray, points: int) -> tuple[_FloatArray, _FloatArray]:
    """At most ``points`` of the line through ``(x, y)``, in order: its first and last point,
    and the lowest and highest of each bucket of consecutive points between them."""
    n = len(y)
    if n <= points:
        return x, y
    size = -(-n // max(1, (points - 2) // 2))  # points per bucket, rounded up
    buckets = -(-n // size)
    padding = buckets * size - n  # < size: every bucket has a real point
    lows = np.concatenate([y, np.full(padding, np.inf)]).reshape(buckets, size)
    highs = np.concatenate([y, np.full(padding, -np.inf)]).reshape(buckets, size)
    starts = np.arange(buckets) * size
    keep = np.unique(
        np.concatenate([[0, n - 1], starts + lows.argmin(axis=1), starts + highs.argmax(axis=1)])
    )
    return x[keep], y[keep]


def _equity_chart(result: BacktestResult, request: BacktestRequest | None) -> str:
    if not result.equity_curve:
        return _note("No equity curve: the backtest did not complete.")
    curve = np.asarray(result.equity_curve, dtype=np.float64)
    times, equity = curve[:, 0], curve[:, 1]
    start = (
        result.metrics.initial_cash
        if result.metrics
        else request.initial_cash
        if request
        else equity[0]
    )
    peak = np.maximum.accumulate(np.concatenate([[start], equity]))[1:]
    drawdown = equity / peak - 1
    figure = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.04
    )
    figure.add_trace(_line(*_thin(times, equity, LINE_POINTS), "equity", _ENTRY), row=1, col=1)
    dd_line = _line(*_thin(times, drawdown, LINE_POINTS), "drawdown", _LOSS)
    dd_line.update(fill="tozeroy")
    figure.add_trace(dd_line, row=2, col=1)
    figure.update_yaxes(title_text="equity", tickformat=",.0f", row=1, col=1)
    figure.update_yaxes(title_text="drawdown", tickformat=".0%", row=2, col=1)
    return _figure(figure, "equity", height=560)


def _price_chart(
    trades: list[Trade], prices: Mapping[str, pd.DataFrame], symbols: list[str]
) -> str:
    """One chart, a symbol at a time (a menu picks it): a page of one chart per symbol would
    stall with hundreds of them."""
    if not symbols:
        return _note("No prices and no trades to draw.")
    by_symbol: dict[str, list[Trade]] = {s: [] for s in symbols}
    for trade in trades:
        by_symbol[trade.symbol].append(trade)
    points = max(_MIN_LINE_POINTS, min(LINE_POINTS, PRICE_POINTS // len(symbols)))
    traces: list[go.Scatter] = []
    traces_of: list[int] = []  # the symbol of each trace
    for i, symbol in enumerate(symbols):
        drawn = _symbol_traces(symbol, prices.get(symbol), by_symbol[symbol], points)
        for trace in drawn:
            trace.update(visible=i == 0)
        traces += drawn
        traces_of += [i] * len(drawn)
    figure = go.Figure(data=traces)
    if len(symbols) > 1:
        buttons = [
            {
                "label": symbol,
                "method": "update",
                "args": [{"visible": [t == i for t in traces_of]}, {"title.text": symbol}],
            }
            for i, symbol in enumerate(symbols)
        ]
        menu = {"buttons": buttons, "x": 0, "xanchor": "left", "y": 1.12, "yanchor": "top"}
        figure.update_layout(updatemenus=[menu])
    figure.update_layout(title={"text": symbols[0], "x": 0.5}, showlegend=True)
    figure.update_yaxes(title_text="price", tickformat=",~r")
    return _figure(figure, "prices", height=520)


def _symbol_traces(
    symbol: str, bars: pd.DataFrame | None, trades: list[Trade], points: int
) -> list[go.Scatter]:
    traces = []
    if bars is not None and len(bars):
        x = bars["open_time"].to_numpy(dtype=np.float64)
        y = bars["close"].to_numpy(dtype=np.float64)
        traces.append(_line(*_thin(x, y, points), f"{symbol} close", "#555555"))
    entries = _markers(
        "entries",
        trades,
        time=lambda t: t.entry_time,
        price=lambda t: t.entry_price,
        text=lambda t: f"entry {_num(t.entry_price)}<br>quantity {t.quantity:.6g}",
        symbol="triangle-up",
        colours=[_ENTRY] * len(trades),
    )
    exits = _markers(
        "exits",
        trades,
        time=lambda t: t.exit_time,
        price=lambda t: t.exit_price,
        text=lambda t: f"exit {_num(t.exit_price)} ({t.exit_reason})<br>pnl {t.pnl:+,.2f}",
        symbol="triangle-down",
        colours=[_WIN if t.pnl > 0 else _LOSS for t in trades],
    )
    return [*traces, entries, exits]


def _markers(
    name: str,
    trades: list[Trade],
    *,
    time: Callable[[Trade], int],
    price: Callable[[Trade], float],
    text: Callable[[Trade], str],
    symbol: str,
    colours: list[str],
) -> go.Scatter:
    """Every trade's marker, never thinned: its exact bar time and fill price."""
    return go.Scatter(
        x=np.array([time(t) for t in trades], dtype=np.float64),
        y=np.array([price(t) for t in trades], dtype=np.float64),
        name=name,
        mode="markers",
        marker={"symbol": symbol, "size": 9, "color": colours, "line": {"width": 0}},
        text=[f"{_time(time(t))}<br>{text(t)}" for t in trades],
        hoverinfo="text",
    )


def _line(x: _FloatArray, y: _FloatArray, name: str, colour: str) -> go.Scatter:
    return go.Scatter(
        x=x, y=y, name=name, mode="lines", line={"width": 1.2, "color": colour}, hoverinfo="x+y"
    )


def _figure(figure: go.Figure, div_id: str, *, height: int) -> str:
    # Times are ms since the epoch (compact in the page): a date axis reads them as UTC.
    figure.update_xaxes(type="date")
    figure.update_layout(
        template="plotly_white",
        height=height,
        margin={"l": 70, "r": 20, "t": 60, "b": 40},
        hovermode="closest",
        legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.08},
    )
    page: str = figure.to_html(
        full_html=False, include_plotlyjs=False, div_id=div_id, config=_CONFIG
    )
    return page


def _symbols(
    result: BacktestResult, prices: Mapping[str, pd.DataFrame], request: BacktestRequest | None
) -> list[str]:
    """The request's order, then any other symbol the result or prices name."""
    named = [*(request.symbols if request else []), *result.per_symbol, *prices]
    named += sorted({t.symbol for t in result.trades})
    return list(dict.fromkeys(named))


# -- text and tables ------------------------------------------------------------------------------


def _header(result: BacktestResult, request: BacktestRequest | None) -> str:
    facts: list[tuple[str, str]] = [("status", result.status)]
    if request is not None:
        facts += [
            ("strategy", _spec(request.strategy.model_dump(by_alias=True, exclude_none=True))),
            ("portfolio", _spec(request.portfolio.model_dump(by_alias=True, exclude_none=True))),
            ("symbols", ", ".join(request.symbols)),
            ("interval", request.interval),
            ("range", f"{_time(request.start_ms)} → {_time(request.end_ms)} (UTC)"),
            ("fees", f"{request.fee_rate * 100:g} % a side; slippage {request.slippage_bps:g} bps"),
        ]
    if result.cache_hit:
        facts.append(("cache", "served from the result cache"))
    facts.append(
        (
            "drawn",
            f"lines thinned to at most {LINE_POINTS:,} points (each stretch's low and high);"
            " every trade marked",
        )
    )
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts)
    return (
        f"<h1>Backtest <code>{_esc(result.backtest_id)}</code></h1>"
        f'<table class="facts">{rows}</table>'
    )


def _spec(spec: Mapping[str, Any]) -> str:
    name = spec.get("builtin") or spec.get("class") or "?"
    params = ", ".join(f"{k}={v!r}" for k, v in spec.get("params", {}).items())
    return f"{name}({params})"


def _errors(result: BacktestResult) -> str:
    if not result.errors:
        return ""
    items = []
    for error in result.errors:
        where = " ".join(x for x in (error.symbol, error.unit_id) if x)
        tail = f"<pre>{_esc(error.log_tail)}</pre>" if error.log_tail else ""
        items.append(
            f"<li><b>{_esc(error.kind)}</b> {_esc(where)}: {_esc(error.message)}{tail}</li>"
        )
    return _section("Errors", f'<ul class="errors">{"".join(items)}</ul>')


#: Each metric's label and how it is written: ``%`` a fraction, ``$`` money, ``x`` a ratio.
_METRICS = {
    "initial_cash": ("initial cash", "$"),
    "final_equity": ("final equity", "$"),
    "total_return": ("total return", "%"),
    "cagr": ("CAGR", "%"),
    "sharpe": ("Sharpe", "x"),
    "sortino": ("Sortino", "x"),
    "max_drawdown": ("max drawdown", "%"),
    "calmar": ("Calmar", "x"),
    "trade_count": ("trades", "n"),
    "win_rate": ("win rate", "%"),
    "profit_factor": ("profit factor", "x"),
    "expectancy": ("expectancy", "$"),
    "exposure": ("exposure", "%"),
    "fees_paid": ("fees paid", "$"),
    "rejected_entries": ("rejected entries", "n"),
}


def _metrics_table(metrics: Metrics | None) -> str:
    if metrics is None:
        return _note("No metrics: the backtest did not complete.")
    values = metrics.model_dump()
    rows = [(label, _format(values[key], kind)) for key, (label, kind) in _METRICS.items()]
    return _table(["metric", "value"], rows)


def _per_symbol_table(per_symbol: Mapping[str, SymbolMetrics]) -> str:
    if not per_symbol:
        return _note("No per-symbol metrics.")
    header = ["symbol", "trades", "win rate", "profit factor", "expectancy", "pnl", "fees"]
    header += ["exposure", "rejected"]
    rows = [
        (
            symbol,
            str(m.trade_count),
            _format(m.win_rate, "%"),
            _format(m.profit_factor, "x"),
            _format(m.expectancy, "$"),
            _format(m.pnl, "$"),
            _format(m.fees_paid, "$"),
            _format(m.exposure, "%"),
            str(m.rejected_entries),
        )
        for symbol, m in per_symbol.items()
    ]
    return _table(header, rows)


def _trades_table(trades: list[Trade]) -> str:
    if not trades:
        return _note("No trades.")
    header = ["#", "symbol", "entry (UTC)", "entry price", "exit (UTC)", "exit price"]
    header += ["quantity", "fees", "pnl", "exit reason"]
    rows = (
        (
            str(i),
            t.symbol,
            _time(t.entry_time),
            _num(t.entry_price),
            _time(t.exit_time),
            _num(t.exit_price),
            f"{t.quantity:.6g}",
            _format(t.fees, "$"),
            _format(t.pnl, "$"),
            t.exit_reason,
        )
        for i, t in enumerate(trades, 1)
    )
    return _table(header, rows, scroll=True)


def _table(header: list[str], rows: Iterable[tuple[str, ...]], *, scroll: bool = False) -> str:
    """Columns of numbers are right-aligned: all but those named in :data:`_TEXT_COLUMNS`."""
    numeric = [h not in _TEXT_COLUMNS for h in header]
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"num" if right else ""}">{_esc(cell)}</td>'
            for right, cell in zip(numeric, row, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table}</div>' if scroll else table


_TEXT_COLUMNS = frozenset({"metric", "symbol", "entry (UTC)", "exit (UTC)", "exit reason"})


def _format(value: float | None, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "%":
        return f"{value:.2%}"
    if kind == "n":
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def _num(price: float) -> str:
    """A price with the digits that matter, whether it is 30,000 or 0.0003."""
    return f"{price:,.6g}" if abs(price) < 1000 else f"{price:,.2f}"


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_esc(title)}</h2>{body}</section>"


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       margin: 0; background: #fafafa; }
main { max-width: 1280px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 12px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
section { background: #fff; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left;
         white-space: nowrap; }
thead th { position: sticky; top: 0; background: #f3f3f3; }
td.num { text-align: right; }
table.facts th { color: #666; font-weight: normal; }
table.facts td { white-space: normal; }
.scroll { max-height: 600px; overflow: auto; border: 1px solid #eee; }
.note { color: #666; font-style: italic; }
.errors pre { background: #f6f6f6; padding: 6px; overflow: auto; max-height: 200px; }
"""
