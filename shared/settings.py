"""Settings from ``STRATORCH_*`` environment variables: one place, documented in the README.

Built once at a program's start and passed down; nothing else reads the environment. A bad
value fails at start with the variable's name and value. Secrets (URLs with passwords) are
``SecretStr`` so they never end up in a log line or a repr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.store import DEFAULT_LEASE_S
from shared.tenancy import ApiTokens, Quota

_PREFIX = "STRATORCH_"


class SettingsError(ValueError):
    """A ``STRATORCH_*`` variable holds a value that cannot be used. The message is one line
    per variable: its name, the value it holds and what it may hold (starlette's wording)."""


class Settings(BaseSettings):
    """Every setting; ``Settings()`` reads the environment (tests pass values instead).

    Programs build it with :meth:`from_env`, whose error names the variable.
    """

    model_config = SettingsConfigDict(env_prefix=_PREFIX, extra="ignore", frozen=True)

    @classmethod
    def from_env(cls, **values: Any) -> Settings:
        """The settings from the environment (``values`` win over it).

        :raises SettingsError: a variable's value is not allowed.
        """
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(_describe(cls, exc)) from None

    # -- stratorch run (embedded) ------------------------------------------------------------
    #: Local candle store (Parquet) of ``stratorch run``; unset: the bundled real sample.
    candles: Path | None = None
    #: ``STRATORCH_STORE``, the old name of ``STRATORCH_CANDLES``: still read for one release
    #: (``stratorch run`` says so on stderr), as "store" now means the state store only.
    store: Path | None = None
    #: Where ``stratorch run`` keeps plans, batches, WAL and results; unset: a temporary dir.
    state_dir: Path | None = None

    # -- both ----------------------------------------------------------------------------------
    #: Which sandbox runs strategy code: ``process`` (trusted code only) or ``docker``.
    sandbox: Literal["process", "docker"] = "process"
    #: The Docker image strategies run in (``docker`` sandbox).
    sandbox_image: str = "stratorch-sandbox:latest"
    #: The Docker sandbox's container runtime, e.g. ``runsc`` (gVisor); unset: dockerd's default.
    sandbox_runtime: str | None = None
    #: ``debug``, ``info``, ``warning``, ``error``: the level of the JSON logs on stderr.
    log_level: Literal["debug", "info", "warning", "error"] = "warning"

    # -- services --------------------------------------------------------------------------------
    #: RabbitMQ.
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    #: MongoDB primary: sources, plans, batches, WAL, results, cache.
    mongo_url: SecretStr = SecretStr("mongodb://127.0.0.1:27017/")
    #: MongoDB for candles: a read-only user, ``readPreference=secondaryPreferred``.
    candles_mongo_url: SecretStr = SecretStr(
        "mongodb://127.0.0.1:27017/?readPreference=secondaryPreferred"
    )
    #: The database both URLs use.
    mongo_db: str = "stratorch"
    #: Megabytes of decoded candle chunks a service keeps in memory (by content hash), so
    #: backtests on the same candles read only the series' manifest from Mongo; ``0``: none.
    candle_cache_mb: float = Field(default=256.0, ge=0)
    #: Deliveries a service handles at once (and its broker prefetch); unset: CPU count for
    #: symbol_worker, 4 for the others.
    concurrency: int | None = Field(default=None, ge=1)
    #: Days plans, batches, claims, WAL records, results and cached results are kept in Mongo
    #: (TTL indexes, set at service start); ``0`` keeps them forever.
    retention_days: float = Field(default=30.0, ge=0)
    #: On SIGTERM, how long in-flight messages may finish before they are cancelled.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    #: How long a service retries one message through an outage (Mongo or RabbitMQ out of
    #: reach) before giving it up: its backtest then ends ``failed`` (kind ``unavailable``).
    outage_limit_s: float = Field(default=120.0, gt=0)
    #: How long portfolio_sim's claim on a replay lasts unless renewed (every third of it):
    #: a crashed replay is taken over by a redelivered batch once it lapses.
    claim_lease_s: float = Field(default=DEFAULT_LEASE_S, gt=0)
    #: The deadline of a request without ``deadline_s``: seconds from planning until an
    #: unfinished backtest ends ``failed`` (kind ``timeout``).
    deadline_s: float = Field(default=3600.0, gt=0, le=7 * 86_400)
    #: The gateway's HTTP address.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000

    # -- clients of the stack (stratorch submit/status/result, stratorch.connect) ---------------
    #: The gateway they use (``http://host:8000``); unset: the broker, ``amqp_url``.
    gateway_url: str | None = None
    #: Your API token for that gateway (the token itself; the gateway has only its hash).
    api_token: SecretStr | None = None

    # -- tenants (see shared.tenancy) -------------------------------------------------------------
    #: ``tokens``: the gateway wants an API token on every request (and refuses to start with
    #: none configured), the scheduler a ``user_id`` on every broker request. ``off``: no
    #: authentication, every request is the tenant ``anonymous`` (local use only).
    auth: Literal["tokens", "off"] = "tokens"
    #: ``tenant:sha256hex,...``: the sha256 of each API token and its tenant (never tokens).
    #: Secret all the same: a token pasted here by mistake is never shown in an error.
    api_tokens: SecretStr = SecretStr("")
    #: Per tenant: backtests running at once; unset: no limit.
    tenant_max_running: int | None = Field(default=None, ge=1)
    #: Per tenant: units (one per symbol) of its unfinished backtests; unset: no limit.
    tenant_max_units: int | None = Field(default=None, ge=1)

    @field_validator("api_tokens")
    @classmethod
    def _check_tokens(cls, value: SecretStr) -> SecretStr:
        ApiTokens.parse(value.get_secret_value())  # fail at start, naming the bad entry
        return value

    @property
    def tokens(self) -> ApiTokens:
        return ApiTokens.parse(self.api_tokens.get_secret_value())

    @property
    def quota(self) -> Quota:
        return Quota(running=self.tenant_max_running, units=self.tenant_max_units)


def _describe(cls: type[Settings], exc: ValidationError) -> str:
    """``STRATORCH_SANDBOX='dokcer' is not allowed: expected 'process' or 'docker'`` for each
    bad variable; a secret's value is never shown."""
    lines = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        name = f"{_PREFIX}{field.upper()}"
        secret = (
            cls.model_fields[field].annotation is SecretStr if field in cls.model_fields else False
        )
        shown = "(hidden)" if secret else repr(error.get("input"))
        expected = (error.get("ctx") or {}).get("expected")
        allowed = f"expected {expected}" if expected else error["msg"]
        lines.append(f"{name}={shown} is not allowed: {allowed}")
    return "; ".join(lines)
