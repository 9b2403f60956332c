"""Helpers of the sandbox tests: uploaded strategies and a look at this process's children."""

from __future__ import annotations

import asyncio
import contextlib
import os
import textwrap
import time
from pathlib import Path
from typing import Any

from shared.strategy import ComponentRef

#: 1h BTCUSDT candles bundled with the package (2020-12-01 .. 2021-07-17, 5482 bars).
SAMPLE = Path(__file__).resolve().parents[3] / "stratorch" / "sample" / "1h" / "BTCUSDT.parquet"
MiB = 1024 * 1024


def source(code: str, cls: str = "S", **params: Any) -> ComponentRef:
    """A strategy uploaded as source: ``code`` (dedented) defining class ``cls``."""
    return ComponentRef.from_json({"source": textwrap.dedent(code), "class": cls, "params": params})


def _stat(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: state, ppid, pgrp, session, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for init to reap it is not)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def unix_session(sid: int) -> list[int]:
    """The live processes of session ``sid``: a sandbox child and everything it started."""
    members = []
    for entry in Path("/proc").iterdir():
        stat = _stat(entry.name) if entry.name.isdigit() else None
        if stat is not None and stat[0] != "Z" and int(stat[3]) == sid:
            members.append(int(entry.name))
    return members


def runners() -> list[int]:
    """The pids of this process's children running the sandbox runner, zombies included."""
    found = []
    for entry in Path("/proc").iterdir():
        stat = _stat(entry.name) if entry.name.isdigit() else None
        if stat is None or int(stat[1]) != os.getpid():
            continue
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if b"shared.sandbox.runner" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


async def wait_for_runner(timeout: float = 10.0) -> int:
    """The pid of this process's child running the sandbox runner, once it exists."""
    deadline = time.monotonic() + timeout
    while not (found := runners()):
        assert time.monotonic() < deadline, "no sandbox runner started"
        await asyncio.sleep(0.01)
    return found[0]
