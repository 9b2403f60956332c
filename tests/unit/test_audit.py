"""``stratorch audit``: leaking strategies are caught naming their first changed bar, clean
ones pass, and a 100k-bar series is audited in seconds."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shared.candles import ParquetCandleStore
from shared.messages import BacktestRequest
from shared.sandbox import ProcessSandbox
from stratorch.audit import AuditReport, audit
from stratorch.cli import main
from stratorch.paths import SAMPLE_STORE
from tests.conftest import ROOT
from tests.unit.strategy._candles import make_candles

README = (ROOT / "README.md").read_text()


def vectorized(body: str) -> dict[str, Any]:
    """A strategy spec whose ``signals(df)`` computes ``buy`` (a boolean Series) by ``body``."""
    source = textwrap.dedent(
        """
        import numpy as np
        import pandas as pd
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            def signals(self, df):
                close = df["close"]
                {body}
                return pd.DataFrame({{"signal": np.where(buy, "BUY", "")}}, index=df.index)
        """
    ).format(body=body)
    return {"source": source, "class": "S"}


SHIFT = vectorized("buy = close.shift(-1) > close")
CENTRED = vectorized("buy = close > close.rolling(5, center=True).mean()")
NORMALISED = vectorized("buy = (close - close.mean()) / close.std() > 0.5")
CLEAN = vectorized("buy = close > close.rolling(5).mean().shift(1)")
PER_BAR = {
    "source": textwrap.dedent(
        """
        from shared.strategy import BaseStrategy

        class S(BaseStrategy):
            def decide(self, df, interval, **kw):
                return {"signal": "BUY"} if df["close"].iloc[-1] > 100 else None
        """
    ),
    "class": "S",
}


def request(strategy: object, **overrides: Any) -> BacktestRequest:
    fields = {
        "strategy": strategy,
        "symbols": ["BTCUSDT", "ETHUSDT"],
        "interval": "1h",
        "start": "2021-01-01",
        "end": "2021-04-01",
        **overrides,
    }
    return BacktestRequest.model_validate(fields)


async def run_audit(req: BacktestRequest, candles: Path = SAMPLE_STORE) -> AuditReport:
    async with ProcessSandbox() as sandbox:
        return await audit(req, ParquetCandleStore(candles), sandbox)


def first_buy(symbol: str, req: BacktestRequest) -> pd.Timestamp:
    """Where the shift(-1) strategy's first signal is: the first bar whose next close is
    higher, computed here on the sample candles."""
    frame = pd.read_parquet(SAMPLE_STORE / "1h" / f"{symbol}.parquet")
    frame = frame[frame["open_time"] >= req.start_ms]
    buy = frame["close"].shift(-1) > frame["close"]
    return int(frame["open_time"][buy].iloc[0])


@pytest.mark.parametrize(
    "strategy", [SHIFT, CENTRED, NORMALISED], ids=["shift", "centred", "normalised"]
)
async def test_a_leaking_strategy_is_found_naming_its_first_bar(strategy: object) -> None:
    req = request(strategy)
    report = await run_audit(req)
    assert not report.clean and report.exit_code == 1
    for found in report.symbols:
        assert found.changes, found.symbol
        first = found.changes[0]
        assert first.t == min(c.t for c in found.changes)
        assert first.t <= first.cut and first.full != first.truncated
        if strategy is SHIFT:  # its first signal exists only with the next bar
            assert first.t == first_buy(found.symbol, req)
            assert (first.full, first.truncated) == ("BUY", "hold")


@pytest.mark.parametrize("strategy", ["sma_cross", CLEAN], ids=["sma_cross", "custom"])
async def test_a_clean_strategy_passes(strategy: object) -> None:
    report = await run_audit(request(strategy))
    assert report.clean and report.exit_code == 0 and report.note == ""
    for found in report.symbols:
        assert len(found.cuts) > 10  # it did cut prefixes


async def test_a_per_bar_strategy_is_clean_by_construction() -> None:
    report = await run_audit(request(PER_BAR))
    assert report.clean and "decide()" in report.note and report.symbols == []


def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: object) -> tuple[int, str, str]:
    path = tmp_path / "request.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    code = main(["audit", str(path), "--sandbox", "process"])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_exits_1_naming_the_first_changed_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    req = request(SHIFT, symbols=["BTCUSDT"])
    code, out, _ = cli(tmp_path, capsys, req.model_dump(mode="json", by_alias=True))
    first = pd.Timestamp(first_buy("BTCUSDT", req), unit="ms")
    assert code == 1
    assert "BTCUSDT: look-ahead" in out and f"the first {first:%Y-%m-%d %H:%M}" in out
    assert "prefixes" in out and "look-ahead found in" in out


def test_the_cli_exits_0_when_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(
        tmp_path, capsys, request("sma_cross").model_dump(mode="json", by_alias=True)
    )
    assert code == 0
    assert "BTCUSDT: clean" in out and "ETHUSDT: clean" in out and "no look-ahead found" in out


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("{not json", "rejected"),
        (
            {
                "strategy": "sma_crosss",
                "symbols": ["BTCUSDT"],
                "interval": "1h",
                "start": "2021-01-01",
                "end": "2021-02-01",
            },
            "did you mean 'sma_cross'",
        ),
        (
            {
                "strategy": "sma_cross",
                "symbols": ["NOPEUSDT"],
                "interval": "1h",
                "start": "2021-01-01",
                "end": "2021-02-01",
            },
            "NOPEUSDT",
        ),
    ],
    ids=["malformed", "unknown-strategy", "no-candles"],
)
def test_the_cli_exits_2_on_a_bad_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: object, words: str
) -> None:
    code, out, err = cli(tmp_path, capsys, body)
    assert code == 2 and "audit failed" in err and words in err and out == ""


def test_the_cli_exits_2_when_the_request_file_is_missing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["audit", "/nonexistent/request.json", "--sandbox", "process"]) == 2
    assert "cannot read the request" in capsys.readouterr().err


async def test_a_100k_bar_series_is_audited_in_seconds(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    frame = make_candles(100.0 * np.exp(np.cumsum(rng.normal(0, 0.002, 100_000))))
    ParquetCandleStore(tmp_path).write("SYNUSDT", "1h", frame)
    req = request("sma_cross", symbols=["SYNUSDT"], start="2021-01-01", end="2033-01-01")
    report = await run_audit(req, tmp_path)
    [found] = report.symbols
    print(f"100k bars: {len(found.cuts)} prefixes audited in {report.elapsed_s:.2f} s")
    assert found.bars == 100_000 and report.clean


def test_the_readme_example_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    section = README.split("\n## Auditing for look-ahead", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        args = command.split()
        assert args[0] == "stratorch"
        code = main(args[1:])
        assert f"exit {code}" in comment, line
    capsys.readouterr()
