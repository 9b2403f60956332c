"""Fixtures shared by every test folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.messages import BacktestResult
from stratorch.cli import main

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "sma_cross.json"


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., tuple[int, BacktestResult]]:
    """Run ``stratorch run`` on a request (a dict, or raw bytes) and read back its result."""
    counter = iter(range(1_000))

    def run(request: dict[str, Any] | bytes, *args: str) -> tuple[int, BacktestResult]:
        n = next(counter)
        path = tmp_path / f"request{n}.json"
        path.write_bytes(request if isinstance(request, bytes) else json.dumps(request).encode())
        out = tmp_path / f"result{n}.json"
        code = main(["run", str(path), "--out", str(out), "--quiet", *args])
        return code, BacktestResult.model_validate_json(out.read_bytes())

    return run
