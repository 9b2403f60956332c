"""The HTML report: what ``stratorch run --report`` writes and ``GET /backtests/{id}/report``
serves, read as the page's HTML and the figures plotly draws from (the browser test,
``tests/integration/test_report_browser.py``, opens it in chromium)."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from services.gateway.app import create_app
from services.runtime import Context
from shared.bus import InMemoryBus
from shared.candles import ParquetCandleStore
from shared.messages import BacktestRequest, BacktestResult, Trade
from shared.ports import Ports
from shared.report import LINE_POINTS, PRICE_POINTS, render
from shared.sandbox.process import ProcessSandbox
from shared.settings import Settings
from shared.store import FileStore
from shared.tenancy import hash_token
from stratorch.cli import main
from stratorch.embedded import run_backtest
from stratorch.paths import SAMPLE_STORE
from tests.conftest import ROOT

REQUEST = {
    "id": "report-test",
    "strategy": {"builtin": "sma_cross", "params": {"fast": 5, "slow": 20}},
    "symbols": ["BTCUSDT", "ETHUSDT"],
    "interval": "1h",
    "start": "2021-03-01",
    "end": "2021-04-01",
    "portfolio": {"builtin": "fixed_fraction", "params": {"fraction": 0.5, "max_positions": 2}},
}
HOUR = 3_600_000


def figures(page: str) -> dict[str, list[dict[str, Any]]]:
    """Each chart's traces, by its div id, as given to ``Plotly.newPlot`` in the page."""
    body = page.split("</head>", 1)[1]  # past plotly.js itself
    decoder, found = json.JSONDecoder(), {}
    for call in re.finditer(r"Plotly\.newPlot\(\s*", body):
        div, end = decoder.raw_decode(body, call.end())
        found[div], _ = decoder.raw_decode(body, body.index("[", end))
    return found


def values(array: Any) -> np.ndarray:
    """A trace's array: plotly writes numpy arrays as base64 typed arrays."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    return np.asarray(array)


def trace(chart: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [found] = [t for t in chart if t.get("name") == name and t.get("visible", True)]
    return found


def table_rows(page: str, title: str) -> int:
    section = page.split(f"<h2>{title}", 1)[1].split("</section>", 1)[0]
    return section.count("<tr>") - 1  # less the header


def test_run_writes_a_self_contained_report_of_the_whole_result(tmp_path: Path) -> None:
    request, out, page_path = tmp_path / "request.json", tmp_path / "r.json", tmp_path / "r.html"
    request.write_text(json.dumps(REQUEST))
    code = main(["run", str(request), "--quiet", "--out", str(out), "--report", str(page_path)])
    result = BacktestResult.model_validate_json(out.read_bytes())
    assert code == 0 and result.metrics is not None
    page = page_path.read_text(encoding="utf-8")

    # Everything inline: no script, style or image to fetch.
    assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=|<link\b", page)
    assert "Plotly.newPlot" in page and page.count("<script") == 3  # plotly.js + 2 charts

    charts = figures(page)
    assert set(charts) == {"equity", "prices"}
    equity = trace(charts["equity"], "equity")
    assert values(equity["y"])[-1] == result.metrics.final_equity
    btc = [t for t in result.trades if t.symbol == "BTCUSDT"]
    entries = trace(charts["prices"], "entries")  # the first symbol's, shown first
    assert list(values(entries["x"])) == [t.entry_time for t in btc]
    assert list(values(entries["y"])) == [t.entry_price for t in btc]
    exits = trace(charts["prices"], "exits")
    assert list(values(exits["y"])) == [t.exit_price for t in btc]
    # The month's closes as they are (short enough to draw every one).
    bars = ParquetCandleStore(SAMPLE_STORE).read(
        "BTCUSDT", "1h", start_ms=1_614_556_800_000, end_ms=1_617_235_200_000
    )
    close = trace(charts["prices"], "BTCUSDT close")
    assert list(values(close["y"])) == list(bars["close"])

    assert f"{result.metrics.final_equity:,.2f}" in page
    assert table_rows(page, "Per symbol") == 2
    assert table_rows(page, f"Trades ({len(result.trades)})") == len(result.trades) > 0


def test_the_readme_example_writes_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (ROOT / "README.md").read_text()
    marker = readme.index("<!-- report-example")
    block = re.search(r"```sh\n(.*?)```", readme[marker:], re.DOTALL)
    assert block is not None
    [line] = block.group(1).splitlines()
    command, *args = shlex.split(line, comments=True)
    assert command == "stratorch"
    monkeypatch.chdir(tmp_path)  # where a user runs it: the report lands here
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    assert main(args) == 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert set(figures(page)) == {"equity", "prices"}
    assert table_rows(page, "Trades (423)") == 423  # the README's run


def test_a_rejected_run_writes_a_report_naming_its_errors(tmp_path: Path) -> None:
    request, page_path = tmp_path / "request.json", tmp_path / "r.html"
    request.write_text(json.dumps({**REQUEST, "symbols": ["NOSUCHUSDT"]}))
    code = main(["run", str(request), "--quiet", "--report", str(page_path)])
    page = page_path.read_text(encoding="utf-8")
    assert code == 1
    assert "no_data" in page and "NOSUCHUSDT" in page
    assert "No metrics: the backtest did not complete." in page


def long_result(bars: int, symbols: list[str], *, trades: int) -> tuple[BacktestResult, dict]:
    """A result over ``bars`` hourly bars of random-walk prices, with ``trades`` trades on
    each symbol, and the prices."""
    rng = np.random.default_rng(7)
    times = 1_600_000_000_000 + HOUR * np.arange(bars, dtype=np.int64)
    prices, made = {}, []
    for symbol in symbols:
        close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, bars)))
        prices[symbol] = pd.DataFrame({"open_time": times, "close": close})
        for entry in np.sort(rng.choice(bars - 10, trades, replace=False)):
            made.append(
                Trade(
                    symbol=symbol,
                    side="long",
                    entry_time=int(times[entry]),
                    entry_price=float(close[entry]),
                    exit_time=int(times[entry + 5]),
                    exit_price=float(close[entry + 5]),
                    quantity=1.0,
                    fees=0.2,
                    pnl=float(close[entry + 5] - close[entry]) - 0.2,
                    exit_reason="signal",
                )
            )
    curve_at = np.linspace(0, bars - 1, min(bars, 10_000)).astype(int)
    equity = 10_000 * np.exp(np.cumsum(rng.normal(0, 0.001, len(curve_at))))
    result = BacktestResult(
        backtest_id="long",
        status="completed",
        trades=made,
        equity_curve=[(int(times[i]), float(e)) for i, e in zip(curve_at, equity, strict=True)],
    )
    return result, prices


def test_a_100k_bar_report_draws_thinned_lines_and_every_trade() -> None:
    result, prices = long_result(100_000, ["AAAUSDT"], trades=2_000)
    page = render(result, prices)
    print(f"100k bars, 2,000 trades: {len(page.encode()) / 1e6:.1f} MB")
    assert len(page.encode()) < 8_000_000  # plotly.js is 4.8 MB of it

    charts = figures(page)
    for chart in charts.values():
        for t in chart:
            if t["mode"] == "lines":
                assert len(values(t["x"])) == len(values(t["y"])) <= LINE_POINTS
    close = trace(charts["prices"], "AAAUSDT close")
    x, y = values(close["x"]), values(close["y"])
    series = prices["AAAUSDT"]
    # Thinned to real points of the series, its extremes and both ends kept.
    assert np.all(np.diff(x) > 0) and np.isin(x, series["open_time"]).all()
    assert y.max() == series["close"].max() and y.min() == series["close"].min()
    assert (x[0], x[-1]) == (series["open_time"].iloc[0], series["open_time"].iloc[-1])
    # Every trade exactly.
    entries = trace(charts["prices"], "entries")
    assert list(values(entries["x"])) == [t.entry_time for t in result.trades]
    assert table_rows(page, "Trades (2,000)") == 2_000


def test_many_symbols_share_a_bounded_number_of_drawn_points() -> None:
    result, prices = long_result(5_000, [f"S{i:03d}USDT" for i in range(120)], trades=3)
    charts = figures(render(result, prices))
    lines = [t for t in charts["prices"] if t["mode"] == "lines"]
    assert len(lines) == 120
    assert sum(len(values(t["x"])) for t in lines) <= PRICE_POINTS
    markers = [t for t in charts["prices"] if t["mode"] == "markers"]
    assert sum(len(values(t["x"])) for t in markers) == 2 * len(result.trades)


# -- the gateway: GET /backtests/{id}/report -------------------------------------------------------

TOKENS = {"alice": "alice-report-token", "bob": "bob-report-token"}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


@contextlib.asynccontextmanager
async def gateway_on(store: FileStore) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway app in process over ``store`` and the bundled sample's candles."""
    tokens = ",".join(f"{tenant}:{hash_token(token)}" for tenant, token in TOKENS.items())
    candles = ParquetCandleStore(SAMPLE_STORE)

    @contextlib.asynccontextmanager
    async def resources(s: Settings) -> AsyncIterator[Context]:
        yield Context(s, bus=InMemoryBus(), store=store, candles=candles)  # type: ignore[arg-type]

    app = create_app(Settings(auth="tokens", api_tokens=tokens), resources=resources)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            yield http


async def test_the_gateway_serves_a_finished_backtests_report_to_its_tenant(
    tmp_path: Path,
) -> None:
    ran = FileStore(tmp_path / "run")  # a real run, as the stack stores it
    async with ProcessSandbox() as sandbox:
        ports = Ports(ParquetCandleStore(SAMPLE_STORE), sandbox, ran)
        result = await run_backtest(json.dumps(REQUEST).encode(), ports)
    assert result.status == "completed"
    plan = await ran.get_plan("report-test")
    assert plan is not None

    store = FileStore(tmp_path / "gateway")
    fingerprint = BacktestRequest.model_validate(REQUEST).fingerprint()
    for backtest_id in ("report-test", "running", "cached"):
        await store.accept(backtest_id, fingerprint, tenant="alice")
    await store.put_plan(plan)
    await store.finish(result)
    running = plan.request.model_copy(update={"id": "running"})
    await store.put_plan(plan.model_copy(update={"request": running}))
    await store.finish(result.model_copy(update={"backtest_id": "cached", "cache_hit": True}))

    async with gateway_on(store) as http:
        response = await http.get("/backtests/report-test/report", headers=auth("alice"))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/html")
        charts = figures(response.text)
        assert trace(charts["prices"], "BTCUSDT close")  # prices from the candle source
        assert table_rows(response.text, f"Trades ({len(result.trades)})") == len(result.trades)

        # A cache hit has no plan, so no request to read prices for: its trades alone.
        cached = await http.get("/backtests/cached/report", headers=auth("alice"))
        assert cached.status_code == 200 and "served from the result cache" in cached.text
        assert not [t for t in figures(cached.text)["prices"] if t["mode"] == "lines"]

        running = await http.get("/backtests/running/report", headers=auth("alice"))
        assert running.status_code == 409
        assert running.json()["detail"] == (
            "backtest 'running' is running: its report comes when it ends"
        )

        for tenant, backtest_id in (("bob", "report-test"), ("alice", "no-such-id")):
            missing = await http.get(f"/backtests/{backtest_id}/report", headers=auth(tenant))
            assert missing.status_code == 404
            assert missing.json()["detail"] == f"no backtest with id {backtest_id!r}"
        assert (await http.get("/backtests/report-test/report")).status_code == 401
