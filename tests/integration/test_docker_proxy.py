"""The Docker API proxy in front of the real dockerd: a DockerSandbox runs strategies through
it as through the socket, and what would reach past the sandbox is refused."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest

from services.docker_proxy.policy import Rules
from services.docker_proxy.proxy import DockerProxy
from shared.sandbox.docker import RUNNER_LABEL, DockerSandbox, DockerUnavailable
from shared.sandbox.port import DEFAULT_LIMITS
from shared.strategy import ComponentRef
from tests.integration.docker_support import ROOT, bars, docker_up
from tests.integration.stack import free_port

pytestmark = pytest.mark.integration

#: The test image with the runner baked in, as in the production image: through the proxy a
#: sandbox cannot bind-mount the runner code.
IMAGE = "stratorch-sandbox:proxy-test"


@pytest.fixture(scope="module")
def image() -> str:
    base = docker_up().image
    with tempfile.TemporaryDirectory() as context:
        shutil.copytree(ROOT / "shared", Path(context) / "shared",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        (Path(context) / "Dockerfile").write_text(
            f"FROM {base}\nCOPY shared /opt/stratorch/shared\n"
            f"ENV PYTHONPATH=/opt/stratorch\nLABEL {RUNNER_LABEL}=/opt/stratorch\n"
        )
        subprocess.run(["docker", "build", "-q", "-t", IMAGE, context],
                       check=True, capture_output=True, timeout=300)  # fmt: skip
    return IMAGE


@contextlib.asynccontextmanager
async def serving(rules: Rules) -> AsyncIterator[str]:
    """A proxy with ``rules`` in front of this machine's dockerd; its DOCKER_HOST URL."""
    proxy = DockerProxy(rules, "/var/run/docker.sock")
    port = free_port()
    server = await proxy.serve("127.0.0.1", port)
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        server.close()
        await proxy.aclose()


@pytest.fixture
async def proxy_url(image: str) -> AsyncIterator[str]:
    async with serving(Rules(image=image)) as url:
        yield url


async def test_a_sandbox_runs_strategies_through_the_proxy(proxy_url: str, image: str) -> None:
    code = ComponentRef.from_json({"builtin": "sma_cross"})
    candles = {"BTCUSDT": (bars("BTCUSDT", 400), 100)}
    async with DockerSandbox(image=image, docker_url=proxy_url) as sandbox:
        info = await sandbox.describe(code, ["BTCUSDT"], session="s")
        got = await sandbox.signals(code, candles, interval="1h", session="s")
    async with DockerSandbox(image=image) as direct:  # the socket itself
        want = await direct.signals(code, candles, interval="1h")
    assert info.lookback == 51
    assert got == want and got["BTCUSDT"]["t"]


async def test_what_reaches_past_the_sandbox_is_refused(proxy_url: str, image: str) -> None:
    # A sandbox of another image (the proxy allows the test image only) cannot even start.
    with pytest.raises(DockerUnavailable, match="refused by the stratorch docker proxy"):
        async with DockerSandbox(image="stratorch:latest", docker_url=proxy_url) as other:
            await other.describe(ComponentRef.from_json({"builtin": "sma_cross"}), ["X"])

    created = subprocess.run(
        ["docker", "create", image, "true"], capture_output=True, text=True, check=True
    )
    outsider = created.stdout.strip()
    docker = aiodocker.Docker(url=proxy_url)
    try:
        hardened = DockerSandbox(image=image, mount_runner=False)._config(DEFAULT_LIMITS, None)
        for change in ({"Privileged": True}, {"Binds": ["/:/host:rw"]}, {"PidMode": "host"}):
            config = {**hardened, "HostConfig": {**hardened["HostConfig"], **change}}
            with pytest.raises(aiodocker.DockerError) as refused:
                await docker.containers.create(config)
            assert refused.value.status == 403 and next(iter(change)) in refused.value.message
        # A container that is not a sandbox cannot be inspected, killed or removed through it.
        container = docker.containers.container(outsider)
        for attempt in (container.show, container.kill, lambda: container.delete(force=True)):
            with pytest.raises(aiodocker.DockerError, match="not a sandbox container"):
                await attempt()
        with pytest.raises(aiodocker.DockerError) as gone:  # as dockerd says it
            await docker.containers.container("0" * 64).delete(force=True)
        assert gone.value.status == 404
        for path in ("images/json", "info?x=1", f"containers/{outsider}/exec"):
            with pytest.raises(aiodocker.DockerError) as refused:
                await docker._query_json(path, method="POST" if "exec" in path else "GET")
            assert refused.value.status == 403
    finally:
        await docker.close()
        subprocess.run(["docker", "rm", "-f", outsider], capture_output=True, check=False)


async def test_the_number_of_sandbox_containers_is_capped(image: str) -> None:
    code = ComponentRef.from_json({"builtin": "sma_cross"})
    async with serving(Rules(image=image, max_containers=0)) as url:
        with pytest.raises(DockerUnavailable, match=r"at most 0 at once"):
            async with DockerSandbox(image=image, docker_url=url) as sandbox:
                await sandbox.describe(code, ["BTCUSDT"])
