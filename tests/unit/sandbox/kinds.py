"""The two sandboxes, for the contract tests that run against both: how to make one, and how
to see its runners from outside.

A runner is named by what :data:`RUNNER_ID` returns inside it (a strategy puts it in its
signals' ``meta``): its pid in the process sandbox, its container's id in the Docker one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import aiodocker

from shared.sandbox import ProcessSandbox
from shared.sandbox.docker import DockerSandbox
from shared.sandbox.pool import PooledSandbox
from tests.integration.docker_support import DockerEnv, our_containers
from tests.unit.sandbox.support import alive, runners

#: Source of ``runner_id()``, for uploaded test strategies: the id of the runner the code
#: runs in. A Docker runner is pid 1 of its container, whose id shows in the host path of
#: its ``/etc/hostname`` mount; a process runner is never pid 1.
RUNNER_ID = """
def runner_id():
    import os, re
    if os.getpid() != 1:
        return str(os.getpid())
    with open("/proc/self/mountinfo") as f:
        return re.search(r"/containers/([0-9a-f]{64})/hostname /etc/hostname ", f.read())[1]
"""


class Kind(Protocol):
    name: str

    def new(self, **options: Any) -> PooledSandbox[Any]:
        """A new sandbox of this kind (not opened)."""
        ...

    async def runners(self) -> list[str]:
        """The ids of this test process's runners that are not yet gone."""
        ...

    async def alive(self, runner: str) -> bool:
        """Whether that runner still runs."""
        ...


class ProcessKind:
    name = "process"

    def new(self, **options: Any) -> ProcessSandbox:
        return ProcessSandbox(**options)

    async def runners(self) -> list[str]:
        return [str(pid) for pid in runners()]

    async def alive(self, runner: str) -> bool:
        return alive(int(runner))


@dataclass(frozen=True)
class DockerKind:
    env: DockerEnv
    name = "docker"

    def new(self, **options: Any) -> DockerSandbox:
        return DockerSandbox(image=self.env.image, docker_url=self.env.url, **options)

    async def _containers(self) -> list[dict[str, Any]]:
        # A client per look: the tests look from more than one event loop.
        async with aiodocker.Docker(url=self.env.url) as docker:
            return await our_containers(docker)

    async def runners(self) -> list[str]:
        return [found["id"] for found in await self._containers()]

    async def alive(self, runner: str) -> bool:
        return any(
            found["id"] == runner and found["state"] == "running"
            for found in await self._containers()
        )
