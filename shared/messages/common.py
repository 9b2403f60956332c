"""Pieces every message shares: the schema version, the error shape, component specs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from shared.errors import ErrorKind, FieldError, RequestRejected, StratorchError
from shared.strategy.reference import ComponentRef

#: Bumped on any incompatible change of a message; sent as the ``x-schema-version`` header.
SCHEMA_VERSION: Final = 1

#: Uploaded strategy code is capped so a request stays a reasonable broker message.
MAX_SOURCE_BYTES = 256 * 1024

Symbol = Annotated[
    str, Field(pattern=r"^[A-Z0-9]{2,20}$", description="Binance symbol, e.g. BTCUSDT")
]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Side = Literal["long"]  # shorts come later; the field exists so they can


class Message(BaseModel):
    """Base of every wire message: unknown fields and silent coercions are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class ErrorInfo(Message):
    """One error, in the shape users see everywhere (batches, results, the HTTP API)."""

    kind: ErrorKind
    symbol: str | None = None
    unit_id: str | None = None
    message: str
    log_tail: str = ""
    #: A ``rejected`` request's invalid fields, each apart (``message`` names them all).
    fields: list[FieldError] = Field(default_factory=list)

    @classmethod
    def from_error(cls, exc: StratorchError) -> ErrorInfo:
        """``exc`` as it travels: its kind, where it happened, its message, the strategy's
        last output lines and, for a rejected request, its invalid fields."""
        return cls(
            kind=exc.kind,
            symbol=exc.symbol,
            unit_id=exc.unit_id,
            message=exc.message,
            log_tail=exc.log_tail,
            fields=list(exc.fields) if isinstance(exc, RequestRejected) else [],
        )


class ComponentSpec(Message):
    """Which strategy (or portfolio manager) to load, and its params.

    Exactly one of ``builtin``, ``module``, ``source`` or ``source_sha256``:

    - ``{"builtin": "sma_cross"}`` (a bare string ``"sma_cross"`` means the same),
    - ``{"module": "pkg.mod", "class": "Name"}``: importable where it runs,
    - ``{"source": "<python>", "class": "Name"}``: uploaded code, ≤ 256 KiB,
    - ``{"source_sha256": "<hex>", "class": "Name"}``: code uploaded before, by its hash.
    """

    builtin: str | None = None
    module: str | None = None
    source: Annotated[str, Field(max_length=MAX_SOURCE_BYTES)] | None = None
    source_sha256: Sha256 | None = None
    class_: str | None = Field(default=None, alias="class")
    params: dict[str, JsonValue] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"builtin": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_form(self) -> ComponentSpec:
        given = [f for f in ("builtin", "module", "source", "source_sha256") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'builtin', 'module', 'source' or 'source_sha256'"
                f" (got {', '.join(given) or 'none'})"
            )
        if self.builtin is None and not self.class_:
            raise ValueError(f"'{given[0]}' needs 'class': the name of the class to load")
        if self.builtin is not None and self.class_:
            raise ValueError("'class' goes with 'module' or 'source', not with 'builtin'")
        if self.source is not None and len(self.source.encode()) > MAX_SOURCE_BYTES:
            raise ValueError(f"'source' is over {MAX_SOURCE_BYTES // 1024} KiB")
        return self

    def ref(self) -> ComponentRef:
        """This spec as the loader and the sandbox take it."""
        return ComponentRef(
            builtin=self.builtin,
            module=self.module,
            class_name=self.class_,
            source=self.source,
            source_sha256=self.source_sha256,
            params=dict(self.params),
        )


def rejection(errors: Iterable[Mapping[str, Any]]) -> RequestRejected:
    """The request is invalid: pydantic's ``errors`` (``ValidationError.errors()``), one
    :class:`~shared.errors.FieldError` each, all named in the message."""
    return RequestRejected.of_fields(
        [FieldError(tuple(err["loc"]), err["msg"].removeprefix("Value error, ")) for err in errors]
    )


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field: what ``rejected`` results carry."""
    return rejection(exc.errors(include_url=False)).message
