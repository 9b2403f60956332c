"""``python -m services.gateway``: the HTTP API on ``STRATORCH_GATEWAY_HOST``/``_PORT``.

Wiring only: uvicorn serves :func:`services.gateway.app.create_app`. On SIGTERM uvicorn stops
accepting connections and gives open ones (event streams) ``STRATORCH_SHUTDOWN_GRACE_S``.
"""

from __future__ import annotations

import os
import sys

import structlog
import uvicorn

from services.gateway.app import create_app
from shared.logging import configure
from shared.settings import Settings, SettingsError


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level)
    structlog.contextvars.bind_contextvars(service="gateway", pid=os.getpid())
    try:
        app = create_app(settings)
    except RuntimeError as exc:  # settings that make serving pointless or unsafe: no tokens
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers propagate to the root: JSON, as every line
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        proxy_headers=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
