"""Who may see and spend what: tenants, their API tokens and their quotas.

A **tenant** owns backtests and uploaded sources; another tenant's backtest id is unknown to
it (HTTP 404) and so is another tenant's ``source_sha256``. Where the tenant comes from:

- HTTP: the gateway maps ``Authorization: Bearer <token>`` to a tenant through
  ``STRATORCH_API_TOKENS``, which holds only sha256 hashes of tokens, never tokens.
- The broker: the request's ``user_id`` message property. RabbitMQ refuses a publish whose
  ``user_id`` is not the connection's own user, so a consumer can trust it: a tenant on the
  broker is a RabbitMQ user. (The gateway's RabbitMQ user has the ``impersonator`` tag, which
  lets it publish for the tenant a token named.)
- ``STRATORCH_AUTH=off`` (local use, ``stratorch run``): everyone is :data:`ANONYMOUS`.

**Quotas** bound what one tenant has in flight, so it cannot starve the workers of others:
backtests running at once, and units of its unfinished backtests (a backtest counts one unit
per symbol: the default split, and the most a strategy's own grouping can queue). A backtest is
counted from its admission (gateway or scheduler, whichever sees it first) until it ends
(:func:`shared.outcome.finish`, the one place a backtest ends).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "ANONYMOUS",
    "STALE_AFTER_S",
    "TENANT_PATTERN",
    "Admission",
    "ApiTokens",
    "Quota",
    "hash_token",
]

#: The tenant of every request when authentication is off (``STRATORCH_AUTH=off``).
ANONYMOUS = "anonymous"
#: A tenant's name (also a RabbitMQ user name): short enough that ``<tenant>.<32 hex>`` is
#: still a valid backtest id.
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,31}$")
#: A backtest counted against a quota this long without ending is taken to be lost (its end
#: was never observed: say, its request was dead-lettered) and stops counting. Checked only
#: when a quota would refuse, so a quota heals itself instead of staying full forever.
STALE_AFTER_S = 24 * 3600.0

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def hash_token(token: str) -> str:
    """The hex sha256 of an API token: what ``STRATORCH_API_TOKENS`` holds."""
    return hashlib.sha256(token.encode()).hexdigest()


class ApiTokens:
    """The API tokens' hashes and each one's tenant, from ``STRATORCH_API_TOKENS``.

    The setting is ``tenant:sha256hex`` pairs separated by commas (a tenant may have several
    tokens: rotate by adding the new one, then removing the old). Make a token and its hash
    with ``python -c "import secrets, hashlib; t = secrets.token_urlsafe(32);
    print(t, hashlib.sha256(t.encode()).hexdigest())"``.
    """

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._hashes = dict(hashes)

    @classmethod
    def parse(cls, value: str) -> ApiTokens:
        """Read the setting's text; :class:`ValueError` names the bad entry."""
        hashes: dict[str, str] = {}
        for entry in (e.strip() for e in value.split(",")):
            if not entry:
                continue
            tenant, sep, digest = entry.partition(":")
            tenant, digest = tenant.strip(), digest.strip().lower()
            if not sep or not TENANT_PATTERN.match(tenant) or not _SHA256.match(digest):
                shown = entry if len(entry) < 20 else f"{entry[:16]}..."
                raise ValueError(
                    f"entry {shown!r} is not 'tenant:sha256hex' (a tenant is 1-31 of"
                    " A-Z a-z 0-9 _ -; the hash is the token's sha256 in 64 hex digits,"
                    " never the token itself)"
                )
            if tenant == ANONYMOUS:
                raise ValueError(f"{ANONYMOUS!r} is reserved for STRATORCH_AUTH=off")
            if digest in hashes:
                raise ValueError(f"a token hash is listed twice ({digest[:12]}...)")
            hashes[digest] = tenant
        return cls(hashes)

    def __bool__(self) -> bool:
        return bool(self._hashes)

    def __repr__(self) -> str:
        return f"ApiTokens(tenants={sorted(set(self._hashes.values()))})"

    def tenant_of(self, token: str) -> str | None:
        """The token's tenant, or ``None``. Every configured hash is compared, in constant
        time each, so the time taken says nothing about which one (nearly) matched."""
        presented = hash_token(token)
        found = None
        for digest, tenant in self._hashes.items():
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found


@dataclass(frozen=True)
class Quota:
    """What one tenant may have in flight; ``None`` is no limit.

    :param running: backtests admitted and not yet ended.
    :param units: units (one per symbol) of those backtests.
    """

    running: int | None = None
    units: int | None = None

    def describe(self) -> str:
        parts = []
        if self.running is not None:
            plural = "s" if self.running != 1 else ""
            parts.append(f"{self.running} backtest{plural} running at once")
        if self.units is not None:
            parts.append(f"{self.units} units queued")
        return " and ".join(parts) or "no limit"

    def never_fits(self, units: int) -> bool:
        """Whether a backtest of ``units`` is over the quota even with nothing else running."""
        return self.units is not None and units > self.units

    def refusal(self, tenant: str, units: int) -> str:
        """Why a backtest of ``units`` is refused (the quota's message, to users)."""
        if self.never_fits(units):
            return (
                f"a backtest of {units} units (one per symbol, per combination of a sweep)"
                f" is more than tenant {tenant!r} may have queued ({self.units}); split it"
                " into smaller backtests"
            )
        return (
            f"tenant {tenant!r} is at its quota ({self.describe()}); submit again when one"
            " of its backtests has finished"
        )


class Admission(enum.Enum):
    """What :meth:`shared.store.Store.admit` decided."""

    #: Counted against the tenant's quota (now, or already: admitting twice is a no-op).
    ADMITTED = "admitted"
    #: The tenant's quota is full; nothing was changed.
    OVER_QUOTA = "over_quota"
