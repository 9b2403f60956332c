"""How a process sandbox's child is started, and one started ahead of the event loop.

:class:`~shared.sandbox.process.ProcessSandbox` starts each child with :func:`runner_argv`
and :func:`runner_options`. :func:`start_ahead` starts one the same way
before anything else is imported: ``stratorch run`` calls it first thing, so the child's
start-up (~0.3 s of importing pandas) runs on the other core while the command imports its
own modules, and the run's first call finds it ready (:func:`take_ahead`). A child started
ahead that no call takes is ended when the process exits.

Imports only the standard library and :mod:`shared.sandbox.protocol`: it runs before pandas.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.sandbox.protocol import sandbox_env

__all__ = ["Ahead", "memory_cap", "runner_argv", "runner_options", "start_ahead", "take_ahead"]

#: A fixed PATH: the host's could point into a user's directories.
_PATH = "/usr/local/bin:/usr/bin:/bin"
#: What the children import ``shared`` from: this checkout or installation.
ROOT = str(Path(__file__).resolve().parents[2])


def runner_argv(python: str) -> list[str]:
    """The child's command line: the runner serving jobs (see :mod:`shared.sandbox.runner`)."""
    return [python, "-P", "-s", "-m", "shared.sandbox.runner", "--serve"]  # -P: no cwd on path


def runner_env(workdir: str) -> dict[str, str]:
    """The child's whole environment: nothing from the host's but OpenBLAS tuning."""
    return {
        "PATH": _PATH,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONPATH": ROOT,
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONFAULTHANDLER": "1",  # a segfault leaves a Python traceback in the log
        **sandbox_env(os.environ),
    }


def runner_options(workdir: str, memory_bytes: int) -> dict[str, Any]:
    """How the child is started besides its command line, for :class:`subprocess.Popen` and
    :meth:`asyncio.loop.subprocess_exec` alike: its three pipes, its directory and
    environment, a session (so a process group) of its own, its limits."""
    return {
        "stdin": subprocess.PIPE,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "cwd": workdir,
        "env": runner_env(workdir),
        "start_new_session": True,
        "preexec_fn": functools.partial(limit_child, memory_bytes),
    }


def limit_child(memory_bytes: int) -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def memory_cap(memory_bytes: int) -> int:
    """``memory_bytes``, or the service's own hard limit if that is lower (a child cannot
    raise it, and asking would fail the start)."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    return memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)


@dataclass(frozen=True)
class Ahead:
    """A child started by :func:`start_ahead`: its process, directory, interpreter and cap."""

    process: subprocess.Popen[bytes]
    workdir: str
    python: str
    memory_bytes: int


_ahead: Ahead | None = None


def start_ahead(memory_bytes: int, python: str | None = None) -> None:
    """Start a child now, for the first :class:`~shared.sandbox.process.ProcessSandbox` call
    of this process with this memory limit (``python``: default the running interpreter).

    Best effort: a child that fails to start is simply not there, and the sandbox starts one
    as usual.
    """
    global _ahead
    python = python or sys.executable
    memory = memory_cap(memory_bytes)
    workdir = tempfile.mkdtemp(prefix="stratorch-sandbox-")
    try:
        process = subprocess.Popen(runner_argv(python), **runner_options(workdir, memory))
    except OSError:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    _ahead = Ahead(process, workdir, python, memory)
    atexit.register(_end_untaken)


def take_ahead(python: str, memory_bytes: int) -> Ahead | None:
    """The child started ahead, if it is still running and was started for ``python`` and
    ``memory_bytes``; it is the caller's from then on. None otherwise (also the second time)."""
    global _ahead
    ahead = _ahead
    if ahead is None or (ahead.python, ahead.memory_bytes) != (python, memory_bytes):
        return None
    _ahead = None
    if ahead.process.poll() is not None:  # it died: a new one is started as usual
        _end(ahead)
        return None
    return ahead


def _end_untaken() -> None:
    global _ahead
    if _ahead is not None:
        _end(_ahead)
        _ahead = None


def _end(ahead: Ahead) -> None:
    if ahead.process.poll() is None:  # not yet reaped: its process group is still its own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ahead.process.pid, signal.SIGKILL)
    for pipe in (ahead.process.stdin, ahead.process.stdout, ahead.process.stderr):
        if pipe is not None:
            pipe.close()
    ahead.process.wait()
    shutil.rmtree(ahead.workdir, ignore_errors=True)
