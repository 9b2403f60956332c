"""Settings from ``STRATORCH_*`` environment variables: one place, documented in the README.

Built once at a program's start and passed down; nothing else reads the environment. A bad
value fails at start with the variable's name and value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STRATORCH_", extra="ignore", frozen=True)

    #: Local candle store (Parquet) of ``stratorch run``; unset: the bundled real sample.
    store: Path | None = None
    #: Where ``stratorch run`` keeps plans, batches, WAL and results; unset: a temporary dir.
    state_dir: Path | None = None
    #: Which sandbox runs strategy code.
    sandbox: Literal["process", "docker"] = "process"
    #: ``debug``, ``info``, ``warning``: the level of the structured JSON logs on stderr.
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
