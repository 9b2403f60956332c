"""Host housekeeping of the Docker sandbox: whose a container is, and removing what a dead
owner left — containers and runner-code copies.

Every sandbox container is labelled :data:`LABEL` ``=1`` and with its owner
(:data:`OWNER_LABEL`: host and pid namespace, pid, and the pid's start time). A sandbox removes
its containers in every case it lives through — success, failure, cancellation, ``aclose``;
containers (and runner-code copies) of a process that died — SIGKILL, a crash — are removed by
the next ``DockerSandbox`` started in the same place, and while one is open, every
``leftover_check_s``. An idle container of a dead owner also ends on its own: its stdin closes
with the owner's connection (``StdinOnce``) and the runner exits.

aiodocker is imported only where a container is removed: the rest serves
:mod:`shared.sandbox.docker_ahead` before aiodocker is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import shared

if TYPE_CHECKING:
    from aiodocker import Docker
    from aiodocker.containers import DockerContainer
    from aiodocker.stream import Stream

__all__ = [
    "API_TIMEOUT_S",
    "LABEL",
    "OWNER_LABEL",
    "copy_runner_code",
    "current_owner",
    "remove_container",
    "remove_leftovers",
    "remove_stale_copies",
]

_log = logging.getLogger(__name__)

#: Every sandbox container carries ``LABEL=1``: how leftovers are found.
LABEL = "org.stratorch.sandbox"
#: ``host/pidns:pid:start`` of the process that created the container: is it a leftover?
OWNER_LABEL = "org.stratorch.sandbox.owner"
#: Seconds for one Docker API call (create, start, inspect, kill, remove); a dockerd that
#: takes longer is reported as unavailable rather than waited for.
API_TIMEOUT_S = 60.0
#: Seconds to wait, after removing a container, for its attached streams to end.
_DRAIN_TIMEOUT_S = 10.0
#: A stopped sandbox container of another host this long is a leftover: its owner would
#: have removed it within seconds.
_ORPHAN_GRACE_S = 60.0
#: What of ``shared`` runs inside the sandbox; the production Dockerfile copies the same.
_RUNNER_FILES = ("__init__.py", "errors.py", "intervals.py", "strategy", "sandbox")


async def remove_container(
    handle: DockerContainer, stream: Stream | None, pump: asyncio.Task[None] | None = None
) -> None:
    """Force-remove a container (SIGKILL + remove) while its output keeps being drained (a
    stalled attach would hang the removal), then close the attach stream. Failures are
    logged, not raised: the next DockerSandbox on this host removes what is left."""
    import aiodocker
    import aiohttp

    try:
        async with asyncio.timeout(API_TIMEOUT_S):
            await handle.delete(force=True)
    except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        if not (isinstance(exc, aiodocker.DockerError) and exc.status == 404):
            _log.warning("could not remove sandbox container %s: %s", handle.id[:12], exc)
    if pump is not None:
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(_DRAIN_TIMEOUT_S):
                await asyncio.shield(pump)
        pump.cancel()
    if stream is not None:
        with contextlib.suppress(Exception):
            await stream.close()


async def remove_leftovers(docker: Docker, owner: str) -> None:
    """Remove sandbox containers whose owner is gone (killed, or crashed before it could
    remove them):

    - on this host and pid namespace (``owner``'s place), those of a process that is gone;
    - anywhere, those that stopped over :data:`_ORPHAN_GRACE_S` ago. A live owner removes its
      container as soon as it stops; one whose owner died stops by itself once its stdin
      closes (``StdinOnce``) — at once if idle, after its job if busy. This covers workers in
      other containers or hosts sharing the dockerd, whose pids cannot be checked from here.

    Raises what aiodocker raises when dockerd cannot list them.
    """
    place = owner.split(":", 1)[0]
    found = await docker.containers.list(all=True, filters={"label": [f"{LABEL}=1"]})
    for handle in found:
        label = (handle["Labels"] or {}).get(OWNER_LABEL, "")
        parts = label.split(":")
        if len(parts) == 3 and parts[0] == place:
            if _alive(parts[1], parts[2]):
                continue
        elif handle["State"] == "running" or not await _stopped_long_ago(handle):
            continue
        _log.warning("removing sandbox container %s left by %s", handle.id[:12], label)
        await remove_container(handle, None)


async def _stopped_long_ago(handle: DockerContainer) -> bool:
    """Whether a container that is not running stopped (or was created and never started)
    more than :data:`_ORPHAN_GRACE_S` ago."""
    import aiodocker
    import aiohttp

    try:
        state = (await handle.show()).get("State") or {}
    except (aiodocker.DockerError, aiohttp.ClientError, OSError):
        return False  # removed meanwhile, or dockerd busy: next time
    stamp = str(state.get("FinishedAt") or "")
    if stamp.startswith("0001"):  # never ran: when it was created
        stamp = str(handle["Created"])
        since = float(stamp) if stamp.isdigit() else time.time()
    else:
        try:  # RFC 3339 with nanoseconds: the seconds are enough
            since = datetime.fromisoformat(stamp[:19] + "+00:00").timestamp()
        except ValueError:
            return False
    return time.time() - since > _ORPHAN_GRACE_S


def current_owner() -> str:
    """``host/pidns:pid:start`` of this process. Only a process in the same pid namespace
    can tell whether a pid lives (two worker containers may share a hostname, not a pid
    namespace), and the start time tells a reused pid apart."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{namespace}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int | str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _alive(pid: str, start: str) -> bool:
    return pid.isdigit() and start != "?" and _start_time(pid) == start


_COPY_PREFIX = "stratorch-sandbox-"
#: In a copy's directory, beside the mounted ``shared``: whose copy it is.
_COPY_OWNER = "owner"


def copy_runner_code(owner: str) -> str:
    """Copy what of ``shared`` runs in the sandbox to ``/tmp/stratorch-sandbox-<random>/shared``,
    world-readable: mounted from there, the container's ``/proc/self/mountinfo`` shows that
    neutral path, not where the service is installed."""
    source = Path(next(iter(shared.__path__)))
    root = tempfile.mkdtemp(prefix=_COPY_PREFIX)
    (Path(root) / _COPY_OWNER).write_text(owner)
    target = Path(root) / "shared"
    target.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in _RUNNER_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name, ignore=skip)
        else:
            shutil.copy2(source / name, target / name)
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    return root


def remove_stale_copies(owner: str) -> None:
    """Remove the runner-code copies of processes of this place that are gone (a killed
    worker cannot remove its own)."""
    place = owner.split(":", 1)[0]
    for root in Path(tempfile.gettempdir()).glob(f"{_COPY_PREFIX}*"):
        try:
            parts = (root / _COPY_OWNER).read_text().split(":")
        except OSError:
            continue  # not a copy (ProcessSandbox's directories share the prefix)
        if len(parts) == 3 and parts[0] == place and not _alive(parts[1], parts[2]):
            shutil.rmtree(root, ignore_errors=True)
