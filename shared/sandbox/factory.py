"""Which sandbox runs strategy code: the one choice the services and ``stratorch run`` share.

Not imported by the package itself: it reads :class:`~shared.settings.Settings` (pydantic),
which the sandbox image does not have.
"""

from __future__ import annotations

from typing import Literal

from shared.sandbox.port import Sandbox
from shared.settings import Settings

__all__ = ["new_sandbox"]


def new_sandbox(
    settings: Settings, kind: Literal["process", "docker"] | None = None, *, spare: bool = False
) -> Sandbox:
    """The sandbox ``kind`` names (default ``STRATORCH_SANDBOX``), configured by ``settings``;
    not yet opened: use it as an async context manager.

    The Docker one is imported only when chosen (it loads aiodocker).

    :param spare: keep a runner started ahead for each new backtest (a service's sandbox;
        see :class:`~shared.sandbox.pool.PooledSandbox`). The process sandbox only: a
        container is labelled with its backtest when it starts.
    """
    if (kind or settings.sandbox) == "process":
        from shared.sandbox.process import ProcessSandbox

        return ProcessSandbox(spare=spare)
    try:
        from shared.sandbox.docker import DockerSandbox
    except ImportError as exc:
        raise RuntimeError(
            "STRATORCH_SANDBOX=docker, but this build has no Docker sandbox"
            f" (shared.sandbox.docker: {exc}); set STRATORCH_SANDBOX=process for trusted code"
        ) from exc
    return DockerSandbox(image=settings.sandbox_image, runtime=settings.sandbox_runtime)
