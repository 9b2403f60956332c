"""Fixtures of the sandbox tests: the bundled real candles, and sandboxes closed afterwards —
the process sandbox, or (``kind``) each of the two, for the tests of what both promise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pandas as pd
import pytest

from shared.candles.frame import validate_frame
from shared.sandbox import ProcessSandbox
from shared.sandbox.pool import PooledSandbox
from tests.integration.docker_support import DockerEnv, docker_up
from tests.unit.sandbox.kinds import DockerKind, Kind, ProcessKind
from tests.unit.sandbox.support import SAMPLE


@pytest.fixture(scope="session")
def btc() -> pd.DataFrame:
    frame = pd.read_parquet(SAMPLE)
    validate_frame(frame)
    return frame


@pytest.fixture
def short(btc: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, int]]:
    """300 bars of BTCUSDT, the first 10 of them warm-up."""
    return {"BTCUSDT": (btc.iloc[:300].reset_index(drop=True), 10)}


@pytest.fixture
async def sandbox() -> AsyncIterator[ProcessSandbox]:
    async with ProcessSandbox() as sandbox:
        yield sandbox


@pytest.fixture(scope="session")
def docker_env() -> DockerEnv:
    """dockerd and the sandbox test image; SKIP without them (FAIL, in CI)."""
    return docker_up()


@pytest.fixture(
    params=["process", pytest.param("docker", marks=pytest.mark.integration)],
)
def kind(request: pytest.FixtureRequest) -> Kind:
    """Each sandbox in turn: what both promise is tested against both."""
    if request.param == "docker":
        return DockerKind(request.getfixturevalue("docker_env"))
    return ProcessKind()


@pytest.fixture
async def pooled(kind: Kind) -> AsyncIterator[PooledSandbox[Any]]:
    """A sandbox of ``kind``; once it is closed, none of its runners may be left."""
    async with kind.new() as sandbox:
        yield sandbox
    assert await kind.runners() == []
