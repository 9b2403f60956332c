"""``python -m services.docker_proxy``: the Docker API proxy (:mod:`.proxy`) on a port,
until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import structlog

from services.docker_proxy.policy import Rules
from services.docker_proxy.proxy import DockerProxy
from shared.logging import configure
from shared.settings import Settings

_log = structlog.get_logger("docker_proxy")


async def run(rules: Rules, upstream: str, host: str, port: int) -> None:
    proxy = DockerProxy(rules, upstream)
    server = await proxy.serve(host, port)
    _log.info(
        "docker proxy listening",
        address=f"{host}:{port}",
        upstream=upstream,
        image=rules.image,
        runtime=rules.runtime,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        await proxy.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.docker_proxy", description=__doc__)
    parser.add_argument("--listen", default="0.0.0.0:2375", help="HOST:PORT to serve on")
    parser.add_argument("--upstream", default="/var/run/docker.sock", help="dockerd's unix socket")
    args = parser.parse_args(argv)
    settings = Settings()
    configure(settings.log_level)
    host, _, port = args.listen.rpartition(":")
    rules = Rules(image=settings.sandbox_image, runtime=settings.sandbox_runtime)
    asyncio.run(run(rules, args.upstream, host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
