"""What the Docker API proxy lets a worker do: the sandbox's own requests pass, anything that
would reach past the sandbox is refused with a reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.docker_proxy.policy import Denied, Rules, check, check_container, check_count
from shared.sandbox.docker import DockerSandbox
from shared.sandbox.port import DEFAULT_LIMITS

RULES = Rules(image="stratorch-sandbox:latest")


def sandbox_config(*, session: str | None = None, **host_config: Any) -> dict[str, Any]:
    """What DockerSandbox itself sends to create a container (its own code builds it): for
    one call, or a warm one of a backtest's ``session``."""
    sandbox = DockerSandbox(image=RULES.image, mount_runner=False)
    key = None if session is None else (session, DEFAULT_LIMITS.memory_bytes)
    config = sandbox._config(DEFAULT_LIMITS, key)
    config["HostConfig"].update(host_config)
    return config


def create(config: dict[str, Any], rules: Rules = RULES) -> None:
    check(rules, "POST", "/v1.41/containers/create", [], json.dumps(config).encode())


def refused(config: dict[str, Any], rules: Rules = RULES) -> str:
    with pytest.raises(Denied) as denied:
        create(config, rules)
    return str(denied.value)


def test_the_sandbox_own_requests_pass() -> None:
    create(sandbox_config())
    create(sandbox_config(session="bt-1"))
    query = [("all", "1"), ("filters", json.dumps({"label": ["org.stratorch.sandbox=1"]}))]
    check(RULES, "GET", "/v1.41/containers/json", query, b"")
    check(RULES, "GET", "/v1.41/images/stratorch-sandbox:latest/json", [], b"")
    check(RULES, "GET", "/version", [], b"")
    for method, path, query in [
        ("POST", "/v1.41/containers/abc123/start", []),
        ("POST", "/v1.41/containers/abc123/attach", [("stdin", "1"), ("stream", "1")]),
        ("POST", "/v1.41/containers/abc123/wait", []),
        ("POST", "/v1.41/containers/abc123/kill", []),
        ("GET", "/v1.41/containers/abc123/json", []),
        ("DELETE", "/v1.41/containers/abc123", [("force", "True")]),
    ]:
        allowed = check(RULES, method, path, query, b"")
        assert allowed.container == "abc123"  # forwarded only if abc123 is a sandbox
    assert check(RULES, "POST", "/containers/abc123/attach", [], b"").upgrade


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"Privileged": True}, "HostConfig.Privileged is not allowed"),
        ({"Binds": ["/:/host"]}, "HostConfig.Binds no host path may be mounted"),
        ({"Mounts": [{"Type": "bind", "Source": "/", "Target": "/h"}]}, "Mounts is not allowed"),
        ({"CapAdd": ["SYS_ADMIN"]}, "HostConfig.CapAdd is not allowed"),
        ({"Devices": [{"PathOnHost": "/dev/sda"}]}, "HostConfig.Devices is not allowed"),
        ({"PidMode": "host"}, "HostConfig.PidMode is not allowed"),
        ({"NetworkMode": "host"}, "HostConfig.NetworkMode must be 'none'"),
        ({"SecurityOpt": ["seccomp=unconfined"]}, "HostConfig.SecurityOpt must be exactly"),
        ({"ReadonlyRootfs": False}, "HostConfig.ReadonlyRootfs must be True"),
        ({"CapDrop": []}, "HostConfig.CapDrop must be ['ALL']"),
        ({"MemorySwap": -1}, "HostConfig.MemorySwap must be a positive integer"),
        ({"Runtime": "runc-unconfined"}, "HostConfig.Runtime no runtime may be chosen"),
        ({"Tmpfs": {"/tmp": "rw,size=1m"}}, "/tmp must be noexec,nosuid,nodev"),
    ],
)
def test_escapes_from_the_hardened_settings_are_refused(
    change: dict[str, Any], reason: str
) -> None:
    assert reason in refused(sandbox_config(**change))


def test_every_hardening_is_required_and_only_the_sandbox_image_as_non_root() -> None:
    config = sandbox_config()
    del config["HostConfig"]["CapDrop"]
    assert refused(config) == "HostConfig.CapDrop is required"
    assert "sandbox image" in refused({**sandbox_config(), "Image": "alpine"})
    assert "non-root" in refused({**sandbox_config(), "User": "0:0"})
    assert "non-root" in refused({**sandbox_config(), "User": "root"})
    assert "Volumes is not allowed" in refused({**sandbox_config(), "Volumes": {"/x": {}}})
    with pytest.raises(Denied, match="not JSON"):
        check(RULES, "POST", "/containers/create", [], b"{nope")
    # The configured gVisor runtime may be asked for, no other.
    gvisor = Rules(image=RULES.image, runtime="runsc")
    create(sandbox_config(Runtime="runsc"), gvisor)
    assert "must be 'runsc'" in refused(sandbox_config(Runtime="runc"), gvisor)


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("POST", "/v1.41/containers/abc/exec", []),
        ("POST", "/v1.41/exec/abc/start", []),
        ("POST", "/v1.41/images/create", [("fromImage", "alpine")]),
        ("POST", "/v1.41/build", []),
        ("GET", "/v1.41/images/json", []),
        ("GET", "/v1.41/images/alpine/json", []),
        ("POST", "/v1.41/volumes/create", []),
        ("POST", "/v1.41/networks/create", []),
        ("GET", "/v1.41/events", []),
        ("POST", "/v1.41/containers/abc/archive", []),
        ("PUT", "/v1.41/containers/abc/archive", [("path", "/")]),
        ("POST", "/v1.41/containers/abc/update", []),
        ("GET", "/v1.41/containers/json", []),  # unfiltered: every container of the host
        ("POST", "/v1.41/containers/create", [("name", "squatted")]),
        ("GET", "/v1.41/containers/abc/../../images/json", []),
        ("GET", "/v1.41/containers/%2e%2e/json", []),
    ],
)
def test_everything_else_is_refused(method: str, path: str, query: list[tuple[str, str]]) -> None:
    body = json.dumps(sandbox_config()).encode() if path.endswith("create") else b""
    with pytest.raises(Denied):
        check(RULES, method, path, query, body)


def test_only_sandbox_containers_may_be_touched() -> None:
    sandbox = {
        "Id": "a" * 64,
        "Config": {"Image": RULES.image, "Labels": {"org.stratorch.sandbox": "1"}},
    }
    check_container(RULES, sandbox)
    for other in (
        {"Id": "b" * 64, "Config": {"Image": "postgres", "Labels": {}}},
        {"Id": "c" * 64, "Config": {"Image": "postgres", "Labels": {"org.stratorch.sandbox": "1"}}},
        {"Id": "d" * 64, "Config": {"Image": RULES.image, "Labels": {}}},
    ):
        with pytest.raises(Denied, match="not a sandbox container"):
            check_container(RULES, other)


def test_the_number_of_live_sandboxes_is_capped() -> None:
    check_count(Rules(image=RULES.image, max_containers=3), 2)
    with pytest.raises(Denied, match="3 sandbox containers exist already"):
        check_count(Rules(image=RULES.image, max_containers=3), 3)
