"""The ``stratorch`` command's entry point: ``stratorch run`` starts its sandbox's child first.

The child's start-up (importing pandas) then runs on another core while this process imports
the rest of stratorch, instead of after it (see :func:`shared.sandbox.spawn.start_ahead`).
Nothing else changes: the command is :func:`stratorch.cli.main`.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    argv = sys.argv[1:]
    if _runs_in_process_sandbox(argv):
        from shared.sandbox.port import DEFAULT_LIMITS
        from shared.sandbox.spawn import start_ahead

        start_ahead(DEFAULT_LIMITS.memory_bytes)
    from stratorch.cli import main as cli_main

    return cli_main(argv)


def _runs_in_process_sandbox(argv: list[str]) -> bool:
    """Whether ``argv`` is a ``run`` in the process sandbox (a guess: a wrong one only wastes
    the child started ahead, which is ended at exit)."""
    if not argv or argv[0] != "run" or "-h" in argv or "--help" in argv:
        return False
    sandbox = os.environ.get("STRATORCH_SANDBOX", "process")
    for i, arg in enumerate(argv):
        if arg == "--sandbox" and i + 1 < len(argv):
            sandbox = argv[i + 1]
        elif arg.startswith("--sandbox="):
            sandbox = arg.partition("=")[2]
    return sandbox == "process"
