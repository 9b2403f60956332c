"""README sentences that name a fact of the code or the repository, checked against it."""

from __future__ import annotations

import re
import tomllib

import pandas as pd
import pytest

from shared import topology
from shared.messages import BacktestRequest
from stratorch.paths import SAMPLE_STORE
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 4)
    return README[start : end if end >= 0 else None]


def test_the_complete_client_listing_is_the_example_file() -> None:
    listing = re.search(r"A complete client.*?```python\n(.*?)```", README, re.DOTALL)
    assert listing is not None
    assert listing.group(1) == (ROOT / "examples" / "publish_request.py").read_text()


def test_every_queue_with_a_delivery_limit_says_so() -> None:
    table = section("The real stack")
    for queue in topology.QUEUES:
        [row] = [line for line in table.splitlines() if line.startswith(f"| `{queue.exchange}` |")]
        limit = queue.arguments.get("x-delivery-limit")
        dead = queue.arguments.get("x-dead-letter-exchange")
        said = f"delivery limit {limit} → `{dead}`" if dead else f"delivery limit {limit}, then"
        assert (said in row) == (limit is not None), (queue.name, row)


def test_the_python_version_is_the_packages() -> None:
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert wanted == ">=3.11" and "Python 3.11 or newer" in README


def test_the_design_is_in_the_repository() -> None:
    assert "../shared" not in README and "DESIGN.md" not in README
    assert "(docs/design.md)" in README and (ROOT / "docs" / "design.md").is_file()


def test_the_samples_empty_columns_are_as_documented() -> None:
    columns = ("quote_volume", "trades", "taker_buy_base", "taker_buy_quote")
    assert "`quote_volume`, `trades`,\n`taker_buy_base` and `taker_buy_quote` are all 0" in README
    for path in sorted(SAMPLE_STORE.glob("1h/*.parquet")):
        frame = pd.read_parquet(path, columns=list(columns))
        assert (frame == 0).all().all(), path.name


@pytest.mark.parametrize(
    ("symbols", "words"),
    [
        (["btcusdt"], ["symbols.0", "^[A-Z0-9]{2,20}$"]),
        ([f"S{i:04d}" for i in range(1001)], ["symbols", "at most 1000"]),
    ],
)
def test_the_symbol_rules_are_as_documented(symbols: list[str], words: list[str]) -> None:
    assert "each matches `^[A-Z0-9]{2,20}$` (upper case); 1 to 1,000 of them" in README
    request = {
        "strategy": "sma_cross",
        "symbols": symbols,
        "interval": "1h",
        "start": "2021-01-01",
        "end": "2021-02-01",
    }
    with pytest.raises(ValueError) as caught:
        BacktestRequest.model_validate(request)
    for word in words:
        assert word in str(caught.value)
    BacktestRequest.model_validate({**request, "symbols": [f"S{i:04d}" for i in range(1000)]})
