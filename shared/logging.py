"""structlog set up once per process: JSON lines on stderr, with bound context.

Handlers bind ``backtest_id`` and ``unit_id`` so every line of a unit can be found.

Standard-library logging (aio-pika, aiormq, uvicorn, the sandboxes' own ``logging`` lines)
and ``warnings`` go through the same renderer, so stderr holds nothing but one JSON object
per line, whoever logged it. Both write to whatever ``sys.stderr`` is at the moment of writing,
not the one there was at :func:`configure` time (a test capturing stderr sees the lines).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO, cast

import structlog
from structlog.typing import Processor

__all__ = ["StdlibHandler", "configure"]

#: What every line gets, whether structlog or the standard library logged it.
_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


class _Stderr:
    """A file that writes to the current ``sys.stderr``."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class StdlibHandler(logging.StreamHandler[_Stderr]):
    """The handler :func:`configure` puts on the root logger (so a second call replaces it)."""


def configure(level: str = "info") -> None:
    """Log JSON lines at ``level`` (``debug``, ``info``, ``warning``, ``error``) and above to
    stderr, from structlog and the standard library alike; calling it again reconfigures."""
    number = logging.getLevelNamesMapping()[level.upper()]
    stderr = _Stderr()
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, stderr)),  # write, flush
        # Not cached: a module's logger then follows a later configure() (a second call, or
        # structlog.testing.capture_logs in tests) instead of keeping the first setup forever.
        # The cost is a few microseconds per line, at our handful of lines per message.
        cache_logger_on_first_use=False,
    )
    handler = StdlibHandler(stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)
    logging.captureWarnings(True)
