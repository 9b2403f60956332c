"""compose.yaml, validated and run for real.

The config tests read ``compose.yaml`` as compose resolves it. The stack test runs the README's
compose quickstart, line for line, on this machine's dockerd: no image registry is reachable,
so ``compose.test.yaml`` is added to ``COMPOSE_FILE`` (it swaps the pulled images for the
stand-ins of ``scripts/build-standins.sh``, nothing else) and ports and the project name come
from the environment, so the stack cannot clash with the shared servers or another run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.integration import client
from tests.integration.docker_support import _script, unavailable
from tests.integration.stack import free_port

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
SAMPLE = ROOT / "stratorch" / "sample" / "1h"
APP_SERVICES = ("gateway", "scheduler", "symbol_worker", "portfolio_sim")

pytestmark = pytest.mark.integration


def compose_command() -> list[str]:
    """``docker compose`` (v2) if this docker has it, else ``docker-compose`` (1.29)."""
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if v2.returncode == 0:
        return ["docker", "compose"]
    if (v1 := shutil.which("docker-compose")) is not None:
        return [v1]
    unavailable(
        "neither `docker compose` nor docker-compose is installed (scripts/start-docker.sh)"
    )


@pytest.fixture(scope="module")
def config() -> dict:
    out = subprocess.run(
        [*compose_command(), "-f", str(ROOT / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_the_stack_has_every_service_with_healthchecks_and_start_order(config: dict) -> None:
    services = config["services"]
    for name in ("mongo1", "mongo2", "mongo-init", "rabbitmq", "docker-proxy", *APP_SERVICES):
        assert name in services, name
    for name in ("mongo1", "mongo2", "rabbitmq", "gateway", "docker-proxy"):
        assert "healthcheck" in services[name], name
    for name in APP_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["rabbitmq"]["condition"] == "service_healthy"
        assert deps["mongo-init"]["condition"] == "service_completed_successfully"
    for name in ("scheduler", "symbol_worker"):
        assert services[name]["depends_on"]["docker-proxy"]["condition"] == "service_healthy"
    assert "container_name" not in services["symbol_worker"]  # scalable: --scale symbol_worker=N
    assert (
        "rabbitmq:3" in services["rabbitmq"]["image"]
        and "management" in services["rabbitmq"]["image"]
    )
    assert services["mongo1"]["image"].startswith("mongo:")  # the real images, not stand-ins


def test_candles_are_read_from_the_secondary_by_a_read_only_user(config: dict) -> None:
    env = config["services"]["symbol_worker"]["environment"]
    assert "readPreference=secondaryPreferred" in env["STRATORCH_CANDLES_MONGO_URL"]
    assert "replicaSet=rs0" in env["STRATORCH_MONGO_URL"]
    init = " ".join(config["services"]["mongo-init"]["command"])
    assert "rs.initiate" in init and '"read"' in init


def test_least_privilege_only_the_gateway_is_published_only_the_proxy_has_dockerd(
    config: dict,
) -> None:
    services = config["services"]
    assert [name for name, s in services.items() if s.get("ports")] == ["gateway"]
    holders = [
        name
        for name, s in services.items()
        if any("docker.sock" in str(v) for v in s.get("volumes", []))
    ]
    assert holders == ["docker-proxy"]
    for name in APP_SERVICES:
        service = services[name]
        assert str(service["user"]).split(":")[0] == "10000", name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
    for name in ("scheduler", "symbol_worker"):
        assert services[name]["environment"]["DOCKER_HOST"] == "tcp://docker-proxy:2375"
        assert "docker-api" in services[name]["networks"]
    for name in ("gateway", "portfolio_sim"):
        assert "docker-api" not in services[name].get("networks", {"default": None})
    assert config["networks"]["docker-api"]["internal"] is True
    proxy_env = services["docker-proxy"]["environment"]
    assert not any("URL" in key for key in proxy_env), "the proxy needs no broker/db secrets"


# -- the stack, up for real -------------------------------------------------------------------


def quickstart() -> list[str]:
    """The README's compose quickstart: the shell block after its marker comment."""
    text = README.read_text()
    marker = text.index("<!-- compose-quickstart")
    block = re.search(r"```sh\n(.*?)```", text[marker:], re.DOTALL)
    assert block is not None, "no ```sh block after the compose-quickstart marker"
    return block.group(1).splitlines()


def write_binance_files(directory: Path, symbols: list[str], months: list[str]) -> None:
    """The bundled sample's bars as Binance's monthly kline CSVs (12 columns, no header)."""
    for symbol in symbols:
        frame = pd.read_parquet(SAMPLE / f"{symbol}.parquet")
        month_of = pd.to_datetime(frame["open_time"], unit="ms", utc=True).dt.strftime("%Y-%m")
        for month in months:
            rows = frame[month_of == month].drop(columns=["time"], errors="ignore").copy()
            rows["ignore"] = 0
            rows.to_csv(directory / f"{symbol}-1h-{month}.csv", header=False, index=False)


def project_leftovers(project: str) -> dict[str, list[str]]:
    """Containers, networks and volumes dockerd still has of the compose project."""
    label = f"label=com.docker.compose.project={project}"
    found = {}
    for kind, command in (
        ("containers", ["docker", "ps", "-aq", "--filter", label]),
        ("networks", ["docker", "network", "ls", "-q", "--filter", label]),
        ("volumes", ["docker", "volume", "ls", "-q", "--filter", label]),
    ):
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
        found[kind] = out.stdout.split()
    return found


def sandboxes_of(hostnames: list[str]) -> list[str]:
    """Sandbox containers created by the given worker containers (their owner label starts
    with the creating container's hostname: its short id)."""
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", "label=org.stratorch.sandbox=1", "--format",
         '{{.ID}} {{.Label "org.stratorch.sandbox.owner"}}'],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return [
        line.split()[0]
        for line in out.stdout.splitlines()
        if any(line.split(" ", 1)[-1].startswith(f"{host}/") for host in hostnames)
    ]


class Compose:
    """The quickstart's environment: the stand-ins added, ports and project name our own."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.command = compose_command()
        self.project = f"stratorch-ct-{uuid.uuid4().hex[:8]}"
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "GATEWAY_PORT": str(free_port()),
            "MONGO_PORT": str(free_port()),
            "RABBITMQ_PORT": str(free_port()),
            "RABBITMQ_UI_PORT": str(free_port()),
            # `stratorch` is this interpreter's (a user's venv)
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }

    def script(self, lines: list[str]) -> str:
        """The README's lines as they run here: the stand-ins appended to ``COMPOSE_FILE``
        (with the repo's paths, so the project directory is the repo), ``docker compose``
        as this machine has it, and a timestamp on every command traced."""
        out = ["set -euo pipefail", "PS4='+ $(date +%s.%N) '", "set -x"]
        for line in lines:
            if found := re.match(r"export COMPOSE_FILE=(\S+)", line):
                files = [*found.group(1).split(":"), "compose.test.yaml"]
                line = "export COMPOSE_FILE=" + ":".join(str(ROOT / f) for f in files)
            out.append(line.replace("docker compose ", " ".join(self.command) + " "))
        return "\n".join(out) + "\n"

    def run(self, lines: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", self.script(lines)],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def compose(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        files = ":".join(
            str(ROOT / f) for f in ("compose.yaml", "compose.ports.yaml", "compose.test.yaml")
        )
        return subprocess.run(
            [*self.command, *args],
            cwd=self.workdir,
            env={**self.env, "COMPOSE_FILE": files},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def containers(self) -> dict[str, dict]:
        """Every container of the project, by name, as ``docker inspect`` gives it, with
        its compose service as ``"service"``."""
        ids = project_leftovers(self.project)["containers"]
        if not ids:
            return {}
        out = subprocess.run(
            ["docker", "inspect", *ids], capture_output=True, text=True, check=True, timeout=60
        )
        return {
            c["Name"].lstrip("/"): {
                **c,
                "service": c["Config"]["Labels"]["com.docker.compose.service"],
            }
            for c in json.loads(out.stdout)
        }


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    _script("start-docker.sh")  # dockerd, docker-compose
    _script("build-standins.sh", STRATORCH_STANDIN_PYTHON=sys.executable)
    workdir = tmp_path_factory.mktemp("compose-quickstart")
    (workdir / "examples").symlink_to(ROOT / "examples")
    write_binance_files(workdir, ["BTCUSDT", "ETHUSDT"], ["2021-04", "2021-05"])
    stack = Compose(workdir)
    try:
        yield stack
    finally:  # whatever happened: nothing of ours stays on the shared dockerd
        workers = [c["Config"]["Hostname"] for c in stack.containers().values()]
        stack.compose("down", "-v", "--remove-orphans")
        for sandbox in sandboxes_of(workers):
            subprocess.run(["docker", "rm", "-f", sandbox], capture_output=True, check=False)


def step_times(trace: str) -> list[tuple[float, str]]:
    """``(time, command)`` of each command bash traced (PS4 carries the time)."""
    return [
        (float(m.group(1)), m.group(2))
        for m in re.finditer(r"^\++ (\d+\.\d+) (.*)$", trace, re.MULTILINE)
    ]


@pytest.mark.timeout(1800)  # a cold build of the stand-ins and both images: a few minutes
def test_the_readme_quickstart_runs_the_stack_and_answers_like_stratorch_run(
    compose: Compose,
) -> None:
    lines = quickstart()
    [down] = [i for i, line in enumerate(lines) if re.match(r"docker compose down\b", line)]
    assert down == len(lines) - 1, "the quickstart ends with `docker compose down -v`"

    started = time.monotonic()
    done = compose.run(lines[:down], timeout_s=1500)
    assert done.returncode == 0, (
        f"the quickstart failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )

    # Every healthcheck passes (a container that came up last may not have been probed yet:
    # the gateway answered the quickstart's curl before its first 10 s interval was up); the
    # one-shot services finished cleanly; two workers run.
    probed_by = time.monotonic() + 90
    while True:
        containers = compose.containers()
        states = [info["State"] for info in containers.values()]
        health = [state["Health"]["Status"] for state in states if "Health" in state]
        if all(status == "healthy" for status in health) or time.monotonic() > probed_by:
            break
        time.sleep(2)
    for name, info in containers.items():
        state = info["State"]
        if "Health" in state:
            assert state["Health"]["Status"] == "healthy", (name, state["Health"]["Log"][-1:])
        elif not state["Running"]:
            assert state["ExitCode"] == 0, (name, state)
    assert [c["service"] for c in containers.values()].count("symbol_worker") == 2
    for name, info in containers.items():
        if info["service"] in APP_SERVICES:
            assert info["Config"]["User"].startswith("10000"), name
            assert info["HostConfig"]["ReadonlyRootfs"] is True, name
    published = sorted(c["service"] for c in containers.values() if c["HostConfig"]["PortBindings"])
    assert published == ["gateway", "mongo1", "rabbitmq"]  # the last two: compose.ports.yaml

    # The events ended with `finished`; the stack's result is `stratorch run`'s.
    events = [
        json.loads(line.removeprefix("data:"))
        for line in done.stdout.splitlines()
        if line.startswith("data:")
    ]
    assert [e["type"] for e in events][-1] == "finished" and events[-1]["status"] == "completed"
    assert [e["units_done"] for e in events if e["type"] == "unit_done"] == [1, 2]
    status = json.loads((compose.workdir / "status.json").read_text())
    local = json.loads((compose.workdir / "local.json").read_text())
    assert status["status"] == "completed" and local["status"] == "completed"
    assert status["result"]["trades"], "a backtest without trades proves little"
    for field in ("metrics", "per_symbol", "trades", "equity_curve", "wal"):
        assert status["result"][field] == local[field], field
    assert client.comparable(status["result"]) == client.comparable(local)

    times = step_times(done.stderr)
    up = next(t for t, cmd in times if " up -d" in cmd)
    result = next(
        t
        for t, cmd in times
        if "/backtests/quickstart >" in cmd or cmd.endswith("/backtests/quickstart")
    )
    print(
        f"\ncompose quickstart: up -> first result {result - up:.1f} s; "
        f"whole block {time.monotonic() - started:.1f} s"
    )

    # A worker's credentials (its DOCKER_HOST) cannot start a privileged container or mount /.
    refused = compose.compose("exec", "-T", "symbol_worker", "python", "-c", PROBE)
    assert refused.returncode == 0, refused.stderr
    answers = json.loads(refused.stdout.strip().splitlines()[-1])
    assert answers["privileged"].startswith("403") and "Privileged" in answers["privileged"]
    assert answers["host_root"].startswith("403") and "Binds" in answers["host_root"]
    assert answers["other_image"].startswith("403") and "image" in answers["other_image"]
    # The gateway is not even on the proxy's network.
    unreachable = compose.compose(
        "exec", "-T", "gateway", "python", "-c",
        "import socket; socket.create_connection(('docker-proxy', 2375), timeout=5)",
    )  # fmt: skip
    assert unreachable.returncode != 0

    workers = [
        c["Config"]["Hostname"]
        for n, c in containers.items()
        if "symbol_worker" in n or "scheduler" in n
    ]
    down_done = compose.run([lines[0], lines[down]], timeout_s=300)
    assert down_done.returncode == 0, down_done.stderr[-3000:]
    assert project_leftovers(compose.project) == {"containers": [], "networks": [], "volumes": []}
    assert sandboxes_of(workers) == [], "the workers left sandbox containers behind"


#: Run in a worker container: what its Docker credentials get for three forbidden requests,
#: each otherwise the sandbox's own hardened configuration.
PROBE = """
import asyncio, json, aiodocker

HARDENED = {
    "Image": "stratorch-sandbox:latest", "User": "10001:10001", "NetworkDisabled": True,
    "Labels": {"org.stratorch.sandbox": "1"}, "Cmd": ["true"],
    "HostConfig": {
        "NetworkMode": "none", "ReadonlyRootfs": True, "IpcMode": "none",
        "CgroupnsMode": "private", "CapDrop": ["ALL"], "SecurityOpt": ["no-new-privileges"],
        "PidsLimit": 64, "Memory": 2**28, "MemorySwap": 2**28, "NanoCpus": 10**9,
        "LogConfig": {"Type": "none", "Config": {}},
    },
}

def hardened_but(**host_config):
    return {**HARDENED, "HostConfig": {**HARDENED["HostConfig"], **host_config}}

async def attempt(docker, config):
    try:
        container = await docker.containers.create(config)
    except aiodocker.DockerError as exc:
        return f"{exc.status} {exc.message}"
    await container.delete(force=True)
    return "created"

async def main():
    docker = aiodocker.Docker()
    try:
        print(json.dumps({
            "privileged": await attempt(docker, hardened_but(Privileged=True)),
            "host_root": await attempt(docker, hardened_but(Binds=["/:/host"])),
            "other_image": await attempt(docker, {**HARDENED, "Image": "stratorch:latest"}),
        }))
    finally:
        await docker.close()

asyncio.run(main())
"""
