"""The ``stratorch`` command's entry point: ``stratorch run`` starts its sandbox's child first.

The child's start-up (importing pandas) then runs on another core while this process imports
the rest of stratorch, instead of after it (see :func:`shared.sandbox.spawn.start_ahead`).
Nothing else changes: the command is :func:`stratorch.cli.main`, and the process ends as soon
as it returns.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
from typing import NoReturn


def main() -> NoReturn:
    argv = sys.argv[1:]
    sandbox = _run_sandbox(argv)
    if sandbox == "process":
        from shared.sandbox.port import DEFAULT_LIMITS
        from shared.sandbox.spawn import start_ahead

        start_ahead(DEFAULT_LIMITS.memory_bytes)
    elif sandbox == "docker":  # a container started ahead, in a thread
        from shared.sandbox import docker_ahead
        from shared.sandbox.port import DEFAULT_LIMITS

        docker_ahead.start_ahead(DEFAULT_LIMITS.memory_bytes)
    from stratorch.cli import main as cli_main

    # What is imported now lives as long as the process: the collector's full passes need
    # not walk it again and again (~0.1 s of a million-bar run, most of it in the replay).
    gc.freeze()
    code = cli_main(argv)
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """Exit with ``code`` once the exit handlers have run, without tearing the interpreter
    down object by object: after a million-bar run that took ~0.15 s, for nothing (as mypy's
    command does). Everything the command wrote is flushed first."""
    atexit._run_exitfuncs()  # temporary directories, the sandbox child started ahead
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _run_sandbox(argv: list[str]) -> str | None:
    """The sandbox ``argv`` runs in if it is a ``run`` (a guess: a wrong one only wastes the
    runner started ahead, which is ended at exit)."""
    if not argv or argv[0] != "run" or "-h" in argv or "--help" in argv:
        return None
    sandbox = os.environ.get("STRATORCH_SANDBOX", "process")
    for i, arg in enumerate(argv):
        if arg == "--sandbox" and i + 1 < len(argv):
            sandbox = argv[i + 1]
        elif arg.startswith("--sandbox="):
            sandbox = arg.partition("=")[2]
    return sandbox
