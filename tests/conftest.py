"""Fixtures shared by every test folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from shared.logging import StdlibHandler
from shared.messages import BacktestResult
from stratorch.cli import main

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "sma_cross.json"


@pytest.fixture(autouse=True)
def _logging_as_found() -> Iterator[None]:
    """``stratorch.cli.main`` configures logging for the whole process (``--quiet`` to level
    ``error``, handlers on the root logger); a test that runs it must not leave that to the
    next one, whose logs (or ``capture_logs``) would then miss everything below ``error``."""
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StdlibHandler)]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


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
