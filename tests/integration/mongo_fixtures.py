"""Fixtures on a real MongoDB wire-protocol server, for tests of :mod:`shared.mongo`.

Import them into a test module (``from tests.integration.mongo_fixtures import ...``).

The server: ``STRATORCH_MONGO_URL`` if set, else whatever ``scripts/start-mongo.sh`` starts or
finds running (FerretDB on 127.0.0.1:27017; idempotent, about a second when it runs already).
Where no server can be had the tests SKIP, saying why, unless ``STRATORCH_REQUIRE_SERVICES=1``
(CI), which makes that a failure. Every test gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from pymongo import MongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from shared import mongo

ROOT = Path(__file__).resolve().parents[2]
START_MONGO = ROOT / "scripts" / "start-mongo.sh"
#: Building FerretDB the first time takes minutes; after that the script takes a second.
START_TIMEOUT_S = 900
REQUIRE = os.environ.get("STRATORCH_REQUIRE_SERVICES") == "1"


def _unavailable(reason: str) -> NoReturn:
    if REQUIRE:
        pytest.fail(f"{reason} (STRATORCH_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def with_option(url: str, option: str) -> str:
    """``url`` with ``option`` (``name=value``) added to its query string."""
    if "?" in url:
        return f"{url}&{option}"
    return f"{url}{'' if url.endswith('/') else '/'}?{option}"


def _start_mongo() -> str:
    try:
        out = subprocess.run(
            ["bash", str(START_MONGO)],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"{START_MONGO} did not finish: {exc}")
    if out.returncode != 0:
        _unavailable(f"{START_MONGO} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    for line in out.stdout.splitlines():
        if line.startswith("STRATORCH_MONGO_URL="):
            return line.split("=", 1)[1]
    _unavailable(f"{START_MONGO} printed no STRATORCH_MONGO_URL: {out.stdout!r}")


@pytest.fixture(scope="session")
def mongo_server_url() -> str:
    """The URL of a Mongo wire-protocol server that answers a ping."""
    url = os.environ.get("STRATORCH_MONGO_URL") or _start_mongo()
    try:
        with MongoClient(url, serverSelectionTimeoutMS=5000) as client:
            client.admin.command("ping")
    except PyMongoError as exc:
        _unavailable(f"no Mongo server answers at {mongo.redact(url)}: {exc}")
    return url


@pytest.fixture
def fresh_db_name(mongo_server_url: str) -> Iterator[str]:
    """A database name no one uses; the database is dropped after the test."""
    name = f"stratorch_test_{uuid.uuid4().hex[:12]}"
    yield name
    with MongoClient(mongo_server_url, serverSelectionTimeoutMS=5000) as client:
        client.drop_database(name)


@pytest.fixture
async def fresh_db(
    mongo_server_url: str, fresh_db_name: str
) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    """An empty database with stratorch's indexes, on an async client for the primary."""
    client = await mongo.connect(mongo_server_url, retries=1)
    try:
        db = client[fresh_db_name]
        await mongo.ensure_indexes(db)
        yield db
    finally:
        await client.close()
