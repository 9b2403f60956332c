"""What a Docker sandbox container is: the create request dockerd gets for it.

One function, :func:`container_config`, used by :class:`~shared.sandbox.docker.DockerSandbox`
for every container and by :mod:`shared.sandbox.docker_ahead` for the one started ahead —
so the sandbox can tell whether a container started ahead is exactly one it would have
created. See :mod:`shared.sandbox.docker` for why each setting. The standard library only:
it is imported before aiodocker is.
"""

from __future__ import annotations

import os
from typing import Any

from shared.sandbox.docker_host import LABEL, OWNER_LABEL
from shared.sandbox.protocol import sandbox_env

__all__ = [
    "CANDLES_DIR",
    "DEFAULT_CPUS",
    "DEFAULT_IMAGE",
    "DEFAULT_PIDS_LIMIT",
    "DEFAULT_TMP_BYTES",
    "RUNNER_LABEL",
    "SESSION_LABEL",
    "container_config",
]

_MiB = 1024 * 1024

#: The production sandbox image (``services/symbol_worker/sandbox/Dockerfile``).
DEFAULT_IMAGE = "stratorch-sandbox:latest"
#: The session (backtest id) a warm container serves: which backtest's it is.
SESSION_LABEL = "org.stratorch.sandbox.session"
#: An image with this label has the runner code baked in (under its value, on PYTHONPATH).
RUNNER_LABEL = "org.stratorch.sandbox.runner"
#: Where a container's candle directory is mounted.
CANDLES_DIR = "/candles"
#: CPU quota per container, in cores: a strategy runs single-threaded (BLAS pinned to one).
DEFAULT_CPUS = 1.0
#: Processes and threads per container: the runner and a few helpers, not a fork bomb.
DEFAULT_PIDS_LIMIT = 64
#: Size of the ``/tmp`` tmpfs.
DEFAULT_TMP_BYTES = 64 * _MiB

#: Where the runner code is mounted (and baked in the production image): ``PYTHONPATH``.
_CODE_DIR = "/opt/stratorch"
#: The uid:gid strategies run as, whatever the image says (the images create this user).
_USER = "10001:10001"
#: ``-P``: no working directory on ``sys.path``; ``-s``: no user site-packages.
_COMMAND = ["python3", "-P", "-s", "-m", "shared.sandbox.runner", "--serve"]
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONFAULTHANDLER": "1",  # a segfault leaves a Python traceback in the log
}


def container_config(
    *,
    image: str,
    owner: str,
    memory_bytes: int,
    code_copy: str | None,
    candles_dir: str | None,
    session: str | None = None,
    runtime: str | None = None,
    cpus: float = DEFAULT_CPUS,
    pids_limit: int = DEFAULT_PIDS_LIMIT,
    tmp_bytes: int = DEFAULT_TMP_BYTES,
) -> dict[str, Any]:
    """The create request of a runner container.

    :param owner: its owner label (:func:`~shared.sandbox.docker_host.current_owner`).
    :param code_copy: the runner-code copy to mount (``None``: the image's own).
    :param candles_dir: the host directory to mount read-only at :data:`CANDLES_DIR`.
    :param session: the session it serves, as a label (``None``: one call, or not yet known).
    """
    env = {**_ENV, **sandbox_env(os.environ)}
    binds = []
    if code_copy is not None:
        env["PYTHONPATH"] = _CODE_DIR
        binds.append(f"{code_copy}/shared:{_CODE_DIR}/shared:ro")
    if candles_dir is not None:
        binds.append(f"{candles_dir}:{CANDLES_DIR}:ro")
    host_config: dict[str, Any] = {
        "NetworkMode": "none",
        "ReadonlyRootfs": True,
        "Tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={tmp_bytes},mode=1777"},
        "IpcMode": "none",
        "CgroupnsMode": "private",  # /proc/self/cgroup shows "/", not the host's paths
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "PidsLimit": pids_limit,
        "Memory": memory_bytes,
        "MemorySwap": memory_bytes,
        "NanoCpus": int(cpus * 1e9),
        "Ulimits": [{"Name": "core", "Soft": 0, "Hard": 0}],
        "LogConfig": {"Type": "none", "Config": {}},
        "Binds": binds,
    }
    if runtime is not None:
        host_config["Runtime"] = runtime
    return {
        "Image": image,
        "Entrypoint": _COMMAND[:1],
        "Cmd": _COMMAND[1:],
        "Env": [f"{name}={value}" for name, value in env.items()],
        "User": _USER,
        "WorkingDir": "/",
        "Hostname": "sandbox",
        "NetworkDisabled": True,
        "AttachStdin": True,
        "AttachStdout": True,
        "AttachStderr": True,
        "OpenStdin": True,
        "StdinOnce": True,  # the owner's connection gone: stdin ends, the runner exits
        "Tty": False,
        "Labels": {
            LABEL: "1",
            OWNER_LABEL: owner,
            **({SESSION_LABEL: session} if session is not None else {}),
        },
        "HostConfig": host_config,
    }
