"""compose.yaml is a valid Compose file describing the whole stack (it is not run here:
no image registry is reachable, so `mongo` and `rabbitmq` cannot be pulled)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def config() -> dict:
    compose = shutil.which("docker-compose")
    if compose is None:
        if os.environ.get("STRATORCH_REQUIRE_SERVICES") == "1":
            pytest.fail("docker-compose is missing: run scripts/start-docker.sh")
        pytest.skip("docker-compose is not installed (scripts/start-docker.sh installs it)")
    out = subprocess.run(
        [compose, "-f", str(ROOT / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_the_stack_has_every_service_with_healthchecks_and_start_order(config: dict) -> None:
    services = config["services"]
    for name in (
        "mongo1",
        "mongo2",
        "mongo-init",
        "rabbitmq",
        "gateway",
        "scheduler",
        "symbol_worker",
        "portfolio_sim",
    ):
        assert name in services, name
    for name in ("mongo1", "mongo2", "rabbitmq", "gateway"):
        assert "healthcheck" in services[name], name
    for name in ("gateway", "scheduler", "symbol_worker", "portfolio_sim"):
        deps = services[name]["depends_on"]
        assert deps["rabbitmq"]["condition"] == "service_healthy"
        assert deps["mongo-init"]["condition"] == "service_completed_successfully"
    assert "container_name" not in services["symbol_worker"]  # scalable: --scale symbol_worker=N
    assert (
        "rabbitmq:3" in services["rabbitmq"]["image"]
        and "management" in services["rabbitmq"]["image"]
    )


def test_candles_are_read_from_the_secondary_by_a_read_only_user(config: dict) -> None:
    env = config["services"]["symbol_worker"]["environment"]
    assert "readPreference=secondaryPreferred" in env["STRATORCH_CANDLES_MONGO_URL"]
    assert "replicaSet=rs0" in env["STRATORCH_MONGO_URL"]
    init = " ".join(config["services"]["mongo-init"]["command"])
    assert "rs.initiate" in init and '"read"' in init
