"""Helpers of the Docker sandbox tests: a real dockerd and the test image, and ways to look.

:func:`docker_up` brings up dockerd (``scripts/start-docker.sh``) and builds the sandbox test
image (``scripts/build-sandbox-image.sh``), both idempotent and seconds when already done.
Where that is impossible (no root, no apt) the tests SKIP, saying why — unless
``STRATORCH_REQUIRE_SERVICES=1`` (CI), which turns that into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiodocker
import pandas as pd
import pytest

from shared.sandbox.docker_host import LABEL, OWNER_LABEL, current_owner
from shared.strategy import ComponentRef

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "stratorch" / "sample" / "1h"
IMAGE = "stratorch-sandbox:test"
REQUIRE = os.environ.get("STRATORCH_REQUIRE_SERVICES") == "1"
#: The owner label of the containers a process of this host creates: ``PLACE:pid:start``.
PLACE = current_owner().split(":", 1)[0]
#: The owner label of containers this test process creates starts with this.
OWNER = f"{PLACE}:{os.getpid()}:"
#: What a probe strategy prints before it does the forbidden thing: one line of JSON facts.
FACTS = "FACTS "


def unavailable(reason: str) -> NoReturn:
    if REQUIRE:
        pytest.fail(f"{reason} (STRATORCH_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class DockerEnv:
    url: str
    image: str


def _script(name: str, **env: str) -> dict[str, str]:
    """Run ``scripts/<name>``; its ``KEY=VALUE`` stdout lines."""
    try:
        done = subprocess.run(
            [str(ROOT / "scripts" / name)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        unavailable(f"scripts/{name} did not finish within 900 s")
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        unavailable(f"scripts/{name} failed (exit {done.returncode}):\n{tail}")
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def docker_up() -> DockerEnv:
    """dockerd and the sandbox test image, with numpy/pandas of this very interpreter; SKIP
    (or FAIL, with ``STRATORCH_REQUIRE_SERVICES=1``) when they cannot be had."""
    url = _script("start-docker.sh")["DOCKER_HOST"]
    built = _script(
        "build-sandbox-image.sh",
        DOCKER_HOST=url,
        STRATORCH_SANDBOX_IMAGE=IMAGE,
        STRATORCH_SANDBOX_PYTHON=sys.executable,
    )
    return DockerEnv(url=url, image=built["STRATORCH_SANDBOX_IMAGE"])


async def our_containers(docker: aiodocker.Docker, owner: str = OWNER) -> list[dict[str, Any]]:
    """Sandbox containers (running or not) whose owner label starts with ``owner``."""
    found = await docker.containers.list(all=True, filters={"label": [f"{LABEL}=1"]})
    return [
        {"id": c.id, "owner": c["Labels"][OWNER_LABEL], "state": c["State"]}
        for c in found
        if c["Labels"].get(OWNER_LABEL, "").startswith(owner)
    ]


def source(code: str, cls: str = "S", **params: Any) -> ComponentRef:
    """A strategy uploaded as source: ``code`` (dedented) defining class ``cls``."""
    return ComponentRef.from_json({"source": textwrap.dedent(code), "class": cls, "params": params})


def bars(symbol: str = "BTCUSDT", n: int | None = None) -> pd.DataFrame:
    frame = pd.read_parquet(SAMPLE / f"{symbol}.parquet")
    return frame if n is None else frame.iloc[:n].reset_index(drop=True)


def facts(log_tail: str) -> dict[str, Any]:
    """The facts a probe strategy printed (see :data:`FACTS`)."""
    lines = [line for line in log_tail.splitlines() if line.startswith(FACTS)]
    assert lines, f"the probe printed no facts; its log:\n{log_tail}"
    found: dict[str, Any] = json.loads(lines[-1][len(FACTS) :])
    return found


class Watch:
    """The containers of this test process seen while a block runs (polled every 20 ms),
    with the log settings dockerd gave each."""

    def __init__(self, docker: aiodocker.Docker) -> None:
        self._docker = docker
        self._task: asyncio.Task[None] | None = None
        #: container id -> (log driver, log path)
        self.seen: dict[str, tuple[str, str]] = {}

    async def _poll(self) -> None:
        while True:
            for found in await our_containers(self._docker):
                if found["id"] not in self.seen:
                    with contextlib.suppress(aiodocker.DockerError):
                        info = await self._docker.containers.get(found["id"])
                        driver = info["HostConfig"]["LogConfig"]["Type"]
                        self.seen[found["id"]] = (driver, info["LogPath"])
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._poll())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def processes_in(container_ids: Iterable[str]) -> list[int]:
    """Live processes on this host that belong to one of the containers (by their cgroup)."""
    ids = [c for c in container_ids if c]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroups = (entry / "cgroup").read_text()
        except OSError:
            continue
        if any(container in cgroups for container in ids):
            found.append(int(entry.name))
    return found


def assert_host_fine(container_ids: Iterable[str] = ()) -> None:
    """The host still starts processes, and nothing of the given containers runs on it."""
    done = subprocess.run(["true"], timeout=10, check=False)
    assert done.returncode == 0
    assert processes_in(container_ids) == []
