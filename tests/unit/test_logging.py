"""Every log line on stderr is one JSON object: structlog's, the standard library's (aio-pika,
the sandboxes) and warnings alike."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from shared.logging import configure


@pytest.fixture
def configured() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def lines(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines()]


def test_structlog_and_stdlib_lines_are_the_same_json(
    configured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("info")
    structlog.contextvars.bind_contextvars(service="symbol_worker")

    structlog.get_logger("x").info("consuming", queue="backtest.work")
    logging.getLogger("aio_pika.robust_connection").warning("Connection attempt to %s failed", "h")
    logging.getLogger("aiormq").debug("below the level: not written")

    ours, theirs = lines(capsys.readouterr().err)
    assert ours["event"] == "consuming" and ours["queue"] == "backtest.work"
    assert theirs["event"] == "Connection attempt to h failed"
    assert theirs["logger"] == "aio_pika.robust_connection"
    for line in (ours, theirs):
        assert line["service"] == "symbol_worker"
        assert {"level", "timestamp"} <= set(line)
    assert (ours["level"], theirs["level"]) == ("info", "warning")


def test_a_stdlib_traceback_and_a_warning_are_one_json_object_each(
    configured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("warning")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("shared.sandbox.docker").exception("could not remove container")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("left open", ResourceWarning, stacklevel=1)

    failed, warned = lines(capsys.readouterr().err)
    assert failed["event"] == "could not remove container" and failed["level"] == "error"
    assert "ValueError: boom" in failed["exception"]
    assert warned["logger"] == "py.warnings" and "left open" in warned["event"]


def test_configuring_twice_writes_each_line_once(
    configured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("info")
    configure("info")
    logging.getLogger("uvicorn.error").info("Started server process")
    assert len(lines(capsys.readouterr().err)) == 1
