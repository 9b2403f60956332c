"""The HTML report in a real headless browser (Debian's chromium), offline: it loads with no
console error and without asking the network for anything, its charts draw, and a screenshot
of it is taken (``<pytest tmp dir>/.../report.png``)."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.synthetic import synthetic
from shared.candles import ParquetCandleStore
from shared.messages import BacktestResult
from shared.report import LINE_POINTS
from stratorch.cli import main
from tests.conftest import EXAMPLE
from tests.integration import client
from tests.integration.browser import Chromium, find_chromium
from tests.integration.conftest import unavailable
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

MINUTE = 60_000

#: Each chart on the page: what it draws, by trace (name, mode, points, visible). A trace's
#: arrays are in the page as plotly's typed-array encoding (base64), hidden ones undecoded.
CHARTS = """
(() => {
const sizes = {f8: 8, f4: 4, i4: 4, u4: 4, i2: 2, u2: 2, i1: 1, u1: 1};
const count = x => x.bdata ? atob(x.bdata).length / sizes[x.dtype] : x.length;
return [...document.querySelectorAll('.js-plotly-plot')].map(plot => ({
  id: plot.id,
  svg: plot.querySelectorAll('.main-svg').length,
  drawnLines: plot.querySelectorAll('.scatterlayer .trace path.js-line').length,
  drawnMarkers: plot.querySelectorAll('.scatterlayer .trace .points path.point').length,
  traces: plot.data.map(t => ({
    name: t.name, mode: t.mode, points: count(t.x), visible: t.visible !== false})),
}));
})()
"""


@pytest.fixture(scope="session")
def chromium() -> str:
    try:
        return find_chromium()
    except RuntimeError as exc:
        unavailable(f"no headless browser for the report's test: {exc}")


Run = Callable[..., tuple[BacktestResult, Path]]


@pytest.fixture
def run_with_report(tmp_path: Path) -> Run:
    """``stratorch run REQUEST --report FILE.html`` as a user runs it (it runs an event loop of
    its own: call it in a thread); the result and the report."""

    def run(request: dict[str, Any], *args: str) -> tuple[BacktestResult, Path]:
        path, out, page = tmp_path / "request.json", tmp_path / "result.json", tmp_path / "r.html"
        path.write_text(json.dumps(request))
        code = main(["run", str(path), "--quiet", "--out", str(out), "--report", str(page), *args])
        result = BacktestResult.model_validate_json(out.read_bytes())
        assert code == 0, result.errors
        return result, page

    return run


async def test_the_sample_report_loads_offline_and_draws_every_chart(
    chromium: str, run_with_report: Run, tmp_path: Path
) -> None:
    result, page = await asyncio.to_thread(run_with_report, json.loads(EXAMPLE.read_text()))
    trades = {s: sum(t.symbol == s for t in result.trades) for s in result.per_symbol}

    async with Chromium(chromium, tmp_path / "profile") as browser:
        await browser.open(page.as_uri())
        charts = {c["id"]: c for c in await browser.evaluate(CHARTS)}
        rows = await browser.evaluate("document.querySelectorAll('section tbody tr').length")
        shot = await browser.screenshot(tmp_path / "report.png")

        assert browser.errors == []
        assert browser.requests == [page.as_uri()]  # nothing but the file itself

        equity, prices = charts["equity"], charts["prices"]
        assert equity["svg"] > 0 and equity["drawnLines"] == 2  # equity, drawdown
        assert all(0 < t["points"] <= LINE_POINTS for t in equity["traces"])
        # BTCUSDT is shown first: its close, and a marker at each entry and exit.
        assert prices["svg"] > 0 and prices["drawnLines"] == 1
        assert prices["drawnMarkers"] == 2 * trades["BTCUSDT"]
        # The menu's ETHUSDT entry shows ETHUSDT's, and only those.
        await browser.evaluate(
            """(() => { const plot = document.getElementById('prices');
                 const eth = plot.layout.updatemenus[0].buttons.find(b => b.label == 'ETHUSDT');
                 return Plotly.update(plot, eth.args[0], eth.args[1]).then(() => true); })()"""
        )
        [prices] = [c for c in await browser.evaluate(CHARTS) if c["id"] == "prices"]
        assert prices["drawnMarkers"] == 2 * trades["ETHUSDT"]
        shown = {t["name"] for t in prices["traces"] if t["visible"]}
        assert shown == {"ETHUSDT close", "entries", "exits"}
        assert browser.errors == []

    # The metrics, the per-symbol breakdown and every trade are listed.
    assert rows == 15 + len(result.per_symbol) + len(result.trades)
    assert_drawn_png(shot)


async def test_a_100k_bar_report_draws_bounded_lines_and_every_trade(
    chromium: str, run_with_report: Run, tmp_path: Path
) -> None:
    candles = ParquetCandleStore(tmp_path / "candles")
    for seed, symbol in enumerate(["AAAUSDT", "BBBUSDT"]):
        bars = synthetic(100_000, seed, step_ms=MINUTE, sigma=0.001, spread=0.0007)
        candles.write(symbol, "1m", bars)
    request = {
        "strategy": {"builtin": "sma_cross"},
        "symbols": ["AAAUSDT", "BBBUSDT"],
        "interval": "1m",
        "start": "2021-01-01",
        "end": "2022-01-01",
        "portfolio": {"builtin": "fixed_fraction", "params": {"fraction": 0.5, "max_positions": 2}},
    }
    result, page = await asyncio.to_thread(run_with_report, request, "--store", str(candles.root))
    first = sum(t.symbol == "AAAUSDT" for t in result.trades)
    assert first > 500  # enough to matter

    size = page.stat().st_size
    print(f"100k-bar report: {size / 1e6:.1f} MB, {len(result.trades)} trades")
    assert size < 10_000_000  # plotly.js is 4.8 MB of it

    async with Chromium(chromium, tmp_path / "profile") as browser:
        seconds = await browser.open(page.as_uri())
        print(f"loaded in {seconds:.1f} s")
        charts = {c["id"]: c for c in await browser.evaluate(CHARTS)}
        await browser.screenshot(tmp_path / "report-100k.png")
        assert browser.errors == []

    for chart in charts.values():
        for trace in chart["traces"]:
            if trace["mode"] == "lines":
                assert trace["points"] <= LINE_POINTS, (chart["id"], trace)
    close = next(t for t in charts["prices"]["traces"] if t["name"] == "AAAUSDT close")
    assert close["points"] > LINE_POINTS // 2  # thinned, not dropped
    assert charts["prices"]["drawnMarkers"] == 2 * first  # every trade, exactly


async def test_the_gateway_serves_the_report_of_a_backtest_on_the_stack(
    stack: Stack, chromium: str, tmp_path: Path
) -> None:
    """The real gateway, its prices read from the stack's Mongo candles."""
    request = client.request(symbols=["BTCUSDT", "ETHUSDT"], initial_cash=12_345)  # not cached
    url = f"/backtests/{request['id']}"
    assert stack.gateway_url is not None
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60, trust_env=False) as http:
        assert (await http.post("/backtests", json=request)).status_code == 202
        early = await http.get(f"{url}/report")
        assert early.status_code == 409 and "its report comes when it ends" in early.text
        deadline = time.monotonic() + 300
        while (status := (await http.get(url)).json())["result"] is None:
            assert time.monotonic() < deadline, f"no result in 300 s: {status}"
            await asyncio.sleep(0.5)
        response = await http.get(f"{url}/report")
    assert response.status_code == 200, response.text
    result = BacktestResult.model_validate_json(json.dumps(status["result"]))
    assert result.status == "completed"
    page = tmp_path / "from-the-gateway.html"
    page.write_text(response.text, encoding="utf-8")

    async with Chromium(chromium, tmp_path / "profile") as browser:
        await browser.open(page.as_uri())
        [prices] = [c for c in await browser.evaluate(CHARTS) if c["id"] == "prices"]
        await browser.screenshot(tmp_path / "from-the-gateway.png")
        assert browser.errors == []
    close = next(t for t in prices["traces"] if t["name"] == "BTCUSDT close")
    assert close["points"] == 31 * 24  # May 2021, every hour
    assert prices["drawnMarkers"] == 2 * sum(t.symbol == "BTCUSDT" for t in result.trades) > 0


def assert_drawn_png(path: Path) -> None:
    """``path`` is a PNG with something drawn on it: many distinct colours, not a blank page."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks: dict[bytes, bytes] = {}
    idat, offset = b"", 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        chunks[kind] = body
        idat += body if kind == b"IDAT" else b""
        offset += 12 + length
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    assert width >= 800 and height >= 1500, (width, height)
    pixels = zlib.decompress(idat)
    assert len(set(pixels)) > 64, "the screenshot is (nearly) blank"
