"""structlog set up once per process: JSON lines on stderr, with bound context.

Handlers bind ``backtest_id`` and ``unit_id`` so every line of a unit can be found.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info") -> None:
    # The standard library's loggers (the process sandbox's notice, aio-pika) get the same
    # threshold, so a level of "error" silences their warnings too.
    logging.getLogger().setLevel(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
