"""Connecting to MongoDB, and PyMongo's errors turned into ones that say what to do.

Hierarchy::

    MongoError              base: a MongoDB operation failed; the message says what was attempted
    ├── MongoConfigError    the URL is malformed, or an index conflicts with one already there
    ├── MongoUnavailable    no server answered in time (down, wrong host, network, no primary);
    │                       a shared.errors.ServerUnavailable: retried, not given up
    ├── MongoAccessDenied   authentication failed, or the user lacks a privilege
    └── MongoDataError      a stored document is not what stratorch writes (missing field, type)

These are operators' errors, not users': they are not :class:`shared.errors.StratorchError`, so
a handler that meets one lets its message go back to the broker (redelivered later) instead of
turning it into a user-facing result. Every one is raised ``from`` the PyMongo error behind it.
URLs in messages and logs have their password replaced by ``***``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from bson.errors import BSONError
from pymongo import AsyncMongoClient
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    DuplicateKeyError,
    InvalidURI,
    OperationFailure,
    PyMongoError,
)

from shared.errors import ServerUnavailable

__all__ = [
    "DEFAULT_CONNECT_RETRIES",
    "DEFAULT_RETRY_DELAY_S",
    "DEFAULT_TIMEOUT_MS",
    "MongoAccessDenied",
    "MongoConfigError",
    "MongoDataError",
    "MongoError",
    "MongoUnavailable",
    "connect",
    "gather_all",
    "mapped",
    "new_client",
    "redact",
]

log = structlog.get_logger(__name__)

#: How long server selection and a TCP connect may take (PyMongo's default is 30 s): a service
#: whose database is gone should say so quickly, and retry (see :func:`connect`), not hang.
DEFAULT_TIMEOUT_MS = 5_000
#: Pings after the first that :func:`connect` tries before giving up (arq's connection retries).
DEFAULT_CONNECT_RETRIES = 5
#: Pause between those pings: with the timeout above, about half a minute in all, which covers
#: a replica set electing a primary or a compose stack whose database starts last.
DEFAULT_RETRY_DELAY_S = 1.0

#: Server error codes meaning "who you are" or "what you may do" was refused.
_ACCESS_DENIED_CODES = frozenset({13, 18, 8000})  # Unauthorized, AuthenticationFailed, Atlas
_PASSWORD = re.compile(r"(?<=://)([^:/@]*):([^@/]*)@")


class MongoError(Exception):
    """A MongoDB operation failed; the message says what was attempted and why it failed."""


class MongoConfigError(MongoError):
    """The URL or the database's existing setup (an index) does not fit what stratorch needs."""


class MongoUnavailable(MongoError, ServerUnavailable):
    """No MongoDB server answered in time: it is down, the host is wrong, or there is no
    primary (an election, a lost majority)."""


class MongoAccessDenied(MongoError):
    """Authentication failed, or the URL's user lacks a privilege the operation needs."""


class MongoDataError(MongoError):
    """A stored document is not what stratorch writes (a missing field, a string for a number)."""


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    return _PASSWORD.sub(r"\1:***@", url)


def new_client(url: str, **options: Any) -> AsyncMongoClient[dict[str, Any]]:
    """An :class:`~pymongo.AsyncMongoClient` for ``url`` with stratorch's defaults; no I/O.

    The client connects lazily, on its first operation. ``options`` are PyMongo's keyword
    options and override the defaults (a short server-selection and connect timeout).

    :raises MongoConfigError: the URL is malformed or names an impossible option.
    """
    settings: dict[str, Any] = {
        "serverSelectionTimeoutMS": DEFAULT_TIMEOUT_MS,
        "connectTimeoutMS": DEFAULT_TIMEOUT_MS,
        "appname": "stratorch",
        **options,
    }
    try:
        return AsyncMongoClient(url, **settings)
    except (ConfigurationError, InvalidURI, ValueError, TypeError) as exc:
        raise MongoConfigError(
            f"cannot use the MongoDB URL {redact(url)}: {exc}. Expected "
            f"mongodb://[user:password@]host[:port][,host...]/[?option=value&...] "
            f"(or mongodb+srv://...)"
        ) from exc


async def connect(
    url: str,
    *,
    retries: int = DEFAULT_CONNECT_RETRIES,
    retry_delay_s: float = DEFAULT_RETRY_DELAY_S,
    **options: Any,
) -> AsyncMongoClient[dict[str, Any]]:
    """A client for ``url`` that has answered a ping; the caller closes it.

    Pings until the server answers, ``retries`` more times after the first failure, logging
    each failure with the tries left (as arq's ``create_pool``), so a service started before
    its database waits for it instead of crashing. Authentication failures are not retried.

    :param url: a MongoDB connection string; its options (``replicaSet``,
        ``readPreference``, ...) apply, ``options`` override them.
    :param retries: pings after the first before giving up.
    :param retry_delay_s: pause between pings.
    :param options: PyMongo client options, e.g. ``serverSelectionTimeoutMS=1000``.
    :raises MongoConfigError: the URL is malformed.
    :raises MongoUnavailable: no server answered after every try.
    :raises MongoAccessDenied: the server refused the URL's credentials.
    """
    client = new_client(url, **options)
    where = redact(url)
    for tries_left in range(retries, -1, -1):
        try:
            with mapped(f"connecting to MongoDB at {where}"):
                # Any member will do: a candles client reading from secondaries must not
                # wait for a primary (``command`` defaults to the primary otherwise).
                await client.admin.command("ping", read_preference=client.read_preference)
        except MongoUnavailable as exc:
            if not tries_left:
                await client.close()
                raise
            log.warning(
                "mongo_unavailable",
                url=where,
                error=str(exc.__cause__ or exc)[:300],
                tries_left=tries_left,
                retry_in_s=retry_delay_s,
            )
            await asyncio.sleep(retry_delay_s)
        except BaseException:
            await client.close()
            raise
        else:
            log.info("mongo_connected", url=where)
            return client
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def mapped(doing: str, *, where: str = "", needs: str = "") -> Iterator[None]:
    """Re-raise PyMongo (and BSON) errors inside as :class:`MongoError` s saying what failed.

    :param doing: what was attempted, e.g. ``"loading BTCUSDT 1h candles"``.
    :param where: the server (redacted URL) or database, named in the message.
    :param needs: the privilege the operation needs, named when access is denied.
    """
    try:
        yield
    except DuplicateKeyError:
        raise  # callers that can meet one handle it as part of their logic
    except (ConfigurationError, InvalidURI) as exc:
        raise MongoConfigError(f"{doing}: {_reason(exc)}") from exc
    except ConnectionFailure as exc:
        at = f" at {where}" if where else ""
        raise MongoUnavailable(
            f"{doing}: no MongoDB server{at} answered ({_reason(exc)}). Check that it is "
            f"running and reachable and that the URL (STRATORCH_MONGO_URL or "
            f"STRATORCH_CANDLES_MONGO_URL) names it"
        ) from exc
    except OperationFailure as exc:
        if exc.code in _ACCESS_DENIED_CODES:
            wanted = f"; it needs {needs}" if needs else ""
            raise MongoAccessDenied(
                f"{doing}: MongoDB refused the URL's user ({_reason(exc)}){wanted}"
            ) from exc
        raise MongoError(f"{doing}: {_reason(exc)}") from exc
    except PyMongoError as exc:
        raise MongoError(f"{doing}: {_reason(exc)}") from exc
    except BSONError as exc:
        raise MongoError(f"{doing}: a value cannot be stored as BSON: {exc}") from exc


def _reason(exc: PyMongoError) -> str:
    """The server's own message where there is one (``str()`` appends the whole reply)."""
    if isinstance(exc, OperationFailure) and isinstance(exc.details, dict):
        message = exc.details.get("errmsg")
        if message:
            return f"{message} (code {exc.code})"
    return str(exc)


async def gather_all(*awaitables: Awaitable[Any]) -> list[Any]:
    """Await all concurrently; then raise the first failure, if any (none is left unawaited)."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
